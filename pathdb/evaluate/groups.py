"""Group effects of receiver inputs, for the ``group`` edge rule (:func:`pathdb.query.aggregate.group_rule`).

A receiver input (a head's q, k or v input, an MLP input, the logits) has a *group effect*: the
change of the run's metric when every edge into it is corrupted at once, measured with the
edge-masked forward (:class:`~pathdb.evaluate.masked.MaskedEvaluator`) on the run's own search
prompts with the run's metric and patch (one masked forward per receiver input, batched). The sign
is the path scores': positive when the input's senders together support the behaviour. Evaluation
prompts are never used, so the rule fits nothing on the prompts that judge it.
"""

from __future__ import annotations

from typing import Any

import duckdb
import numpy as np
import pandas as pd

from pathdb.evaluate.masked import PATCH_INTERVENTION, MaskedEvaluator
from pathdb.evaluate.session import _stored_prompts
from pathdb.query import edge_runs
from pathdb.query.aggregate import edges
from pathdb.query.common import resolve_run


def receiver_effects(evaluator: MaskedEvaluator) -> dict[str, float]:
    """Each receiver input's group effect ``m(all its incoming edges corrupted) - m(full circuit)``
    on the evaluator's prompts, keyed by its EAP-IG name (``a1.h2<k>``, ``m3``, ``logits``)."""
    graph = evaluator.graph
    real = graph.real()
    cols = sorted({b for _, _, b in graph.spec.edges})
    masks = [real]
    for b in cols:
        m = real.copy()
        m[:, b] = False
        masks.append(m)
    values = evaluator.metric_values(np.stack(masks))
    return {
        graph.spec.backward[b]: float(v - values[0]) for b, v in zip(cols, values[1:], strict=True)
    }


def search_evaluator(con: duckdb.DuckDBPyConnection, run: int | str, model: Any) -> MaskedEvaluator:
    """The masked evaluator of ``run``'s own stored prompts, metric and patch (as an intervention)."""
    info = resolve_run(con, run)
    patch, metric = con.execute(
        "SELECT patch_type, metric FROM runs WHERE run_id = ?", [info.run_id]
    ).fetchall()[0]
    prompts = _stored_prompts(con, info.run_id, info.name, model)
    return MaskedEvaluator(
        model, prompts, str(metric), PATCH_INTERVENTION.get(str(patch), "counterfactual")
    )


def group_edges(con: duckdb.DuckDBPyConnection, run: int | str, model: Any) -> pd.DataFrame:
    """The run's position-free edges under the ``group`` rule (group effects on its search prompts);
    an edge-score run (``pathdb attribute``) keeps its stored scores."""
    if edge_runs.edge_runs(con, run) is not None:
        return edges(con, run, positional=False, rule="effect")
    return edges(
        con, run, rule="group", effects=receiver_effects(search_evaluator(con, run, model))
    )
