"""``pathdb merge``: stores written apart merge into one equal to a store that ran everything,
without duplicates on a second merge; bad inputs and outputs are refused in one line."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import duckdb
import pytest

from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store, stamp
from pathdb.store.errors import StoreError
from pathdb.store.merge import merge_stores
from search import SearchParams, SearchRequest, resume_search, run_loaded
from tests.cli_process import pathdb
from tests.interrupts import interrupt_on_checkpoint

BATCH = SearchRequest(
    model="toy-ioi-2l", prompts="toy-ioi-small", params=SearchParams(min_contribution=0.2)
)
PER_PROMPT = SearchRequest(
    model="toy-ioi-2l",
    prompts="toy-ioi-small",
    prompt_mode="per-prompt",
    params=SearchParams(min_contribution=0.3),
)


def _add_evaluation(db: Path, run: str, score: float) -> None:
    """A faithfulness evaluation row with two curve points (ids 1 in every store: they collide)."""
    with open_store(db) as store:
        store.con.execute(
            "INSERT INTO evaluations (evaluation_id, run_id, created_at, prompts, heldout, n_prompts, "
            "intervention, metric, score, n_edges_total, m_full, m_empty, package_version) "
            "SELECT coalesce(max(evaluation_id), 0) + 1, (SELECT run_id FROM runs WHERE name = ?), "
            "now()::TIMESTAMP, 'toy-ioi-small', false, 3, 'counterfactual', 'logit-diff', 'score', 10, ?, 0, 'x' "
            "FROM evaluations",
            [run, score],
        )
        store.con.execute(
            "INSERT INTO evaluation_points SELECT max(evaluation_id), k, 'signed', k, NULL, k, ?, 0.5, 'user' "
            "FROM evaluations, range(2) t(k) GROUP BY k",
            [score],
        )


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Store A ran ``a`` (batch), store B ran ``b`` (per-prompt), store C ran both."""
    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    d = tmp_path_factory.mktemp("merge")
    out = {k: d / f"{k}.duckdb" for k in "ABC"}
    for db, runs in ((out["A"], ["a"]), (out["B"], ["b"]), (out["C"], ["a", "b"])):
        for name in runs:
            run_loaded(
                BATCH if name == "a" else PER_PROMPT, model, prompts, db, run_name=name, quiet=True
            )
            _add_evaluation(db, name, 1.0 if name == "a" else 2.0)
    return out


def _content(db: Path) -> dict[str, object]:
    """Everything a run holds, keyed by run name and label strings (never by ids)."""
    con = duckdb.connect(str(db), read_only=True)
    try:

        def q(sql: str) -> list[tuple[object, ...]]:
            return sorted(con.execute(sql).fetchall(), key=repr)

        return {
            "paths": q(
                "SELECT r.name, s.prompt_idx, s.path, s.contribution, s.depth, s.complete, s.kept, s.method "
                "FROM v_path_strings s JOIN runs r USING (run_id)"
            ),
            "prompts": q(
                "SELECT r.name, p.* EXCLUDE (run_id) FROM prompts p JOIN runs r USING (run_id)"
            ),
            "nodes": q(
                "SELECT r.name, n.label, n.component FROM nodes n JOIN runs r USING (run_id)"
            ),
            "runs": q(
                "SELECT name, status, model_fingerprint, n_evaluated, n_complete, n_kept, prompt_mode FROM runs"
            ),
            "evaluations": q(
                "SELECT r.name, e.m_full, p.point, p.metric FROM evaluations e JOIN runs r USING (run_id) "
                "JOIN evaluation_points p USING (evaluation_id)"
            ),
        }
    finally:
        con.close()


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_merge_equals_one_store_that_ran_both(stores: dict[str, Path], tmp_path: Path) -> None:
    """Merging A and B (CLI) gives C's paths, scores, prompts, nodes and evaluations; inputs untouched."""
    before = {k: _digest(stores[k]) for k in "AB"}
    out = tmp_path / "m.duckdb"
    res = pathdb("merge", str(out), str(stores["A"]), str(stores["B"]), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2 run(s) merged" in res.stdout
    assert _content(out) == _content(stores["C"])
    assert {k: _digest(stores[k]) for k in "AB"} == before
    with duckdb.connect(str(out), read_only=True) as con:
        ids = con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()
        evs = con.execute("SELECT evaluation_id FROM evaluations ORDER BY 1").fetchall()
    with duckdb.connect(str(out)) as con:
        nxt = con.execute("SELECT nextval('runs_run_id_seq')").fetchall()
    # remapped: both inputs had run 1 and evaluation 1
    assert ids == [(1,), (2,)] and evs == [(1,), (2,)]
    assert nxt[0][0] > 2  # a later search in the merged store gets a fresh id


def test_merging_twice_adds_nothing_and_renames_a_different_run(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    """A second merge of the same stores adds nothing; another run named ``a`` becomes ``a@C``."""
    out = tmp_path / "m.duckdb"
    merge_stores(out, [stores["A"], stores["B"]])
    first = _content(out)
    reports = merge_stores(out, [stores["A"], stores["B"], stores["A"]])
    assert [r.added for r in reports] == [[], [], []]
    assert [r.skipped for r in reports] == [["a"], ["b"], ["a"]]
    assert _content(out) == first
    # C's runs are different runs (created at other times)
    (rep,) = merge_stores(out, [stores["C"]])
    assert rep.renamed == {"a": "a@C", "b": "b@C"}
    (again,) = merge_stores(out, [stores["C"]])  # ... recognised under their new names
    assert again.added == [] and again.skipped == ["a", "b"]
    with duckdb.connect(str(out), read_only=True) as con:
        names = sorted(r[0] for r in con.execute("SELECT name FROM runs").fetchall())
        n_paths = con.execute("SELECT count(*) FROM paths").fetchall()[0][0]
    assert names == ["a", "a@C", "b", "b@C"]
    assert n_paths == 2 * len(first["paths"])  # type: ignore[arg-type]


def test_refusals(stores: dict[str, Path], tmp_path: Path) -> None:
    """Newer schema, non-pathdb inputs, OUT among the inputs and a non-pathdb OUT: one-line errors."""
    newer = tmp_path / "newer.duckdb"
    shutil.copy(stores["A"], newer)
    with duckdb.connect(str(newer)) as con:
        stamp(con, "9999_from_the_future")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    plain = tmp_path / "plain.duckdb"
    with duckdb.connect(str(plain)) as con:
        con.execute("CREATE TABLE t (x INT)")
    out = tmp_path / "m.duckdb"
    cases = [
        ([out, newer], "written by a newer pathdb (schema revision '9999_from_the_future'"),
        ([out, text], "is not a pathdb store (not a DuckDB file)"),
        ([out, plain], "is a DuckDB file but not a pathdb store"),
        ([stores["A"], stores["A"]], "is the output store"),
        (
            [text, stores["A"]],
            "exists and is not a pathdb store; choose another OUT, or pass --force",
        ),
        ([out, tmp_path / "missing.duckdb"], "does not exist"),
    ]
    for (dst, src), message in cases:
        with pytest.raises(StoreError) as info:
            merge_stores(dst, [src])
        assert message in str(info.value) and "\n" not in str(info.value)
    for dst, src in ((out, newer), (text, stores["A"])):  # the CLI prints them as one line, exit 2
        res = pathdb("merge", str(dst), str(src), cwd=tmp_path)
        assert (
            res.returncode == 2
            and res.stderr.startswith("error:")
            and "Traceback" not in res.stderr
        ), res.stderr
    assert text.read_text() == "hello\n"  # not overwritten without --force
    with duckdb.connect(str(out), read_only=True) as con:  # refused inputs merged nothing
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]
    res = pathdb("merge", str(text), str(stores["A"]), "--force", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with duckdb.connect(str(text), read_only=True) as con:
        assert con.execute("SELECT name FROM runs").fetchall() == [("a",)]


def test_a_run_that_progressed_replaces_its_older_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merged while interrupted, then resumed in its own store and merged again: the completed
    copy replaces the partial one (same name); merging the old snapshot again changes nothing."""
    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts="toy-ioi-small",
        params=SearchParams(min_contribution=0.1, checkpoint_every=1e-9),
    )
    job, snapshot, out = tmp_path / "job.duckdb", tmp_path / "snap.duckdb", tmp_path / "m.duckdb"
    interrupt_on_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, job, run_name="r", quiet=True)
    monkeypatch.undo()
    shutil.copy(job, snapshot)
    merge_stores(out, [snapshot])
    resume_search("r", job, quiet=True)
    (rep,) = merge_stores(out, [job])
    assert rep.refreshed == ["r"] and rep.added == []
    assert _content(out) == _content(job)
    (again,) = merge_stores(out, [snapshot])
    assert again.skipped == ["r"] and _content(out) == _content(job)
