"""Issue 12's last measured refinements of the ``group`` edge rule's ranking, kept with the
benchmark that measures them (``bench_faithfulness.py --configs rule-ideas``) because none is a
default: sender-aware scores (:func:`widest_input_chain`) and a re-ranking of the top-n circuits by
edge-masked forwards on the search prompts (:func:`refine_ranking`). The refinement reaches 0.846
faithfulness at 75 edges on toy-ioi's held-out prompts (the default: 0.830), but it re-assigns
score magnitudes among edges (an edge's exported score is no longer its own estimate), depends on
its zone size (0.831 with zones of 15 edges) and adds ~1.4 s to a 2.7 s search (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.query.aggregate import prune_edges, select_edges

#: the ranking refinement re-sorts around circuits of every ``REFINE_STEP`` edges up to ``REFINE_MAX``
REFINE_STEP, REFINE_MAX = 10, 150


def _depth(node: str) -> float:
    """A node's place in the edge graph's topological order (``input``, ``a0.h*``, ``m0``, ...)."""
    if node in ("input", "logits"):
        return -math.inf if node == "input" else math.inf
    return 2 * int(node[1:].split(".")[0]) + node.startswith("m")


def widest_input_chain(table: pd.DataFrame) -> pd.DataFrame:
    """Sender-aware scores of a full edge table (:func:`pathdb.evaluate.graph.full_edge_table`):
    each edge's ``|score|`` capped by its sender's widest input chain, the largest over input ->
    sender chains of the smallest ``|score|`` on the chain (an edge out of a node that only weak
    edges feed carries little clean signal in a circuit); signs are kept."""
    width: dict[str, float] = {"input": math.inf}
    capped: dict[str, float] = {}
    for dst, rows in sorted(table.groupby("dst"), key=lambda kv: _depth(str(kv[0]))):
        for edge, src, value in zip(rows["edge"], rows["src"], rows["score"].abs(), strict=True):
            capped[str(edge)] = min(float(value), width.get(str(src), 0.0))
        width[str(dst)] = max(capped[str(e)] for e in rows["edge"])
    sign = np.where(table["score"] < 0, -1.0, 1.0)
    return table.assign(score=table["edge"].map(capped).astype(float) * sign)


def refine_ranking(
    table: pd.DataFrame,
    evaluator: MaskedEvaluator,
    step: int = REFINE_STEP,
    n_max: int = REFINE_MAX,
) -> pd.DataFrame:
    """The ``|score|`` ranking of a full edge table refined by edge-masked forwards on
    ``evaluator``'s prompts (a run's search prompts, never the judging ones): for n = step,
    2 step, ..., n_max the ranks (n - step, n + step] are re-sorted by each edge's first-order value
    in the top-n circuit (the masked metric's gradient at its mask, so an edge is judged in the
    circuit it would join), and the new order is kept only when its top-n circuit scores higher.
    A pass at n leaves the set of the top n + step edges alone, so each top-n circuit at a multiple
    of ``step`` is the unrefined one or a better one on these prompts. The ``|score|`` values are
    then re-assigned in the new order (each edge keeps its sign): one ranking for every n."""
    graph = evaluator.graph
    real = graph.real()
    m_full, m_empty = evaluator.metric_values(np.stack([real, ~real]))
    sign = 1.0 if m_full >= m_empty else -1.0  # faithfulness grows with sign * metric
    index = graph.spec.edge_index
    order = [str(e) for e in select_edges(table, top_k=None, threshold=None, by="abs")["edge"]]

    def pruned(chosen: list[str]) -> list[str]:
        return [str(e) for e in prune_edges(table[table["edge"].isin(chosen)])["edge"]]

    for n in range(step, n_max + 1, step):
        circuit = pruned(order[:n])
        w = torch.tensor(real & ~graph.mask(circuit), dtype=torch.float64)[None]
        w.requires_grad_(True)
        with torch.enable_grad():
            evaluator.masked_metric(w).sum().backward()
        assert w.grad is not None
        value = -sign * w.grad[0].numpy()  # > 0: the circuit is better with the edge clean
        lo = max(0, n - step)
        zone = sorted(order[lo : n + step], key=lambda e: -value[index[e]])
        new = order[:lo] + zone
        if set(new[:n]) == set(order[:n]):
            continue
        before, after = evaluator.metric_values(
            np.stack([graph.mask(circuit), graph.mask(pruned(new[:n]))])
        )
        if sign * (after - before) > 0:
            order[lo : n + step] = zone
    magnitude = np.sort(table["score"].abs().to_numpy(dtype=float))[::-1]
    rank = {e: i for i, e in enumerate(order)}
    signs = np.where(table["score"] < 0, -1.0, 1.0)
    return table.assign(
        score=[magnitude[rank[str(e)]] * s for e, s in zip(table["edge"], signs, strict=True)]
    )
