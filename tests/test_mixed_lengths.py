"""Position-free batch searches over prompts of different token lengths (issue 10, items 1-2).

A batch score must be the mean of the per-prompt scores over the whole set, whatever the
lengths: checked against every prompt scored on its own, for both methods and two patchings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, resume_search, run_loaded
from search.api import find_paths
from search.scorer import LengthGroupedScorer, PromptScorer, build_scorer
from tests.cli_process import ROOT
from tests.interrupts import interrupt_on_checkpoint

LARGE = ROOT / "pathdb" / "data" / "prompts" / "toy-ioi-large.jsonl"


@pytest.fixture(scope="module")
def mixed() -> tuple[Any, PromptSet]:
    """Two prompts of each length 15-18 from the bundled toy-ioi-large set, interleaved."""
    model = load("toy-ioi-2l")
    every = load_prompts("toy-ioi-large", model, require_equal_length=False)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(every.lengths.tolist()):
        by_len.setdefault(int(n), []).append(i)
    picked = [ix[j] for j in range(2) for _, ix in sorted(by_len.items())]
    assert len({int(every.lengths[i]) for i in picked}) == 4
    return model, every.select(picked)


@pytest.mark.parametrize("method", ["exact", "attribution"])
@pytest.mark.parametrize("patch_type", ["counterfactual", "zero"])
def test_batch_score_is_the_mean_of_per_prompt_scores(
    mixed: tuple[Any, PromptSet], method: str, patch_type: str
) -> None:
    model, prompts = mixed
    params = SearchParams(method=method, min_contribution=0.2)  # type: ignore[arg-type]
    paths = find_paths(model, prompts, params, patch_type=patch_type, positional=False)
    scored = [p for p in paths if len(p.path) > 1]
    assert any(p.complete for p in scored) and any(not p.complete for p in scored)
    singles = [
        build_scorer(model, prompts.subset(i), patch_type=patch_type, positional=False)
        for i in range(len(prompts))
    ]
    for p in random.Random(1).sample(scored, min(25, len(scored))):
        head, tail = [p.path[0]], p.path[1:]
        if p.method == "attribution":
            per_prompt = [s.expand_attribution(tail, head)[0] for s in singles]
        else:
            per_prompt = [s.expand_exact(tail, head)[0] for s in singles]
        assert p.contribution == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-5), p.path


def test_groups_are_batched_and_weighted(mixed: tuple[Any, PromptSet]) -> None:
    model, prompts = mixed
    grouped = build_scorer(model, prompts, positional=False)
    assert isinstance(grouped, LengthGroupedScorer)
    assert [g.cache.shape.n_positions for g in grouped.groups] == [15, 16, 17, 18]
    assert grouped.weights.tolist() == [0.25] * 4
    equal = build_scorer(model, prompts.by_length()[0][1], positional=False)
    assert isinstance(equal, PromptScorer)  # equal lengths keep the single-batch path


def test_refusals_name_the_fix(mixed: tuple[Any, PromptSet], tmp_path: Path) -> None:
    model, prompts = mixed
    no_roles = tmp_path / "no-roles.jsonl"
    lines = [json.loads(s) for s in LARGE.read_text().splitlines()]
    no_roles.write_text(
        "\n".join(json.dumps({k: v for k, v in x.items() if k != "roles"}) for x in lines)
    )
    with pytest.raises(ValueError, match=r'add "roles".*--no-positional'):
        build_scorer(model, load_prompts(no_roles, model), positional=True)
    assert isinstance(
        build_scorer(model, prompts, positional=False, patch_type="mean"), LengthGroupedScorer
    )
    db = tmp_path / "s.duckdb"
    res = CliRunner().invoke(
        app, ["search", "-m", "toy-ioi-2l", "-p", str(no_roles), "--db", str(db)]
    )
    assert res.exit_code == 2 and "--no-positional" in res.output and "Traceback" not in res.output
    assert not db.exists()


def test_cli_mixed_batch_search_runs(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    args = ["search", "-m", "toy-ioi-2l", "-p", "toy-ioi-large", "--no-positional", "-t", "0.3"]
    res = CliRunner().invoke(app, [*args, "-q", "-n", "mixed", "--db", str(db)])
    assert res.exit_code == 0, res.output
    with open_store(db, read_only=True) as store:
        lengths = store.con.execute(
            "SELECT DISTINCT len(tokens) FROM prompts ORDER BY 1"
        ).fetchall()
    assert [n for (n,) in lengths] == [15, 16, 17, 18]


def test_resume_of_a_mixed_run_equals_uninterrupted(
    mixed: tuple[Any, PromptSet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, prompts = mixed
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts="toy-ioi-large",
        positional=False,
        params=SearchParams(min_contribution=0.1, checkpoint_every=1e-9),
    )
    db = tmp_path / "s.duckdb"
    full = run_loaded(req, model, prompts, db, run_name="full", quiet=True)
    interrupt_on_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    monkeypatch.undo()
    res = resume_search("r", db, quiet=True)
    assert res.status == "completed" and res.n_evaluated == full.n_evaluated
    with open_store(db, read_only=True) as store:
        rows = store.con.execute(
            "SELECT r.name, s.path, s.contribution FROM v_path_strings s JOIN runs r USING (run_id)"
        ).fetchall()
    by_run: dict[str, dict[str, float]] = {}
    for name, path, score in rows:
        by_run.setdefault(name, {})[path] = score
    assert by_run["r"] == by_run["full"]
