"""The runner records every evaluated path in the store, and stored paths re-score to their values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pathdb.store.db import open_store
from pathdb.store.reader import iter_paths, run_nodes
from search import SearchParams, SearchRequest, find_paths, run_loaded
from search.runner import SearchError
from search.scorer import build_scorer
from tests.search_fixtures import random_model, random_prompt_set


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    model = random_model()
    return model, random_prompt_set(17, 3, 4, seed=5)


@pytest.mark.parametrize(
    "params",
    [
        SearchParams(min_contribution=0.02),
        SearchParams(min_contribution=0.02, method="attribution"),
        SearchParams(strategy="best-first", top_n=5),
        SearchParams(strategy="level-width", max_width=4, method="attribution"),
        SearchParams(min_contribution=0.02, batch_heads=True, batch_positions=True),
    ],
    ids=["threshold-exact", "threshold-attr", "best-first", "level-width-attr", "screens"],
)
def test_every_evaluated_path_is_stored_and_rescores(
    tmp_path: Path, setup, params: SearchParams
) -> None:  # type: ignore[no-untyped-def]
    model, ps = setup
    req = SearchRequest(model="random", prompts="random", metric="logit_difference", params=params)
    res = run_loaded(req, model, ps, tmp_path / "s.duckdb", run_name="r", quiet=True)
    assert res.status == "completed"
    mem = find_paths(model, ps, params)  # an independent in-memory run of the same search
    scorer = build_scorer(model, ps)
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        tbl = iter_paths(store, res.run_id).to_pylist()
        nodes = run_nodes(store, res.run_id)
        (n_eval,) = store.con.execute(
            "SELECT n_evaluated FROM runs WHERE run_id = ?", [res.run_id]
        ).fetchone()  # type: ignore[misc]
    # engine count == rows (the root row is not an evaluation)
    assert res.n_evaluated == n_eval == len(tbl) - 1 == len(mem) - 1
    stored = {tuple(nodes[n] for n in r["node_ids"]): r for r in tbl}
    want = {e.path: e for e in mem}
    assert set(stored) == set(want)
    for path, r in stored.items():
        e = want[path]
        assert r["kept"] == e.kept and r["complete"] == e.complete and r["method"] == e.method
        if r["depth"] == 0:
            continue
        assert math.isclose(r["contribution"], e.contribution, rel_tol=1e-12, abs_tol=1e-15)
        if r["method"] in ("exact", "confirmed"):  # re-score the stored node sequence from scratch
            again = float(scorer.exact.score_paths([path]).mean[0])
            assert math.isclose(again, r["contribution"], rel_tol=1e-9, abs_tol=1e-12)


def test_store_kept_drops_pruned_rows_but_counts_them(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    model, ps = setup
    params = SearchParams(min_contribution=0.02)
    full = run_loaded(
        SearchRequest(params=params), model, ps, tmp_path / "a.duckdb", run_name="all", quiet=True
    )
    req = SearchRequest(params=params, store_level="kept")
    kept = run_loaded(req, model, ps, tmp_path / "b.duckdb", run_name="kept", quiet=True)
    assert kept.n_evaluated == full.n_evaluated
    with (
        open_store(tmp_path / "a.duckdb", read_only=True) as a,
        open_store(tmp_path / "b.duckdb", read_only=True) as b,
    ):
        n_all_kept = a.con.execute("SELECT count(*) FROM paths WHERE kept").fetchone()[0]  # type: ignore[index]
        rows_b, unkept_b = b.con.execute(
            "SELECT count(*), count(*) FILTER (NOT kept) FROM paths"
        ).fetchone()  # type: ignore[misc]
    assert rows_b == n_all_kept and unkept_b == 0


def test_per_prompt_mode_tags_each_prompt(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    model, ps = setup
    req = SearchRequest(params=SearchParams(min_contribution=0.05), prompt_mode="per-prompt")
    res = run_loaded(req, model, ps, tmp_path / "s.duckdb", run_name="pp", quiet=True)
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        rows = store.con.execute(
            "SELECT prompt_idx, count(*) FROM paths WHERE run_id = ? GROUP BY ALL ORDER BY 1",
            [res.run_id],
        ).fetchall()
    assert [r[0] for r in rows] == [0, 1, 2]
    # each prompt's paths equal a batch search on that prompt alone
    for i in range(3):
        mem = find_paths(model, ps.subset(i), SearchParams(min_contribution=0.05))
        assert rows[i][1] == len(mem)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"prompt_mode": "sideways"}, "--prompt-mode"),
        ({"store_level": "some"}, "--store"),
        ({"patch_type": "blur"}, "--patch"),
        ({"metric": "accuracy"}, "unknown metric"),
        ({"params": SearchParams(strategy="best-first", top_n=0)}, "top_n"),
        ({"params": SearchParams(batch_positions=True), "positional": False}, "positional root"),
        ({"patch_type": "mean", "prompt_mode": "per-prompt"}, "mean patching"),
    ],
)
def test_bad_requests_write_nothing(tmp_path: Path, setup, kw, fragment: str) -> None:  # type: ignore[no-untyped-def]
    model, ps = setup
    db = tmp_path / "s.duckdb"
    with pytest.raises(SearchError, match=fragment):
        run_loaded(SearchRequest(**kw), model, ps, db, quiet=True)
    assert not db.exists()


def test_duplicate_run_name_is_refused_and_replace_overwrites(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    model, ps = setup
    db = tmp_path / "s.duckdb"
    req = SearchRequest(params=SearchParams(min_contribution=0.05))
    first = run_loaded(req, model, ps, db, run_name="x", quiet=True)
    with pytest.raises(SearchError, match="already exists"):
        run_loaded(req, model, ps, db, run_name="x", quiet=True)
    again = run_loaded(req, model, ps, db, run_name="x", replace=True, quiet=True)
    assert again.n_evaluated == first.n_evaluated
    with open_store(db, read_only=True) as store:
        assert store.con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1  # type: ignore[index]
