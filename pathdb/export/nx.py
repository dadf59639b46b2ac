"""networkx export of circuits and writers for GraphML, GEXF and node-link JSON.

Graph nodes are the circuit's node names (labels in the positional view, components in the
position-free view). In the position-free view a head can receive the same source through its
``<q>``, ``<k>`` and ``<v>`` inputs; the DiGraph holds one edge per (src, dst) with the sums of the
site edges and per-site scores ``score_q``/``score_k``/``score_v`` plus ``sites`` (e.g. ``"q,k"``).
A kv path's score is already split half/half onto its ``<k>`` and ``<v>`` edge, so the sum counts it
once; ``n_paths`` counts each distinct path once (a kv path is on both site edges). ``weight`` is the
circuit's selection score (``score`` unless the circuit was ranked by another column).
All attributes are plain scalars (GraphML has no lists or None: a missing head/position is -1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx
import pandas as pd

from pathdb.export.common import ExportError, output_path, write_text
from pathdb.query.aggregate import SCORE_COLUMNS, Circuit

GRAPH_FORMATS = {".graphml": "graphml", ".gexf": "gexf", ".json": "node-link"}


def _int(v: Any) -> int:
    return -1 if v is None or pd.isna(v) else int(v)


def to_networkx(circuit: Circuit) -> nx.DiGraph:
    """The circuit as an ``nx.DiGraph`` with scalar node and edge attributes; graph attributes
    ``edge_rule`` (``group``, ``effect`` or ``paths``) and ``weight`` (the score column of ``weight``)."""
    weight_col = str(circuit.meta.get("score", "score"))
    kv_shared: dict[tuple[str, str], dict[str, int]] = {}  # kv paths counted on a <k> / <v> row
    g: nx.DiGraph = nx.DiGraph(
        positional=circuit.positional,
        n_layers=circuit.n_layers,
        n_heads=circuit.n_heads,
        edge_rule=str(circuit.meta.get("rule", "paths")),  # how path scores became edge scores
        weight=weight_col,
    )
    for row in circuit.nodes.to_dict("records"):
        attrs: dict[str, Any] = {c: float(row[c]) for c in SCORE_COLUMNS[:-1]}
        attrs.update(
            n_paths=int(row["n_paths"]),
            kind=str(row["kind"]),
            layer=int(row["layer"]),
            head=_int(row["head"]),
        )
        if circuit.positional:
            attrs["position"] = _int(row.get("position"))
            attrs["site"] = (
                "" if row.get("site") is None or pd.isna(row.get("site")) else str(row["site"])
            )
        g.add_node(str(row["node"]), **attrs)
    for row in circuit.edges.to_dict("records"):
        u, v = str(row["src"]), str(row["dst"])
        for n, kind, layer in (
            (u, row["src_kind"], row["src_layer"]),
            (v, row["dst_kind"], row["dst_layer"]),
        ):
            if n not in g:  # a node without its own aggregate row (never the case for query output)
                g.add_node(
                    n,
                    kind=str(kind),
                    layer=int(layer),
                    head=-1,
                    score=0.0,
                    abs_score=0.0,
                    pos_score=0.0,
                    neg_score=0.0,
                    n_paths=0,
                )
        site = row.get("dst_site")
        site = "" if site is None or pd.isna(site) else str(site)
        if not g.has_edge(u, v):
            init: dict[str, Any] = {c: 0.0 for c in SCORE_COLUMNS[:-1]}
            init.update(n_paths=0, weight=0.0, sites="", score_q=0.0, score_k=0.0, score_v=0.0)
            g.add_edge(u, v, **init)
        d = g.edges[u, v]
        for c in SCORE_COLUMNS[:-1]:
            d[c] += float(row[c])
        d["weight"] += float(row[weight_col])
        d["n_paths"] += int(row["n_paths"])
        if site and not circuit.positional:
            d[f"score_{site}"] = d.get(f"score_{site}", 0.0) + float(row["score"])
            d["sites"] = ",".join(
                s for s in ("q", "k", "v") if s == site or s in d["sites"].split(",")
            )
            kv_shared.setdefault((u, v), {})[site] = max(_int(row.get("kv_paths")), 0)
    for (u, v), shared in kv_shared.items():
        if "k" in shared and "v" in shared:  # the same kv paths are on both rows: count them once
            g.edges[u, v]["n_paths"] -= min(shared["k"], shared["v"])
    return g


def write_graph(g: nx.DiGraph, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``g`` as GraphML, GEXF or node-link JSON (format from the suffix unless given)."""
    p, f = output_path(path, GRAPH_FORMATS, fmt)
    try:
        if f == "graphml":
            nx.write_graphml(g, p)
        elif f == "gexf":
            nx.write_gexf(g, p)
        else:
            write_text(p, json.dumps(nx.node_link_data(g, edges="links")))
    except OSError as e:
        raise ExportError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    return p


def read_graph(path: str | Path, fmt: str | None = None) -> nx.DiGraph:
    """Read a graph written by :func:`write_graph` back."""
    p = Path(path)
    f = fmt or GRAPH_FORMATS.get(p.suffix.lower())
    if f == "graphml":
        return nx.read_graphml(p)
    if f == "gexf":
        return nx.read_gexf(p)
    if f == "node-link":
        return nx.node_link_graph(json.loads(p.read_text(encoding="utf-8")), edges="links")
    raise ExportError(f"unknown graph format for {str(p)!r}; use one of {sorted(GRAPH_FORMATS)}")
