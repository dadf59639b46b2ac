"""Set up the evaluation of a stored run: its model (checked against the stored fingerprint), its
metric, the intervention matching its ``--patch``, and the evaluation prompts.

Evaluation prompts: ``prompts`` when given; otherwise the bundled held-out set of a bundled search
set (:data:`pathdb.evaluate.heldout.DEFAULT_HELDOUT`); otherwise the run's own stored prompts,
with a warning (a circuit judged on the prompts it was found on looks better than it is).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb

from pathdb.evaluate.heldout import DEFAULT_HELDOUT
from pathdb.evaluate.masked import PATCH_INTERVENTION, EvaluationError, MaskedEvaluator
from pathdb.prompts import PromptSet, load_prompts, parse_prompts
from pathdb.query.common import resolve_run


@dataclass
class EvalSetup:
    """What :func:`setup` prepared: the evaluator, where its prompts came from, and a warning."""

    evaluator: MaskedEvaluator
    prompts: str
    heldout: bool
    warning: str | None


def _stored_prompts(
    con: duckdb.DuckDBPyConnection, run_id: int, name: str, model: Any
) -> PromptSet:
    """The run's own prompts, rebuilt from the ``prompts`` table."""
    rows = con.execute(
        "SELECT clean, counterfactual, target, cf_target, roles FROM prompts WHERE run_id = ? ORDER BY prompt_idx",
        [run_id],
    ).fetchall()
    if not rows:
        raise EvaluationError(f"run {name!r} stored no prompts; pass --prompts FILE")
    keys = ("clean", "counterfactual", "target", "cf_target", "roles")
    lines = [
        json.dumps({k: v for k, v in zip(keys, r, strict=True) if v is not None}) for r in rows
    ]
    return parse_prompts(
        "\n".join(lines), model, f"run {name!r} prompts", require_equal_length=False
    )


def setup(
    con: duckdb.DuckDBPyConnection,
    run: int | str,
    *,
    prompts: str | None = None,
    intervention: str | None = None,
    device: str | None = "auto",
    model: Any = None,
) -> EvalSetup:
    """Load the run's model (or use ``model``) and build the evaluator on the evaluation prompts."""
    from pathdb.models import fingerprint, load

    info = resolve_run(con, run)
    params_json, fp, patch_type, metric = con.execute(
        "SELECT params, model_fingerprint, patch_type, metric FROM runs WHERE run_id = ?",
        [info.run_id],
    ).fetchall()[0]
    params = json.loads(params_json) if isinstance(params_json, str) else dict(params_json)
    if model is None:
        model = load(
            str(params.get("model") or info.model_name), device=device, dtype=params.get("dtype")
        )
    if fingerprint(model) != fp:
        raise EvaluationError(
            f"the weights of model {info.model_name!r} differ from those run {info.name!r} searched "
            "(fingerprint mismatch); evaluate with the same checkpoint"
        )
    search_set = params.get("prompts")
    warning = None
    if prompts is None and search_set in DEFAULT_HELDOUT:
        source, heldout = DEFAULT_HELDOUT[str(search_set)], True
        prompt_set = load_prompts(source, model, require_equal_length=False)
    elif prompts is None:
        source, heldout = f"run {info.name!r} prompts", False
        prompt_set = _stored_prompts(con, info.run_id, info.name, model)
    else:
        source, heldout = prompts, prompts != search_set
        prompt_set = load_prompts(prompts, model, require_equal_length=False)
    if not heldout:
        warning = (
            f"evaluating run {info.name!r} on the prompts it was searched on: faithfulness there "
            "overstates how well the circuit generalises; pass --prompts FILE with held-out prompts"
        )
    iv = intervention or PATCH_INTERVENTION.get(str(patch_type), "counterfactual")
    evaluator = MaskedEvaluator(model, prompt_set, str(metric), iv)
    return EvalSetup(evaluator, source, heldout, warning)
