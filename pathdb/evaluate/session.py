"""Set up the evaluation of a stored run: its model (checked against the stored fingerprint), its
metric, the intervention matching its ``--patch``, and the evaluation prompts.

Evaluation prompts: ``prompts`` when given; otherwise the bundled held-out set of a bundled search
set (:data:`pathdb.evaluate.heldout.DEFAULT_HELDOUT`); otherwise the run's own stored prompts,
with a warning (a circuit judged on the prompts it was found on looks better than it is).
Positional evaluation (``positional=True``, :mod:`pathdb.evaluate.positional`) defaults to the
run's own prompts (positions belong to their template) and needs prompts of the run's length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb

from pathdb.evaluate.heldout import DEFAULT_HELDOUT
from pathdb.evaluate.masked import PATCH_INTERVENTION, EvaluationError, MaskedEvaluator
from pathdb.evaluate.positional import PositionalEvaluator
from pathdb.prompts import PromptSet, load_prompts, parse_prompts
from pathdb.query.common import resolve_run


@dataclass
class EvalSetup:
    """What :func:`setup` prepared: the evaluator, where its prompts came from, and a warning."""

    evaluator: MaskedEvaluator | PositionalEvaluator
    prompts: str
    heldout: bool
    warning: str | None


def stored_prompts(con: duckdb.DuckDBPyConnection, run_id: int, name: str, model: Any) -> PromptSet:
    """The prompts run ``run_id`` (named ``name`` in errors) was searched on, rebuilt from the
    ``prompts`` table and tokenized by ``model``: its default evaluation set when no held-out set
    exists, and where the ``group`` rule measures group effects (:mod:`pathdb.evaluate.groups`)."""
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


def positional_length(con: duckdb.DuckDBPyConnection, run: int | str) -> int:
    """The number of positions of a positional path run's circuits; refuses (one line each)
    edge runs, position-free runs, role-aligned runs and a root that is not the last token."""
    info = resolve_run(con, run)
    kind, positional, root = con.execute(
        'SELECT kind, "positional", root_position FROM runs WHERE run_id = ?', [info.run_id]
    ).fetchall()[0]
    if kind != "paths":
        raise EvaluationError(
            f"run {info.name!r} is an edge-score run (pathdb attribute): its scores are "
            "position-free, so it has no positional circuits; drop --positional"
        )
    if not positional:
        raise EvaluationError(
            f"run {info.name!r} is a position-free path run: it has no positional circuits; drop "
            "--positional (or search again with --positional)"
        )
    roles = con.execute("SELECT count(*) FROM positions WHERE run_id = ?", [info.run_id]).fetchall()
    if roles[0][0]:
        raise EvaluationError(
            f"run {info.name!r} uses role-aligned positions (prompts of different lengths), which "
            "positional evaluation does not implement; drop --positional to evaluate it position-free"
        )
    lengths = con.execute(
        "SELECT DISTINCT len(tokens) FROM prompts WHERE run_id = ?", [info.run_id]
    ).fetchall()
    if len(lengths) != 1 or root != lengths[0][0] - 1:
        raise EvaluationError(
            f"run {info.name!r}: positional evaluation reads the metric at the last token, but the "
            f"run's root position is {root}; drop --positional to evaluate it position-free"
        )
    return int(lengths[0][0])


def run_model(
    con: duckdb.DuckDBPyConnection,
    run: int | str,
    *,
    device: str | None = "auto",
    model: Any = None,
) -> Any:
    """The run's model (loaded as it was searched, or ``model``), checked against the stored fingerprint."""
    from pathdb.models import fingerprint, load

    info = resolve_run(con, run)
    params_json, fp = con.execute(
        "SELECT params, model_fingerprint FROM runs WHERE run_id = ?", [info.run_id]
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
    return model


def setup(
    con: duckdb.DuckDBPyConnection,
    run: int | str,
    *,
    prompts: str | None = None,
    intervention: str | None = None,
    device: str | None = "auto",
    model: Any = None,
    positional: bool = False,
) -> EvalSetup:
    """Load the run's model (or use ``model``) and build the evaluator on the evaluation prompts
    (``positional``: the per-position evaluator of a positional path run's circuits)."""
    info = resolve_run(con, run)
    n_positions = positional_length(con, run) if positional else 0
    params_json, patch_type, metric = con.execute(
        "SELECT params, patch_type, metric FROM runs WHERE run_id = ?", [info.run_id]
    ).fetchall()[0]
    params = json.loads(params_json) if isinstance(params_json, str) else dict(params_json)
    model = run_model(con, run, device=device, model=model)
    search_set = params.get("prompts")
    warning = None
    if prompts is None and search_set in DEFAULT_HELDOUT and not positional:
        source, heldout = DEFAULT_HELDOUT[str(search_set)], True
        prompt_set = load_prompts(source, model, require_equal_length=False)
    elif prompts is None:
        source, heldout = f"run {info.name!r} prompts", False
        prompt_set = stored_prompts(con, info.run_id, info.name, model)
    else:
        source, heldout = prompts, prompts != search_set
        prompt_set = load_prompts(prompts, model, require_equal_length=False)
    if not heldout:
        warning = (
            f"evaluating run {info.name!r} on the prompts it was searched on: faithfulness there "
            "overstates how well the circuit generalises; pass --prompts FILE with held-out prompts"
        )
    iv = intervention or PATCH_INTERVENTION.get(str(patch_type), "counterfactual")
    evaluator: MaskedEvaluator | PositionalEvaluator
    evaluator = MaskedEvaluator(model, prompt_set, str(metric), iv)
    if positional:
        evaluator = PositionalEvaluator(evaluator, n_positions)
    return EvalSetup(evaluator, source, heldout, warning)
