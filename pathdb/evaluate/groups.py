"""Group effects of receiver inputs, for the ``group`` edge rule (:func:`pathdb.query.aggregate.group_rule`).

A receiver input (a head's q, k or v input, an MLP input, the logits) has a *group effect*: the
change of the run's metric when every edge into it is corrupted at once, measured with the
edge-masked forward (:class:`~pathdb.evaluate.masked.MaskedEvaluator`) on the run's own search
prompts with the run's metric and patch. Its numbers are computed as activation patches: with all
its edges corrupted a receiver input reads its empty-circuit value while everything upstream stays
clean, so one empty-circuit masked forward captures every input and each layer's receivers run
batched from that layer's clean residual stream (:meth:`MaskedEvaluator.group_values`). The sign
is the path scores': positive when the input's senders together support the behaviour. Evaluation
prompts are never used, so the rule fits nothing on the prompts that judge it.

A completing search measures them (:func:`search_group_effects`, it has the model then) and the
store keeps them (:mod:`pathdb.store.effects`), so ``group`` is the default edge rule of export,
evaluate and compare for such runs (:func:`pathdb.store.effects.default_edge_rule`) without loading the model; a run without
stored effects defaults to ``effect``, and ``group`` on it measures them with the model.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd
import torch

from pathdb.arch import UnsupportedModelError
from pathdb.evaluate.masked import PATCH_INTERVENTION, EvaluationError, MaskedEvaluator
from pathdb.evaluate.refine import refined_scores
from pathdb.evaluate.session import run_model, stored_prompts
from pathdb.prompts import PromptSet
from pathdb.query import edge_runs
from pathdb.query.aggregate import edges
from pathdb.query.common import resolve_run
from pathdb.store.effects import EdgeRule, stored_group_effects, stored_refined


def receiver_effects(evaluator: MaskedEvaluator) -> dict[str, float]:
    """Each receiver input's group effect ``m(all its incoming edges corrupted) - m(full circuit)``
    on the evaluator's prompts, keyed by its EAP-IG name (``a1.h2<k>``, ``m3``, ``logits``):
    :meth:`~pathdb.evaluate.masked.MaskedEvaluator.group_values`, the masked forwards' numbers
    as activation patches of the receiver inputs."""
    graph = evaluator.graph
    full, values = evaluator.group_values()
    cols = sorted({b for _, _, b in graph.spec.edges})
    return {graph.spec.backward[b]: float(values[b] - full) for b in cols}


#: what keeps a completing search from measuring its edge-rule inputs (it then completes without)
NOT_MEASURED = (EvaluationError, UnsupportedModelError, torch.cuda.OutOfMemoryError)


def search_group_effects(
    model: Any, prompts: PromptSet, metric: str, patch_type: str
) -> tuple[dict[str, float], MaskedEvaluator] | None:
    """The group effects a completing search stores: :func:`receiver_effects` on its search
    prompts with its metric and ``--patch`` (as an intervention), with the evaluator that measured
    them (the refinement, :mod:`pathdb.evaluate.refine`, reuses it); None where the edge-masked
    forward does not run (a TransformerLens 4 model, an architecture it does not implement, out of
    GPU memory), so that the search still completes and the run falls back to the effect rule."""
    try:
        evaluator = MaskedEvaluator(
            model, prompts, metric, PATCH_INTERVENTION.get(patch_type, "counterfactual")
        )
        return receiver_effects(evaluator), evaluator
    except NOT_MEASURED:
        return None


def search_evaluator(con: duckdb.DuckDBPyConnection, run: int | str, model: Any) -> MaskedEvaluator:
    """The masked evaluator of ``run``'s own stored prompts, metric and patch (as an intervention)."""
    info = resolve_run(con, run)
    patch, metric = con.execute(
        "SELECT patch_type, metric FROM runs WHERE run_id = ?", [info.run_id]
    ).fetchall()[0]
    prompts = stored_prompts(con, info.run_id, info.name, model)
    return MaskedEvaluator(
        model, prompts, str(metric), PATCH_INTERVENTION.get(str(patch), "counterfactual")
    )


def run_effects(
    con: duckdb.DuckDBPyConnection, run: int | str, model: Any = None
) -> dict[str, float]:
    """``run``'s group effects: the stored ones, else measured with ``model`` (loaded as the run
    was searched, and checked against its fingerprint, when None) on its search prompts."""
    stored = stored_group_effects(con, resolve_run(con, run).run_id)
    if stored:
        return stored
    return receiver_effects(search_evaluator(con, run, model or run_model(con, run)))


def rule_inputs(
    con: duckdb.DuckDBPyConnection, run: int | str, rule: str, model: Any = None
) -> EdgeRule:
    """``rule`` with the inputs it needs for ``run``: the stored ones, else measured with ``model``
    (loaded as the run was searched when None) on its search prompts, i.e. the group effects of
    ``group`` (:func:`run_effects`) and also the refined top-edge scores of ``refined``
    (:func:`pathdb.evaluate.refine.refined_scores`)."""
    if rule not in ("group", "refined"):
        return EdgeRule(rule)
    run_id = resolve_run(con, run).run_id
    stored = stored_refined(con, run_id) if rule == "refined" else None
    if rule == "group" or stored:
        return EdgeRule(rule, run_effects(con, run, model), stored)
    evaluator = search_evaluator(con, run, model or run_model(con, run))  # one for both inputs
    effects = stored_group_effects(con, run_id) or receiver_effects(evaluator)
    return EdgeRule(rule, effects, refined_scores(con, run_id, evaluator, effects))


def rule_edges(
    con: duckdb.DuckDBPyConnection, run: int | str, rule: str, model: Any = None
) -> pd.DataFrame:
    """The run's position-free edges under ``rule`` with its inputs (:func:`rule_inputs`); an
    edge-score run (``pathdb attribute``) keeps its stored scores."""
    if edge_runs.edge_runs(con, run) is not None:
        return edges(con, run, positional=False, rule="effect")
    _, effects, refined = rule_inputs(con, run, rule, model)
    return edges(con, run, rule=rule, effects=effects, refined=refined)
