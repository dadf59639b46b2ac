"""Interrupting any strategy after a few checkpoints and resuming gives the uninterrupted result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, resume_search, run_loaded
from search.strategies import SearchRun


def _paths(db: Path, name: str) -> dict[str, tuple[float | None, bool, str, bool]]:
    with open_store(db, read_only=True) as store:
        rows = store.con.execute(
            "SELECT s.path, p.contribution, p.kept, p.method, p.complete FROM v_path_strings s "
            "JOIN paths p USING (run_id, path_id) JOIN runs r USING (run_id) WHERE r.name = ?",
            [name],
        ).fetchall()
    out = {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}
    assert len(out) == len(rows), "a path was stored twice"
    return out


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
def test_resume_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params: SearchParams) -> None:
    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    req = SearchRequest(model="toy-ioi-2l", prompts="toy-ioi-small", params=dataclasses.replace(params, checkpoint_every=0.0))
    db = tmp_path / "s.duckdb"
    full = run_loaded(req, model, prompts, db, run_name="full", quiet=True)

    calls = {"n": 0}
    original = SearchRun._maybe_checkpoint

    def interrupt_on_third(self: SearchRun, frontier: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, frontier)  # type: ignore[arg-type]

    monkeypatch.setattr(SearchRun, "_maybe_checkpoint", interrupt_on_third)
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
