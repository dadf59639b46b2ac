"""The explorer's cold circuit (one read of a run's kept rows, summed in NumPy:
:func:`pathdb.query.tree.subtree_sums`) equals the query layer's level-by-level walk on a real
store of several runs whose path ids overlap, reads the store a fixed number of times whatever
the tree's depth, and `pathdb serve` leaves the store file untouched. The circuit aggregate a
store keeps per completed run (revision 0007) equals that walk to the last bit, replaces the read
of the paths and is written on completion, resume and merge; a run without it is walked."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pathdb.graph import Node, Site
from pathdb.query import edges, nodes
from pathdb.query.aggregate import edges_and_nodes, select_edges
from pathdb.query.expand import complete_kept_selection
from pathdb.query.tree import stored_sums, subtree_sums
from pathdb.serve import data
from pathdb.serve.data import MAX_EDGES
from pathdb.store.circuit import drop_circuit_sums
from pathdb.store.db import current_revision, migrate, open_store
from pathdb.store.writer import RunWriter
from tests.cli_process import pathdb
from tests.serve_fixtures import serving

L, H, T = 3, 2, 3  # a small positional graph: layers, heads, positions
META = {
    "model_name": "toy-shape", "model_fingerprint": "0" * 64, "n_layers": L, "n_heads": H,
    "d_model": 16, "method": "hybrid", "strategy": "threshold", "metric": "logit_diff",
    "patch_type": "counterfactual", "positional": True, "root_position": T - 1,
    "params": {"min_contribution": 0.01}, "baseline": 1.0, "package_version": "test",
}  # fmt: skip
#: run name -> (seed, prompt mode, tree depth, share of pruned partials that are still extended)
RUNS = {
    "per": (1, "per-prompt", 5, 0.0),
    "batch": (2, "batch", 4, 0.0),
    "unkept": (3, "per-prompt", 5, 0.3),  # complete kept paths below partials that are not kept
    "shallow": (4, "batch", 2, 0.0),
    "deep": (5, "batch", 8, 0.0),
}


def _graph() -> list[Node]:
    """Every positional node of the small graph, FINAL first."""
    out = [Node.final(L, T - 1)]
    for p in range(T):
        out.append(Node.embed(p))
        for layer in range(L):
            for h in range(H):
                out.append(Node.attn(layer, h, Site.Q, p))
                out.extend(Node.attn(layer, h, Site.KV, p, k) for k in range(p + 1))
            out.append(Node.mlp(layer, p))
    return out


def _write_run(store: Any, name: str) -> None:
    """One run through the store's own writer: random search tree, ids from 0 like every run."""
    seed, mode, depth, unkept = RUNS[name]
    rng = np.random.default_rng(seed)
    w = RunWriter.create(store, name=name, meta={**META, "prompt_mode": mode})
    graph = _graph()
    ids = np.array([w.node_id(n) for n in graph])
    kinds = np.array([str(n.kind) for n in graph])
    embed, inner = ids[kinds == "embed"], ids[(kinds == "attn") | (kinds == "mlp")]
    prompts: list[int | None] = [0, 1] if mode == "per-prompt" else [None]
    if mode == "per-prompt":
        w.add_prompts([
            {"prompt_idx": p, "clean": f"prompt {p}", "target": "t", "target_id": 0,
             "tokens": list(range(T)), "token_strs": ["t"] * T}
            for p in (0, 1)
        ])  # fmt: skip
    for prompt in prompts:
        frontier = w.add_paths([-1], [ids[0]], [0], prompt, [np.nan], "root", [False], [True])
        for d in range(1, depth + 1):
            n = 30 + 20 * d
            parent = frontier[rng.integers(0, len(frontier), n)]
            complete = rng.random(n) < (0.3 if d < depth else 1.0)
            node = np.where(complete, rng.choice(embed, n), rng.choice(inner, n))
            kept = np.where(complete, rng.random(n) < 0.7, rng.random(n) < 0.5)
            contrib = rng.standard_normal(n)
            method = np.where(complete, "exact", "attribution")
            new = w.add_paths(parent, node, d, prompt, contrib, method, complete, kept)
            extended = ~complete & (kept | (rng.random(n) < unkept))
            frontier = new[extended] if extended.any() else frontier
        w.flush()
    w.finish("completed")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve_cold") / "runs.duckdb"
    with open_store(path) as store:
        for name in RUNS:
            _write_run(store, name)
    return path


@pytest.fixture()
def con(db: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with open_store(db, read_only=True) as store:
        yield store.con


def _by(df: pd.DataFrame, key: str) -> pd.DataFrame:
    return df.sort_values(key, kind="mergesort").reset_index(drop=True)


def test_the_store_exercises_shared_ids_and_unkept_ancestors(
    con: duckdb.DuckDBPyConnection,
) -> None:
    shared = con.execute(
        "SELECT count(*) FROM (SELECT path_id FROM paths GROUP BY path_id HAVING count(*) = 5)"
    ).fetchall()[0][0]
    unkept = con.execute(
        """SELECT count(*) FROM paths c JOIN paths p ON p.run_id = c.run_id AND p.path_id = c.parent_id
           WHERE c.complete AND c.kept AND NOT p.kept"""
    ).fetchall()[0][0]
    assert shared > 100  # every run numbers its paths from 0: a missing run filter mixes trees
    assert unkept > 0  # ancestors outside the kept rows: read by id


@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("sign", [None, "negative"])
def test_fast_circuit_equals_the_level_by_level_walk(
    con: duckdb.DuckDBPyConnection, positional: bool, sign: str | None
) -> None:
    for run in ("per", "batch", "unkept"):
        got_e, got_n = edges_and_nodes(con, run, positional=positional, sign=sign)
        want_e = edges(con, run, positional=positional, sign=sign)
        want_n = nodes(con, run, positional=positional, sign=sign)
        assert len(got_e) == len(want_e) > 10 and len(got_n) == len(want_n) > 5, run
        pd.testing.assert_frame_equal(_by(got_e, "edge"), _by(want_e, "edge"), rtol=1e-12)
        pd.testing.assert_frame_equal(_by(got_n, "node"), _by(want_n, "node"), rtol=1e-12)
        top = select_edges(got_e, top_k=20, threshold=None, by="abs")
        assert list(top["edge"]) == list(
            select_edges(want_e, top_k=20, threshold=None, by="abs")["edge"]
        )


def test_pooled_runs_equal_the_level_by_level_walk(con: duckdb.DuckDBPyConnection) -> None:
    got_e, got_n = edges_and_nodes(con, ["per", "unkept", "deep"])
    want_e, want_n = edges(con, ["per", "unkept", "deep"]), nodes(con, ["per", "unkept", "deep"])
    pd.testing.assert_frame_equal(_by(got_e, "edge"), _by(want_e, "edge"), rtol=1e-12)
    pd.testing.assert_frame_equal(_by(got_n, "node"), _by(want_n, "node"), rtol=1e-12)


class _Counting:
    """A connection that counts the statements sent to DuckDB and forwards everything."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con, self.statements = con, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.con, name)
        if name in ("sql", "execute", "query"):
            self.statements += 1
        return attr


def test_cold_circuit_reads_the_store_a_fixed_number_of_times(
    con: duckdb.DuckDBPyConnection,
) -> None:
    counts = {}
    for run in ("shallow", "deep"):
        spy = _Counting(con)
        edges_and_nodes(spy, run)  # type: ignore[arg-type]
        counts[run] = spy.statements
    assert con.execute("SELECT max(depth) FROM paths WHERE run_id = 5").fetchall()[0][0] == 8
    assert counts["deep"] == counts["shallow"], counts  # no statement per tree level


def _fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as res:
        return json.loads(res.read())


def test_serve_paints_the_reference_circuit_and_leaves_the_store_untouched(db: Path) -> None:
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns)
    files = sorted(p.name for p in db.parent.iterdir())
    with serving(db) as (url, _):
        got = {run: _fetch(f"{url}api/runs/{run}/edges") for run in ("unkept", "deep")}
        node_scores = _fetch(f"{url}api/runs/unkept/nodes?sign=negative")
        negative = _fetch(f"{url}api/runs/unkept/edges?sign=negative")
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns) == before
    assert sorted(p.name for p in db.parent.iterdir()) == files  # no WAL, no lock file left
    with open_store(db, read_only=True) as store:
        for run, body in [*got.items(), ("unkept-negative", negative)]:
            name, sign = (run, None) if run in RUNS else ("unkept", "negative")
            want = edges(store.con, name, sign=sign)
            top = select_edges(want, top_k=MAX_EDGES, threshold=None, by="abs")
            assert body["total_edges"] == len(want)
            assert [e["edge"] for e in body["edges"]] == list(top["edge"])
            assert [e["score"] for e in body["edges"]] == pytest.approx(
                list(top["score"]), rel=1e-12
            )
        want_n = nodes(store.con, "unkept", sign="negative").set_index("node")
    assert node_scores["nodes"]
    for row in node_scores["nodes"]:
        assert row["score"] == pytest.approx(want_n.loc[row["node"], "score"], rel=1e-12)
        assert row["n_paths"] == want_n.loc[row["node"], "n_paths"]


# ---- the circuit aggregate a store keeps per completed run (revision 0007) -------------------


def _table(t: pa.Table, keys: list[str]) -> dict[str, list[Any]]:
    """An Arrow table's columns as Python lists, rows sorted by ``keys`` (exact comparison)."""
    return t.sort_by([(k, "ascending") for k in keys]).to_pydict()


def assert_kept_sums_are_the_walk(con: duckdb.DuckDBPyConnection, run_ids: list[int]) -> None:
    """The stored aggregate of the runs equals, to the last bit, the walk of their paths
    (:func:`subtree_sums`) for every sign: same pairs, same nodes, same sums and counts."""
    ids = ", ".join(map(str, run_ids))
    for sign in (None, "positive", "negative"):
        kept = stored_sums(con, run_ids, sign)
        assert kept is not None, (run_ids, sign)
        pairs, weights = subtree_sums(con, complete_kept_selection(ids, sign=sign))
        assert weights.num_rows > 0 or sign is not None
        assert _table(kept[0], PAIR_KEY) == _table(pairs, PAIR_KEY), sign
        assert _table(kept[1], NODE_KEY) == _table(weights, NODE_KEY), sign


PAIR_KEY, NODE_KEY = ["run_id", "src_id", "dst_id"], ["run_id", "node_id"]


def _run_id(con: duckdb.DuckDBPyConnection, name: str) -> int:
    return int(con.execute("SELECT run_id FROM runs WHERE name = ?", [name]).fetchall()[0][0])


def _has_sums(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM circuit_nodes WHERE run_id = ?", [_run_id(con, name)]
        ).fetchall()[0][0]
    )


def test_completed_runs_keep_sums_equal_to_the_walk(con: duckdb.DuckDBPyConnection) -> None:
    ids = [_run_id(con, name) for name in RUNS]
    for rid in ids:
        assert_kept_sums_are_the_walk(con, [rid])
    assert_kept_sums_are_the_walk(con, ids[:3])  # pooled runs: per run, never mixed


class _Statements:
    """A connection that records the SQL text sent to DuckDB and forwards everything."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.sql_text: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.con, name)
        if name in ("sql", "execute", "query"):

            def recorded(sql: str, *args: Any, **kw: Any) -> Any:
                self.sql_text.append(sql)
                return attr(sql, *args, **kw)

            return recorded
        return attr


def _reads_paths(statements: list[str]) -> bool:
    return any(re.search(r"\bpaths\b", s) for s in statements)


def _without_sums(db: Path, tmp: Path, names: list[str]) -> Path:
    """A copy of the store ``db`` whose runs ``names`` have no circuit aggregate."""
    copy = tmp / "no-sums.duckdb"
    shutil.copy(db, copy)
    with open_store(copy) as store:
        for name in names:
            drop_circuit_sums(store.con, _run_id(store.con, name))
    return copy


def test_the_first_paint_reads_the_sums_not_the_paths_and_falls_back_without_them(
    db: Path, tmp_path: Path
) -> None:
    """With the aggregate, edges_and_nodes reads no ``paths`` row; a copy of the store without
    it (pooled with a run that has it) walks the paths and gives the same tables."""
    bare = _without_sums(db, tmp_path, ["unkept"])
    for sign in (None, "positive", "negative"):
        with open_store(db, read_only=True) as a, open_store(bare, read_only=True) as b:
            spy_a, spy_b = _Statements(a.con), _Statements(b.con)
            got = edges_and_nodes(spy_a, ["unkept", "deep"], sign=sign)  # type: ignore[arg-type]
            want = edges_and_nodes(spy_b, ["unkept", "deep"], sign=sign)  # type: ignore[arg-type]
            assert not _reads_paths(spy_a.sql_text), spy_a.sql_text
            assert _reads_paths(spy_b.sql_text)  # the fallback: the walk of the paths
            for g, w, key in ((got[0], want[0], "edge"), (got[1], want[1], "node")):
                assert len(g) > 10
                pd.testing.assert_frame_equal(_by(g, key), _by(w, key), rtol=1e-12)
            top = [select_edges(t[0], top_k=20, threshold=None, by="abs") for t in (got, want)]
            assert list(top[0]["edge"]) == list(top[1]["edge"])


def test_serve_falls_back_without_the_sums_and_never_writes_them(db: Path, tmp_path: Path) -> None:
    """`pathdb serve` on a store whose run has no aggregate paints the circuit from the paths
    (the query layer's), leaves the file as it was (hash, mtime) and the run without one."""
    bare = _without_sums(db, tmp_path, ["unkept"])
    before = (hashlib.sha256(bare.read_bytes()).hexdigest(), bare.stat().st_mtime_ns)
    with serving(bare) as (url, _):
        body = _fetch(f"{url}api/runs/unkept/edges?sign=positive")
    assert (hashlib.sha256(bare.read_bytes()).hexdigest(), bare.stat().st_mtime_ns) == before
    with open_store(bare, read_only=True) as store:
        assert not _has_sums(store.con, "unkept")
        want = edges(store.con, "unkept", sign="positive")
    top = select_edges(want, top_k=MAX_EDGES, threshold=None, by="abs")
    assert body["total_edges"] == len(want) > 10
    assert [e["edge"] for e in body["edges"]] == list(top["edge"])
    assert [e["score"] for e in body["edges"]] == pytest.approx(list(top["score"]), rel=1e-12)
    assert [e["n_paths"] for e in body["edges"]] == list(top["n_paths"])


def test_reopened_runs_drop_their_sums_until_they_complete_again(tmp_path: Path) -> None:
    """Reopening a run (resume) drops its aggregate; closing it interrupted writes none; its
    completion writes the one of all its paths, the new ones included."""
    path = tmp_path / "reopen.duckdb"
    with open_store(path) as store:
        _write_run(store, "per")
        rid = _run_id(store.con, "per")
        old = stored_sums(store.con, [rid], None)
        w = RunWriter.reopen(store, rid, allow_completed=True)
        assert not _has_sums(store.con, "per")
        w.abandon("interrupted")
        assert not _has_sums(store.con, "per")
        w = RunWriter.reopen(store, rid)
        leaf = store.con.execute(
            "SELECT path_id, prompt_idx FROM paths WHERE run_id = ? AND complete AND kept "
            "ORDER BY path_id LIMIT 1",
            [rid],
        ).fetchall()[0]
        parent = store.con.execute(
            "SELECT parent_id, node_id, depth FROM paths WHERE run_id = ? AND path_id = ?",
            [rid, leaf[0]],
        ).fetchall()[0]
        w.add_paths([parent[0]], [parent[1]], parent[2], leaf[1], [5.0], "exact", [True], [True])
        w.finish("completed")
        assert_kept_sums_are_the_walk(store.con, [rid])
        new = stored_sums(store.con, [rid], None)
    assert old is not None and new is not None
    assert sum(new[1]["n"].to_pylist()) > sum(old[1]["n"].to_pylist())


def test_resumed_search_writes_the_sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real search interrupted at a checkpoint has no aggregate; `resume` completes it with
    the aggregate of all its paths."""
    from pathdb.models import load
    from pathdb.prompts import load_prompts
    from search import SearchParams, SearchRequest, resume_search, run_loaded
    from tests.interrupts import interrupt_on_checkpoint

    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    params = SearchParams(min_contribution=0.02, checkpoint_every=1e-9)
    req = SearchRequest(model="toy-ioi-2l", prompts="toy-ioi-small", params=params)
    path = tmp_path / "resume.duckdb"
    interrupt_on_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, path, run_name="r", quiet=True)
    monkeypatch.undo()
    with open_store(path, read_only=True) as store:
        assert not _has_sums(store.con, "r")
        n_before = store.con.execute("SELECT count(*) FROM paths").fetchall()[0][0]
    resume_search("r", path, quiet=True)
    with open_store(path, read_only=True) as store:
        assert store.con.execute("SELECT count(*) FROM paths").fetchall()[0][0] > n_before
        assert_kept_sums_are_the_walk(store.con, [_run_id(store.con, "r")])


def test_merge_copies_or_writes_the_sums(db: Path, tmp_path: Path) -> None:
    """`pathdb merge` copies an input's aggregate, and writes it for the completed runs of an
    input of revision 0006 (no aggregate tables): both equal the walk in the output."""
    old = tmp_path / "old.duckdb"
    with open_store(old) as store:
        _write_run(store, "shallow")
        migrate(store.con, "0006", down=True)
        assert current_revision(store.con) == "0006"
    out = tmp_path / "out.duckdb"
    res = pathdb("merge", str(out), str(db), str(old), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open_store(out, read_only=True) as store:
        names = [
            r[0] for r in store.con.execute("SELECT name FROM runs ORDER BY run_id").fetchall()
        ]
        assert names == [*RUNS, "shallow@old"]
        for name in names:
            assert_kept_sums_are_the_walk(store.con, [_run_id(store.con, name)])


# ---- the positional first paint: the top edges ranked in DuckDB, not every edge as a row -----


def test_positional_paint_is_the_top_of_the_full_table(db: Path, tmp_path: Path) -> None:
    """`pathdb serve`'s positional view (with the aggregate and walked without it) sends the top
    ``limit`` rows of the full ``edges(..., positional=True)`` table in its order, its length as
    ``total_edges`` and the rows of ``nodes(..., positional=True)`` as node scores."""
    bare = _without_sums(db, tmp_path, ["unkept"])
    for store_path in (db, bare):
        with serving(store_path) as (url, _):
            q = "positional=true&sign="
            got = {
                (sign, limit): _fetch(f"{url}api/runs/unkept/edges?{q}{sign}&limit={limit}")
                for sign in ("both", "negative")
                for limit in (7, MAX_EDGES)
            }
            scores = _fetch(f"{url}api/runs/unkept/nodes?{q}negative")
        with open_store(store_path, read_only=True) as store:
            for (sign, limit), body in got.items():
                want = edges(store.con, "unkept", positional=True, sign=_agg(sign))
                top = select_edges(want, top_k=limit, threshold=None, by="abs")
                assert body["total_edges"] == len(want) > 7
                assert [e["edge"] for e in body["edges"]] == list(top["edge"])
                assert [e["score"] for e in body["edges"]] == pytest.approx(
                    list(top["score"]), rel=1e-12
                )
                assert [e["n_paths"] for e in body["edges"]] == list(top["n_paths"])
            want_n = nodes(store.con, "unkept", positional=True, sign="negative").set_index("node")
        assert scores["nodes"]
        for row in scores["nodes"]:
            assert row["score"] == pytest.approx(want_n.loc[row["node"], "score"], rel=1e-12)
            assert row["n_paths"] == want_n.loc[row["node"], "n_paths"]


def test_circuit_tables_build_only_the_top_edges(
    con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The explorer's tables hold only ``MAX_EDGES`` edge rows (the top of the full table, ties by
    name) and the full table's length; the node rows are all of ``nodes``."""
    monkeypatch.setattr(data, "MAX_EDGES", 6)
    for positional in (True, False):
        tables = data.circuit_tables(con, "deep", positional=positional)
        want = edges(con, "deep", positional=positional)
        top = select_edges(want, top_k=6, threshold=None, by="abs").reset_index(drop=True)
        assert tables.total_edges == len(want) > 6
        # dtypes may differ: a head column without NULLs in the top rows is int16, not Int16
        pd.testing.assert_frame_equal(tables.edges, top, check_dtype=False, rtol=1e-12)
        want_n = nodes(con, "deep", positional=positional)
        pd.testing.assert_frame_equal(_by(tables.nodes, "node"), _by(want_n, "node"), rtol=1e-12)


def _agg(sign: str) -> str | None:
    """The query layer's sign for the page's sign toggle."""
    return None if sign == "both" else sign
