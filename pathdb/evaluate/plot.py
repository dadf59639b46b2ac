"""Faithfulness curves of one or several evaluations on one plot (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pathdb.evaluate.results import Evaluation
from pathdb.export.common import ExportError, output_path

_STYLE = {"abs": "-", "signed": "--", "paths": ":"}
_LABEL = {"abs": "top-n |score| (CMD)", "signed": "top-n score (CPR)", "paths": "top-k paths"}


def draw_curves(
    evaluations: Sequence[Evaluation],
    path: str | Path,
    *,
    curves: Sequence[str] = ("abs", "signed", "paths"),
    title: str | None = None,
) -> Path:
    """Faithfulness against circuit edges (log axis) for every evaluation and curve; .svg or .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, fmt = output_path(path, {".svg": "svg", ".png": "png"})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ev in enumerate(evaluations):
        colour = colours[i % len(colours)]
        for name in curves:
            pts = [pt for pt in ev.curve(name) if pt.n_edges > 0]
            if not pts:
                continue
            by_size = sorted({pt.n_edges: pt.faithfulness for pt in pts}.items())
            label = f"{ev.run_name}: {_LABEL[name]}"
            if name == "signed":
                label += f", CPR {ev.cpr:.3f}"
            elif name == "abs":
                label += f", CMD {ev.cmd:.3f}"
            ax.plot([x for x, _ in by_size], [y for _, y in by_size], _STYLE[name], color=colour,
                    marker="o", markersize=2.5, label=label)  # fmt: skip
    ax.axhline(1.0, color="#888888", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("edges in the circuit (after pruning)")
    ax.set_ylabel("faithfulness (m(C) - m(empty)) / (m(full) - m(empty))")
    ax.set_title(title or "faithfulness")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        fig.savefig(p, format=fmt)
    except OSError as e:
        raise ExportError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return p
