"""Pictures of circuits with matplotlib (Agg backend): layers left to right, blue positive and red
negative edges, line width by |score|. SVG or PNG chosen by the output suffix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pathdb.export.common import ExportError, output_path
from pathdb.query.aggregate import Circuit

POSITIVE = "#1f5fbf"
NEGATIVE = "#c62828"
_KIND_COLOUR = {"embed": "#9e9e9e", "attn": "#ffb74d", "mlp": "#81c784", "final": "#9575cd"}


def _val(v: Any) -> int | None:
    return None if v is None or pd.isna(v) else int(v)


def _node_table(circuit: Circuit) -> dict[str, dict[str, Any]]:
    """Node name -> kind, layer, head, position, taken from the circuit's edge table."""
    out: dict[str, dict[str, Any]] = {}
    for r in circuit.edges.to_dict("records"):
        for end in ("src", "dst"):
            name = str(r[end])
            if name not in out:
                out[name] = {
                    "kind": str(r[f"{end}_kind"]),
                    "layer": int(r[f"{end}_layer"]),
                    "head": _val(r[f"{end}_head"]),
                    "position": _val(r.get(f"{end}_position")),
                }
    return out


def _layout(
    nodes: dict[str, dict[str, Any]],
    positional: bool,
    n_heads: int,
    labels: dict[int, str] | None = None,
) -> tuple[dict[str, tuple[float, float]], list[tuple[float, str]]]:
    """Node coordinates and y ticks. x = layer (attention at l, MLP at l + 0.5, input -1,
    logits L). Position-free: y = head (MLP above). Positional: one horizontal band per position
    present, as tall as its busiest column, with that column's nodes spread inside it, ticked with
    ``labels`` (role names) where given."""
    xy: dict[str, tuple[float, float]] = {}
    xs = {
        name: float(n["layer"]) + (0.5 if n["kind"] == "mlp" else 0.0) for name, n in nodes.items()
    }
    if not positional:
        for name, n in nodes.items():
            if n["kind"] == "attn":
                y = float(n["head"] if n["head"] is not None else n_heads / 2)
            elif n["kind"] == "mlp":
                y = float(n_heads) + 0.5
            else:
                y = (n_heads - 1) / 2
            xy[name] = (xs[name], y)
        ticks = [(float(h), f"h{h}") for h in range(n_heads)] + [(float(n_heads) + 0.5, "mlp")]
        return xy, ticks
    groups: dict[tuple[float, int], list[str]] = {}
    for name, n in nodes.items():
        pos = -1 if n["position"] is None else int(n["position"])
        groups.setdefault((xs[name], pos), []).append(name)
    positions = sorted({pos for _, pos in groups})
    size = {p: max(len(g) for (x, q), g in groups.items() if q == p) for p in positions}
    centre: dict[int, float] = {}
    y0 = 0.0
    for p in positions:
        centre[p] = y0 + (size[p] - 1) / 2
        y0 += size[p] + 1.0  # one empty unit between bands
    for (x, pos), members in groups.items():
        members.sort(key=lambda m: (nodes[m]["kind"], nodes[m]["head"] or 0, m))
        for i, m in enumerate(members):
            xy[m] = (x, centre[pos] + i - (len(members) - 1) / 2)
    names = labels or {}
    ticks = [(centre[p], "all" if p < 0 else names.get(p, str(p))) for p in positions]
    return xy, ticks


def draw_circuit(
    circuit: Circuit,
    out_path: str | Path,
    *,
    positional: bool | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``circuit`` to ``out_path`` (.svg or .png); ``positional`` defaults to the circuit's view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    p, fmt = output_path(out_path, {".svg": "svg", ".png": "png"})
    pos_view = circuit.positional if positional is None else positional
    if pos_view != circuit.positional:
        raise ExportError(
            f"the circuit was built with positional={circuit.positional}; rebuild it with "
            f"positional={pos_view} to draw that view"
        )
    nodes = _node_table(circuit)
    xy, yticks = _layout(nodes, pos_view, circuit.n_heads, circuit.meta.get("position_labels"))
    xs = [v[0] for v in xy.values()] or [0.0]
    ys = [v[1] for v in xy.values()] or [0.0]
    if not pos_view:  # show the whole head axis so the picture keeps its proportions
        ys = [*ys, -0.5, circuit.n_heads + 0.5]
    width = min(24.0, 4.0 + (1.6 if pos_view else 1.0) * (max(xs) - min(xs) + 1))
    height = min(24.0, max(4.0, 2.0 + (0.32 if pos_view else 0.45) * (max(ys) - min(ys) + 1)))
    fig, ax = plt.subplots(figsize=(width, height))
    top = float(circuit.edges["score"].abs().max()) if len(circuit.edges) else 1.0
    top = top or 1.0
    for r in circuit.edges.sort_values("score", key=lambda s: s.abs()).to_dict("records"):
        s = float(r["score"])
        a, b = xy[str(r["src"])], xy[str(r["dst"])]
        rad = 0.12 if abs(a[1] - b[1]) < 1e-9 and abs(a[0] - b[0]) > 1.01 else 0.0
        ax.add_patch(
            FancyArrowPatch(
                a,
                b,
                arrowstyle="-|>",
                mutation_scale=8 + 4 * abs(s) / top,
                shrinkA=9,
                shrinkB=9,
                connectionstyle=f"arc3,rad={rad}",
                color=POSITIVE if s >= 0 else NEGATIVE,
                linewidth=0.4 + 4.0 * abs(s) / top,
                alpha=0.35 + 0.55 * abs(s) / top,
                zorder=1,
            )
        )
    for name, (x, y) in xy.items():
        kind = nodes[name]["kind"]
        ax.scatter(
            [x], [y], s=130, color=_KIND_COLOUR.get(kind, "#bdbdbd"), edgecolor="#424242", zorder=3
        )
        ax.annotate(
            name,
            (x, y),
            xytext=(8, 0) if pos_view else (0, 8),
            textcoords="offset points",
            ha="left" if pos_view else "center",
            va="center" if pos_view else "bottom",
            fontsize=6.5 if pos_view else 7,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
        )
    L = circuit.n_layers
    ax.set_xticks([-1, *range(L), L], ["embed", *[f"L{i}" for i in range(L)], "logits"], fontsize=8)
    ax.set_ylabel("position" if pos_view else "head (MLP above, input/logits centred)")
    ax.set_yticks([t for t, _ in yticks], [label for _, label in yticks], fontsize=8)
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 1.0)
    ax.grid(axis="x", color="#eeeeee", zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    legend = [
        Line2D([0], [0], color=POSITIVE, lw=2.5, label="positive edge"),
        Line2D([0], [0], color=NEGATIVE, lw=2.5, label="negative edge"),
    ]
    ax.legend(
        handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False
    )
    ax.set_title(title or f"circuit: {len(circuit.edges)} edges, {len(nodes)} nodes", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(p, format=fmt, dpi=150)
    except OSError as e:
        raise ExportError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return p
