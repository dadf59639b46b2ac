"""Graphviz DOT text of a circuit (plain text; no graphviz installation needed to write it)."""

from __future__ import annotations

from pathlib import Path

from pathdb.export.common import output_path, write_text
from pathdb.query.aggregate import Circuit

POSITIVE = "#1f5fbf"
NEGATIVE = "#c62828"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(circuit: Circuit, *, title: str | None = None) -> str:
    """DOT text: nodes ranked by layer (left to right), edges blue (positive) / red (negative),
    pen width by |score| relative to the largest edge."""
    lines = [
        "digraph circuit {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="#f5f5f5"];',
    ]
    if title:
        lines.append(f"  label={_q(title)}; labelloc=t;")
    layers: dict[int, list[str]] = {}
    names: set[str] = set()
    for r in circuit.edges.to_dict("records"):
        for n, layer in ((r["src"], r["src_layer"]), (r["dst"], r["dst_layer"])):
            if n not in names:
                names.add(n)
                layers.setdefault(int(layer), []).append(n)
    for layer in sorted(layers):
        members = " ".join(_q(n) + ";" for n in sorted(layers[layer]))
        lines.append(f"  {{ rank=same; {members} }}")
    top = float(circuit.edges["score"].abs().max()) if len(circuit.edges) else 1.0
    top = top or 1.0
    for r in circuit.edges.to_dict("records"):
        s = float(r["score"])
        colour = POSITIVE if s >= 0 else NEGATIVE
        width = 0.5 + 4.5 * abs(s) / top
        site = r.get("dst_site")
        label = f"{s:.3g}" + (
            f" <{site}>" if isinstance(site, str) and not circuit.positional else ""
        )
        lines.append(
            f"  {_q(r['src'])} -> {_q(r['dst'])} [color={_q(colour)}, penwidth={width:.2f}, "
            f"label={_q(label)}, score={s:.6g}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(circuit: Circuit, path: str | Path, *, title: str | None = None) -> Path:
    """Write :func:`to_dot` text to ``path`` (``.dot`` or ``.gv``)."""
    p, _ = output_path(path, {".dot": "dot", ".gv": "dot"})
    write_text(p, to_dot(circuit, title=title))
    return p
