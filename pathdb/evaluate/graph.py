"""EAP-IG's position-free edge graph of a model (no torch): edge names <-> ``in_graph`` matrix
cells, and the table of every real edge with a run's scores (unscored edges score 0)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pathdb.export.eap import EapSpec, eap_spec
from pathdb.query.common import QueryError


class EvaluationError(QueryError):
    """An evaluation that cannot be run (bad intervention, prompts, circuit or run)."""


@dataclass(frozen=True)
class EdgeGraph:
    """EAP-IG's position-free graph of a model, with edge-name <-> matrix-cell lookups."""

    spec: EapSpec

    @classmethod
    def of(cls, n_layers: int, n_heads: int, parallel: bool = False) -> EdgeGraph:
        """The graph of a model with ``n_layers`` x ``n_heads`` (``parallel``: attention and MLP
        read the same block input, so a layer's heads do not feed its MLP)."""
        return cls(eap_spec(n_layers, n_heads, parallel))

    @property
    def n_edges(self) -> int:
        """Number of real edges."""
        return len(self.spec.edges)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_forward, n_backward)``."""
        return len(self.spec.forward), len(self.spec.backward)

    def real(self) -> np.ndarray:
        """Boolean matrix of the real edges."""
        m = np.zeros(self.shape, dtype=bool)
        for _, f, b in self.spec.edges:
            m[f, b] = True
        return m

    def mask(self, edges: Iterable[str]) -> np.ndarray:
        """The ``in_graph`` matrix of a set of edge names (unknown names raise)."""
        index = self.spec.edge_index
        m = np.zeros(self.shape, dtype=bool)
        for e in edges:
            if e not in index:
                raise EvaluationError(
                    f"{e!r} is not an edge of the EAP-IG graph (L={self.spec.n_layers}, "
                    f"H={self.spec.n_heads}); edges look like 'input->a0.h1<q>', 'a1.h2->m3', 'm3->logits'"
                )
            f, b = index[e]
            m[f, b] = True
        return m


def _kind(component: str) -> str:
    if component == "input":
        return "embed"
    if component == "logits":
        return "final"
    return "mlp" if component.startswith("m") else "attn"


def full_edge_table(graph: EdgeGraph, scored: pd.DataFrame, score: str = "score") -> pd.DataFrame:
    """Every real edge of ``graph`` with ``src``, ``dst``, kinds and ``score`` (= the ``score``
    column of ``scored``, 0 for unscored edges), in the layout the query layer's selection uses."""
    index = graph.spec.edge_index
    unknown = [e for e in scored["edge"] if e not in index]
    if unknown:
        raise EvaluationError(
            f"{len(unknown)} scored edge(s) are not edges of the EAP-IG graph, e.g. {unknown[:3]} "
            "(whole-attention-layer nodes from --batch-heads pre-screens cannot be evaluated)"
        )
    values = dict(zip(scored["edge"], scored[score].astype(float), strict=True))
    names = [name for name, _, _ in graph.spec.edges]
    src = [n.split("->")[0] for n in names]
    dst = [n.split("->")[1].split("<")[0] for n in names]
    return pd.DataFrame({
        "edge": names, "src": src, "dst": dst,
        "src_kind": [_kind(s) for s in src], "dst_kind": [_kind(d) for d in dst],
        "score": [values.get(n, 0.0) for n in names],
    })  # fmt: skip
