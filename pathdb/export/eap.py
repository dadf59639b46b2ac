"""EAP-IG / MIB circuit-track graph export and import (JSON and ``.pt``), per FORMATS.md.

The EAP-IG graph is position-free: export a position-free circuit (``positional=False``).
Whole-attention-layer nodes (head None, e.g. ``a3``) have no EAP-IG counterpart and are refused.
Every real edge of the model is written; edges the circuit does not score get score 0 and
``in_graph`` False. A node is in the graph when an in-graph edge touches it. ``in_graph`` follows
the exported score: a circuit ranked by another column is re-selected (same top-k / threshold /
ranking / pruning) by the exported one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathdb.export.common import ExportError, output_path, write_text
from pathdb.query.aggregate import Circuit, prune_edges, select_edges

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class EapSpec:
    """Node names, index maps and the real-edge list of one EAP-IG graph shape."""

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool
    forward: list[str]  # forward (source) node names in forward-index order, logits excluded
    backward: list[str]  # backward (destination) names in backward-index order, logits last
    edges: list[tuple[str, int, int]]  # (edge name, forward index, backward index), real edges only

    @property
    def edge_index(self) -> dict[str, tuple[int, int]]:
        """Edge name -> (forward index, backward index)."""
        return {name: (f, b) for name, f, b in self.edges}


@lru_cache(maxsize=8)
def eap_spec(n_layers: int, n_heads: int, parallel_attn_mlp: bool = False) -> EapSpec:
    """Enumerate the EAP-IG graph of a model: forward/backward node orders and every real edge."""
    forward = ["input"]
    for layer in range(n_layers):
        forward += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
    backward: list[str] = []
    for layer in range(n_layers):
        backward += [f"a{layer}.h{h}<{s}>" for s in QKV for h in range(n_heads)] + [f"m{layer}"]
    backward.append("logits")

    def layer_of(name: str) -> int:
        return -1 if name == "input" else int(name[1:].split(".")[0].split("<")[0])

    edges: list[tuple[str, int, int]] = []
    for f, src in enumerate(forward):
        ls = layer_of(src)
        for b, dst in enumerate(backward):
            if dst == "logits":
                real = True
            else:
                ld = layer_of(dst)
                if dst.startswith("a"):
                    real = ls < ld
                else:  # MLP: earlier layers, plus this layer's heads unless attention and MLP are parallel
                    real = ls < ld or (ls == ld and src.startswith("a") and not parallel_attn_mlp)
            if real:
                edges.append((f"{src}->{dst}", f, b))
    return EapSpec(n_layers, n_heads, parallel_attn_mlp, forward, backward, edges)


@dataclass
class EapGraph:
    """An EAP-IG graph read back: its cfg, every real edge (name, score, in_graph) and node flags."""

    cfg: dict[str, Any]
    edges: pd.DataFrame  # columns edge, score, in_graph; spec order (forward index, backward index)
    nodes_in_graph: dict[str, bool]


def _cfg(circuit_or_edges: Circuit | pd.DataFrame, cfg: dict[str, Any] | None) -> dict[str, Any]:
    if cfg is None:
        if not isinstance(circuit_or_edges, Circuit):
            raise ExportError(
                "exporting an edge table needs cfg={'n_layers', 'n_heads', 'd_model', ...}"
            )
        cfg = circuit_or_edges.eap_cfg()
    missing = {"n_layers", "n_heads"} - set(cfg)
    if missing:
        raise ExportError(f"cfg lacks {sorted(missing)}")
    return {
        "n_layers": int(cfg["n_layers"]),
        "n_heads": int(cfg["n_heads"]),
        "parallel_attn_mlp": bool(cfg.get("parallel_attn_mlp", False)),
        "d_model": int(cfg.get("d_model", 0)),
    }


def _scored(circuit_or_edges: Circuit | pd.DataFrame, score: str) -> pd.DataFrame:
    """Table (edge, score, in_graph) of the edges to write: all scored edges, in_graph = selected."""
    if isinstance(circuit_or_edges, Circuit):
        if circuit_or_edges.positional:
            raise ExportError(
                "EAP-IG graphs are position-free: build the circuit with positional=False to export it"
            )
        all_e = circuit_or_edges.all_edges
        chosen = set(_selected(circuit_or_edges, score)["edge"])
        df = pd.DataFrame({"edge": all_e["edge"], "score": all_e[score]})
        df["in_graph"] = df["edge"].isin(chosen)
        return df
    df = circuit_or_edges
    if "edge" not in df or score not in df:
        raise ExportError(f"the edge table needs columns 'edge' and {score!r}")
    in_graph = df["in_graph"].astype(bool) if "in_graph" in df else pd.Series(True, index=df.index)
    return pd.DataFrame({"edge": df["edge"], "score": df[score], "in_graph": in_graph})


def _selected(c: Circuit, score: str) -> pd.DataFrame:
    """The circuit's edges as selected by ``score``: its own edges when it was ranked by that column,
    otherwise its selection (top-k / threshold / ranking / pruning) redone on ``score``."""
    meta = c.meta
    if meta.get("score", "score") == score:
        return c.edges
    sel = select_edges(
        c.all_edges,
        top_k=meta.get("top_k"),
        threshold=meta.get("threshold"),
        by=str(meta.get("by", "abs")),
        score=score,
    )
    return prune_edges(sel) if meta.get("pruned", True) else sel


def eap_arrays(
    circuit_or_edges: Circuit | pd.DataFrame,
    cfg: dict[str, Any] | None = None,
    *,
    score: str = "score",
) -> tuple[dict[str, Any], EapSpec, np.ndarray, np.ndarray, np.ndarray]:
    """Dense EAP-IG arrays: (cfg, spec, scores [n_fwd, n_bwd], in_graph [n_fwd, n_bwd], nodes_in_graph)."""
    c = _cfg(circuit_or_edges, cfg)
    spec = eap_spec(c["n_layers"], c["n_heads"], c["parallel_attn_mlp"])
    df = _scored(circuit_or_edges, score)
    index = spec.edge_index
    unknown = [e for e in df["edge"] if e not in index]
    if unknown:
        whole = [
            e
            for e in unknown
            if any(p.split("<")[0].count(".") == 0 and p.startswith("a") for p in e.split("->"))
        ]
        hint = (
            " (whole-attention-layer nodes such as 'a3' have no EAP-IG counterpart: search with "
            "single heads)"
            if whole
            else ""
        )
        raise ExportError(
            f"{len(unknown)} edge(s) are not edges of the EAP-IG graph (L={c['n_layers']}, "
            f"H={c['n_heads']}): {unknown[:5]}{hint}"
        )
    scores = np.zeros((len(spec.forward), len(spec.backward)), dtype=np.float32)
    in_graph = np.zeros(scores.shape, dtype=bool)
    for name, s, g in zip(df["edge"], df["score"], df["in_graph"], strict=True):
        f, b = index[name]
        scores[f, b] = float(s)
        in_graph[f, b] = bool(g)
    nodes_in: np.ndarray = np.asarray(in_graph.any(axis=1), dtype=bool)
    for b, dst in enumerate(spec.backward[:-1]):
        if in_graph[:, b].any():
            comp = dst.split("<")[0]
            nodes_in[spec.forward.index(comp)] = True
    return c, spec, scores, in_graph, nodes_in


def to_eap_json(
    circuit_or_edges: Circuit | pd.DataFrame,
    cfg: dict[str, Any] | None,
    path: str | Path,
    *,
    score: str = "score",
) -> Path:
    """Write the EAP-IG / MIB JSON (``cfg``, ``nodes``, ``edges`` with every real edge)."""
    p, _ = output_path(path, {".json": "json"})
    c, spec, scores, in_graph, nodes_in = eap_arrays(circuit_or_edges, cfg, score=score)
    nodes = {name: {"in_graph": bool(nodes_in[i])} for i, name in enumerate(spec.forward)}
    nodes["logits"] = {"in_graph": bool(in_graph[:, -1].any())}
    edges = {
        name: {"score": float(scores[f, b]), "in_graph": bool(in_graph[f, b])}
        for name, f, b in spec.edges
    }
    write_text(p, json.dumps({"cfg": c, "nodes": nodes, "edges": edges}))
    return p


def to_eap_pt(
    circuit_or_edges: Circuit | pd.DataFrame,
    cfg: dict[str, Any] | None,
    path: str | Path,
    *,
    score: str = "score",
) -> Path:
    """Write the EAP-IG ``.pt`` dict (cfg, src_nodes, dst_nodes, edges_scores, edges_in_graph, nodes_in_graph)."""
    import torch  # lazy: the query layer must not pay torch's import time

    p, _ = output_path(path, {".pt": "pt"})
    c, spec, scores, in_graph, nodes_in = eap_arrays(circuit_or_edges, cfg, score=score)
    data = {
        "cfg": c,
        "src_nodes": list(spec.forward),
        "dst_nodes": list(spec.backward),
        "edges_scores": torch.from_numpy(scores.copy()),
        "edges_in_graph": torch.from_numpy(in_graph.copy()),
        "nodes_in_graph": torch.from_numpy(nodes_in.copy()),
    }
    try:
        torch.save(data, p)
    except OSError as e:
        raise ExportError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    return p


def _graph_from_arrays(
    cfg: dict[str, Any], scores: np.ndarray, in_graph: np.ndarray, nodes: dict[str, bool]
) -> EapGraph:
    spec = eap_spec(
        int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("parallel_attn_mlp", False))
    )
    rows = [(name, float(scores[f, b]), bool(in_graph[f, b])) for name, f, b in spec.edges]
    return EapGraph(dict(cfg), pd.DataFrame(rows, columns=["edge", "score", "in_graph"]), nodes)


def from_eap_json(path: str | Path) -> EapGraph:
    """Read an EAP-IG JSON graph; unlisted edges get score 0 and are not in the graph."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cfg = data["cfg"]
        spec = eap_spec(
            int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("parallel_attn_mlp", False))
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"cannot read EAP-IG JSON {str(path)!r}: {e}") from None
    scores = np.zeros((len(spec.forward), len(spec.backward)), dtype=np.float32)
    in_graph = np.zeros(scores.shape, dtype=bool)
    index = spec.edge_index
    for name, entry in data.get("edges", {}).items():
        if name not in index:
            raise ExportError(f"{str(path)!r}: {name!r} is not an edge of this EAP-IG graph")
        f, b = index[name]
        scores[f, b] = float(entry.get("score", 0.0))
        in_graph[f, b] = bool(entry.get("in_graph", False))
    nodes = {
        k: bool(v["in_graph"] if isinstance(v, dict) else v)
        for k, v in data.get("nodes", {}).items()
    }
    return _graph_from_arrays(cfg, scores, in_graph, nodes)


PT_KEYS = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")


def from_eap_pt(path: str | Path) -> EapGraph:
    """Read an EAP-IG ``.pt`` graph (all six keys required; tensors copied by index)."""
    import torch

    try:
        data = torch.load(Path(path), weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ExportError(f"cannot read EAP-IG .pt {str(path)!r}: {e}") from None
    missing = [k for k in PT_KEYS if k not in data]
    if missing:
        raise ExportError(f"{str(path)!r} lacks the EAP-IG keys {missing}")
    cfg = data["cfg"]
    spec = eap_spec(
        int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("parallel_attn_mlp", False))
    )
    if list(data["src_nodes"]) != spec.forward or list(data["dst_nodes"]) != spec.backward:
        raise ExportError(f"{str(path)!r}: node lists do not match the EAP-IG order for its cfg")
    scores = data["edges_scores"].detach().cpu().numpy()
    in_graph = data["edges_in_graph"].detach().cpu().numpy().astype(bool)
    nodes_t = data["nodes_in_graph"].detach().cpu().numpy().astype(bool)
    nodes = {name: bool(nodes_t[i]) for i, name in enumerate(spec.forward)}
    nodes["logits"] = bool(in_graph[:, -1].any())
    return _graph_from_arrays(cfg, scores, in_graph, nodes)
