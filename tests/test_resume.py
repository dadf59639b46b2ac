"""Interrupting any strategy after a few checkpoints and resuming gives the uninterrupted result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, resume_search, run_loaded
from tests.interrupts import interrupt_on_checkpoint

EVERY_STEP = 1e-9  # checkpoint at every opportunity (0 is refused as an interval)


def _paths(
    db: Path, name: str
) -> dict[tuple[int | None, str], tuple[float | None, bool, str, bool]]:
    """Every stored path of a run keyed by (prompt, node chain): score, kept, method, complete."""
    with open_store(db, read_only=True) as store:
        rows = store.con.execute(
            "SELECT p.prompt_idx, s.path, p.contribution, p.kept, p.method, p.complete FROM v_path_strings s "
            "JOIN paths p USING (run_id, path_id) JOIN runs r USING (run_id) WHERE r.name = ?",
            [name],
        ).fetchall()
    out = {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in rows}
    assert len(out) == len(rows), "a path was stored twice"
    return out


def _status(db: Path, name: str) -> str:
    with open_store(db, read_only=True) as store:
        (status,) = store.con.execute("SELECT status FROM runs WHERE name = ?", [name]).fetchone()  # type: ignore[misc]
    return str(status)


@pytest.fixture(scope="module")
def toy():  # type: ignore[no-untyped-def]
    model = load("toy-ioi-2l")
    return model, load_prompts("toy-ioi-small", model)


def test_double_interruption_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy
) -> None:  # type: ignore[no-untyped-def]
    """Interrupted, resumed and interrupted again: the second resume must not re-expand paths
    the first resume already committed (the committed frontier is tracked across resumes)."""
    model, prompts = toy
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts="toy-ioi-small",
        params=SearchParams(min_contribution=0.02, checkpoint_every=EVERY_STEP),
    )
    db = tmp_path / "s.duckdb"
    full = run_loaded(req, model, prompts, db, run_name="full", quiet=True)
    interrupt_on_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    monkeypatch.undo()
    interrupt_on_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        resume_search("r", db, quiet=True)
    monkeypatch.undo()
    assert _status(db, "r") == "interrupted"
    res = resume_search("r", db, quiet=True)
    assert res.n_evaluated == full.n_evaluated
    assert _paths(db, "r") == _paths(db, "full")


@pytest.mark.parametrize(
    "interval", [EVERY_STEP, 3600.0], ids=["commit-every-checkpoint", "deferred-group-commits"]
)
def test_per_prompt_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy, interval: float
) -> None:  # type: ignore[no-untyped-def]
    model, prompts = toy
    params = SearchParams(min_contribution=0.05, checkpoint_every=interval)
    req = SearchRequest(
        model="toy-ioi-2l", prompts="toy-ioi-small", params=params, prompt_mode="per-prompt"
    )
    db = tmp_path / "s.duckdb"
    reference = run_loaded(
        dataclasses.replace(req, params=dataclasses.replace(params, checkpoint_every=EVERY_STEP)),
        model, prompts, db, run_name="full", quiet=True,
    )  # fmt: skip
    whole = run_loaded(req, model, prompts, db, run_name="whole", quiet=True)
    assert whole.n_evaluated == reference.n_evaluated
    assert _paths(db, "whole") == _paths(db, "full")  # deferring group commits loses nothing
    interrupt_on_checkpoint(monkeypatch, 40)  # inside a later prompt group
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    monkeypatch.undo()
    assert _status(db, "r") == "interrupted"
    resume_search("r", db, quiet=True)
    assert _paths(db, "r") == _paths(db, "full")


@pytest.mark.parametrize(
    "params",
    [
        SearchParams(min_contribution=0.02),
        SearchParams(strategy="best-first", top_n=25),
        SearchParams(strategy="level-width", max_width=15, method="attribution"),
        SearchParams(strategy="best-first", top_n=20, batch_heads=True),
    ],
    ids=["threshold", "best-first", "level-width", "best-first-screens"],
)
def test_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params: SearchParams
) -> None:
    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts="toy-ioi-small",
        params=dataclasses.replace(params, checkpoint_every=EVERY_STEP),
    )
    db = tmp_path / "s.duckdb"
    full = run_loaded(req, model, prompts, db, run_name="full", quiet=True)

    interrupt_on_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    monkeypatch.undo()
    with open_store(db, read_only=True) as store:
        (status,) = store.con.execute("SELECT status FROM runs WHERE name = 'r'").fetchone()  # type: ignore[misc]
    assert status == "interrupted"
    partial = _paths(db, "r")
    assert 0 < len(partial) < full.n_evaluated + 1

    res = resume_search("r", db, quiet=True)
    assert res.status == "completed"
    assert res.n_evaluated == full.n_evaluated
    assert _paths(db, "r") == _paths(db, "full")
