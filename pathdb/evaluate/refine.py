"""The ``refined`` edge rule's model step: the top edges' order refined by edge-masked forwards.

The ``group`` rule's scores, each capped by its sender's widest input chain
(:func:`pathdb.query.edge_rules.sender_capped`), rank the edges; this module re-sorts the top of
that ranking where the model says a circuit is better for it. For n = 10, 20, ..., 150 it re-sorts
the ranks (n - 10, n + 10] by each edge's first-order value *in the top-n circuit* (the gradient of
the masked metric at that circuit's mask, so an edge is judged in the circuit it would join) and
keeps the new order only when the new top-n circuit scores higher under the masked forward. Every
quantity comes from the run's own search prompts, metric and patch, never from prompts that judge
it. The scores are the capped magnitudes handed out in the new order (each edge keeps its sign), so
one ranking serves every circuit size and MIB/EAP-IG tools re-rank it as pathdb does; edges the
search never scored (score 0) do not move.

A completing search runs it with the model it holds and stores the top edges' scores
(:func:`pathdb.store.effects.write_refined`); docs/semantics.md ("The refined rule") gives what it
measured and what it costs.
"""

from __future__ import annotations

from collections.abc import Mapping

import duckdb
import numpy as np
import pandas as pd
import torch

from pathdb.evaluate.graph import full_edge_table
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.query.aggregate import edges, prune_edges, select_edges
from pathdb.query.common import QueryError

#: the refinement re-sorts around circuits of every ``STEP`` edges, up to ``MAX`` edges
STEP, MAX = 10, 150


def refine_order(
    table: pd.DataFrame, evaluator: MaskedEvaluator, step: int = STEP, n_max: int = MAX
) -> dict[str, float]:
    """The refined scores of the top ``n_max + step`` scored edges of ``table`` (a full edge table,
    :func:`~pathdb.evaluate.graph.full_edge_table`, of sender-capped scores): edge -> the
    ``|score|`` of its new rank with its own sign (the module docstring says how ranks move).
    A pass at n leaves the set of the top n + step edges alone, so each top-n circuit at a multiple
    of ``step`` is the unrefined one or one the masked forward scores higher on these prompts."""
    graph = evaluator.graph
    real = graph.real()
    m_full, m_empty = evaluator.metric_values(np.stack([real, ~real]))
    sign = 1.0 if m_full >= m_empty else -1.0  # faithfulness grows with sign * metric
    index = graph.spec.edge_index
    scored = table[table["score"].ne(0)]
    order = [str(e) for e in select_edges(scored, top_k=None, threshold=None, by="abs")["edge"]]

    def pruned(chosen: list[str]) -> list[str]:
        return [str(e) for e in prune_edges(table[table["edge"].isin(chosen)])["edge"]]

    for n in range(step, min(n_max, len(order)) + 1, step):
        circuit = pruned(order[:n])
        weights = torch.tensor(real & ~graph.mask(circuit), dtype=torch.float64)[None]
        weights.requires_grad_(True)
        # only the weights' gradient: the model's parameters get no .grad
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(evaluator.masked_metric(weights).sum(), weights)
        value = -sign * grad[0].numpy()  # > 0: the circuit is better with the edge clean
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
    magnitude = np.sort(scored["score"].abs().to_numpy(dtype=float))[::-1]
    signs = dict(zip(scored["edge"], np.where(scored["score"] < 0, -1.0, 1.0), strict=True))
    return {e: float(magnitude[i] * signs[e]) for i, e in enumerate(order[: n_max + step])}


def refined_scores(
    con: duckdb.DuckDBPyConnection,
    run_id: int,
    evaluator: MaskedEvaluator,
    effects: Mapping[str, float],
) -> dict[str, float]:
    """Run ``run_id``'s refined top-edge scores (:func:`refine_order`) from its stored paths and
    group ``effects``, with ``evaluator`` on its search prompts; none for a run that scored no
    path (a ``--max-time`` stop before the first level)."""
    try:  # the refined rule before this step: sender-capped group scores
        capped = edges(con, run_id, rule="refined", effects=effects, refined={})
    except QueryError:  # no scored paths: no edges to rank
        return {}
    return refine_order(full_edge_table(evaluator.graph, capped), evaluator)
