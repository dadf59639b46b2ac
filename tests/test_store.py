"""The DuckDB store: open/errors, RunWriter (Arrow bulk, interning, atomic batches, resume), readers, views."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pathdb.graph import Node, path_label
from pathdb.store import reader
from pathdb.store.db import Store, open_store
from pathdb.store.errors import StoreError
from pathdb.store.writer import PROMPT_COLUMNS, RunWriter

REPO = Path(__file__).resolve().parents[1]
META: dict[str, Any] = {
    "model_name": "toy", "model_fingerprint": "f" * 64, "n_layers": 2, "n_heads": 2,
    "d_model": 8, "method": "exact", "strategy": "threshold", "metric": "logit_diff",
    "patch_type": "zero", "prompt_mode": "batch", "positional": True, "root_position": 3,
    "params": {"min_contribution": 0.1, "top_n": None}, "baseline": 1.5,
    "package_version": "0.1.0",
}  # fmt: skip
FINAL = Node.final(2, 3)
A = Node.attn(1, 0, "q", 3)
KV = Node.attn(1, 1, "kv", 3, 1)
M = Node.mlp(0, 3)
E3, E1 = Node.embed(3), Node.embed(1)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "s.duckdb") as s:
        yield s


def _hand_tree(w: RunWriter) -> dict[int, tuple[Node, ...]]:
    """A small tree; returns path id -> expected node sequence (start first)."""
    ids = {n: w.node_id(n) for n in (FINAL, A, KV, M, E3, E1)}
    (root,) = w.add_paths([-1], [ids[FINAL]], [0], None, [np.nan], "root", False, True)
    a, kv, m, e = w.add_paths(
        [root] * 4, [ids[A], ids[KV], ids[M], ids[E3]], 1, None,
        [0.5, -0.3, 0.05, 0.2], ["exact", "attribution", "attribution", "exact"],
        [False, False, False, True], [True, True, False, True],
    )  # fmt: skip
    ea, ekv, ma = w.add_paths(
        [a, kv, a], [ids[E3], ids[E1], ids[M]], 2, None, [0.45, -0.25, 0.01], "exact",
        [True, True, False], [True, True, False],
    )  # fmt: skip
    return {
        int(root): (FINAL,), int(a): (A, FINAL), int(kv): (KV, FINAL), int(m): (M, FINAL),
        int(e): (E3, FINAL), int(ea): (E3, A, FINAL), int(ekv): (E1, KV, FINAL),
        int(ma): (M, A, FINAL),
    }  # fmt: skip


def _run_py(code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw,
    )  # fmt: skip


_HOLDER = """
    import sys, time, numpy as np
    from pathdb.store.db import open_store
    from pathdb.store.writer import RunWriter
    sys.path.insert(0, sys.argv[2])
    from test_store import META, FINAL
    s = open_store(sys.argv[1])
    w = RunWriter.create(s, name="held", meta=META)
    w.add_paths([-1], [w.node_id(FINAL)], [0], None, [float("nan")], "root", False, True)
    w.flush()
    print("ready", flush=True)
    time.sleep(120)
"""


def _start_holder(db: Path) -> subprocess.Popen[str]:
    proc = _run_py(_HOLDER, str(db), str(REPO / "tests"))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
    return proc


# ---- writer / reader ---------------------------------------------------------------------------
def test_rows_written_equal_rows_read_through_arrow(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    inserted: list[tuple[str, int]] = []
    original = RunWriter._insert_arrow

    def spy(self: RunWriter, table_name: str, data: pa.Table, *a: Any, **k: Any) -> None:
        assert isinstance(data, pa.Table)
        inserted.append((table_name, data.num_rows))
        original(self, table_name, data, *a, **k)

    monkeypatch.setattr(RunWriter, "_insert_arrow", spy)
    rng = np.random.default_rng(0)
    w = RunWriter.create(store, name="big", meta=META, flush_rows=700)
    nodes = [FINAL, A, KV, M, E3, E1]
    nids = np.array([w.node_id(n) for n in nodes])
    w.add_paths([-1], [0], [0], None, [np.nan], "root", False, True)
    parents, node_col, depth = [-1], [0], [0]
    for _ in range(4):  # 4 x 500 rows, auto-spilled at 700 rows, parents anywhere earlier
        n = 500
        start = w.next_path_id
        par = rng.integers(0, start, n)
        nd = rng.choice(nids[1:], n)
        dep = np.array(depth)[par] + 1
        ids = w.add_paths(par, nd, dep, 2, rng.normal(size=n), "exact", nd == nids[4], True)
        assert np.array_equal(ids, np.arange(start, start + n))
        parents += par.tolist()
        node_col += nd.tolist()
        depth += dep.tolist()
    w.flush()
    assert sum(k for t, k in inserted if t == "paths") == 2001
    assert max(k for t, k in inserted if t == "paths") >= 700  # bulk, not row by row

    tbl = reader.iter_paths(store, w.run_id)
    assert tbl.num_rows == 2001
    assert tbl["path_id"].to_pylist() == list(range(2001))
    assert tbl["parent_id"].to_pylist() == [None, *parents[1:]]
    assert tbl["depth"].to_pylist() == depth
    assert tbl["prompt_idx"].to_pylist() == [None] + [2] * 2000
    # node sequences agree with walking the parent pointers in Python
    for pid, seq in zip(tbl["path_id"].to_pylist(), tbl["node_ids"].to_pylist(), strict=True):
        expect, cur = [], pid
        while cur != -1:
            expect.append(node_col[cur])
            cur = parents[cur]
        assert seq == expect
        assert len(seq) == depth[pid] + 1
    run = reader.get_run(store, "big")
    assert run["n_evaluated"] == 2000
    assert run["n_complete"] == int(np.sum(np.array(node_col) == nids[4]))
    assert run["params"] == META["params"]
    assert reader.iter_paths(store, w.run_id, complete=True).num_rows == run["n_complete"]


def test_views_and_sequences_on_hand_built_tree(store: Store) -> None:
    w = RunWriter.create(store, name="hand", meta=META)
    expected = _hand_tree(w)
    w.flush()
    con, rid = store.con, w.run_id
    for pid, seq in expected.items():
        assert reader.path_sequence(store, rid, pid) == seq
        rows = con.execute(
            "SELECT step, label, component FROM v_path_nodes WHERE run_id = ? AND path_id = ? "
            "ORDER BY step",
            [rid, pid],
        ).fetchall()
        assert rows == [(i, n.label, n.component) for i, n in enumerate(seq)]
        edges = con.execute(
            "SELECT step, src_label, dst_label, src_component, dst_component FROM v_path_edges "
            "WHERE run_id = ? AND path_id = ? ORDER BY step",
            [rid, pid],
        ).fetchall()
        assert edges == [
            (i, s.label, d.label, s.component, d.component)
            for i, (s, d) in enumerate(pairwise(seq))
        ]
        (text,) = con.execute(
            "SELECT path FROM v_path_strings WHERE run_id = ? AND path_id = ?", [rid, pid]
        ).fetchall()[0]
        assert text == path_label(seq)
    assert w.path_nodes(list(expected)) == expected
    row = con.execute(
        "SELECT contribution, complete, kept, method, prompt_idx FROM v_path_edges "
        "WHERE path_id = 6 AND step = 1"
    ).fetchall()[0]
    assert row == (-0.25, True, True, "exact", None)
    assert con.execute("SELECT label, run_name FROM v_paths WHERE path_id = 2").fetchall()[0] == (
        KV.label, "hand",
    )  # fmt: skip
    runs = reader.list_runs(store)
    assert "params" not in runs.columns
    assert runs.loc[0, "n_paths"] == 8 and runs.loc[0, "n_nodes"] == 6
    assert runs.loc[0, "n_complete_paths"] == 3
    assert reader.run_nodes(store, rid) == {i: n for i, n in enumerate((FINAL, A, KV, M, E3, E1))}


def test_node_interning_stable_across_flushes_and_reopen(store: Store) -> None:
    w = RunWriter.create(store, name="intern", meta=META)
    first = [w.node_id(n) for n in (FINAL, A, KV)]
    assert first == [0, 1, 2] and w.node_id(A) == 1
    w.add_paths([-1, 0], [0, 1], [0, 1], None, [np.nan, 0.1], "exact", False, True)
    w.flush(frontier_add=([1], [0.1]))
    assert w.node_id(KV) == 2 and w.node_id(M) == 3
    w.add_paths([1], [3], [2], None, [0.2], "exact", False, True)
    w.flush(frontier_add=([2], [0.2]), frontier_remove=[1])
    w.close()  # no finish: resume
    w2 = RunWriter.reopen(store, w.run_id)
    assert w2.nodes == {FINAL: 0, A: 1, KV: 2, M: 3}
    assert w2.node_id(M) == 3 and w2.node_id(E3) == 4
    assert w2.next_path_id == 3 and w2.batch_id == 2
    ids, prio = w2.frontier()
    assert ids.tolist() == [2] and prio.tolist() == [0.2]
    (new,) = w2.add_paths([2], [4], [3], None, [0.3], "exact", True, True)
    assert new == 3
    w2.finish("completed", wall_s=2.0)
    nodes = store.con.execute(
        "SELECT node_id, label FROM nodes WHERE run_id = ? ORDER BY node_id", [w.run_id]
    ).fetchall()
    assert nodes == [(i, n.label) for i, n in enumerate((FINAL, A, KV, M, E3))]
    batches = store.con.execute("SELECT path_id, batch_id FROM paths ORDER BY path_id").fetchall()
    assert batches == [(0, 0), (1, 0), (2, 1), (3, 2)]
    run = reader.get_run(store, w.run_id)
    assert (run["status"], run["wall_s"], run["n_evaluated"]) == ("completed", 2.0, 3)
    with pytest.raises(StoreError, match="already completed"):
        RunWriter.reopen(store, w.run_id)


def test_batch_is_atomic(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    w = RunWriter.create(store, name="atomic", meta=META)
    w.add_paths([-1], [w.node_id(FINAL)], [0], None, [np.nan], "root", False, True)
    w.flush(frontier_add=([0], [1.0]))
    counts_before = store.con.execute(
        "SELECT n_evaluated, write_s FROM runs WHERE run_id = ?", [w.run_id]
    ).fetchall()[0]
    w.add_paths([0, 0], [w.node_id(A), w.node_id(M)], 1, None, [0.5, 0.1], "exact", False, True)
    original = RunWriter._insert_arrow

    def fail_on_paths(self: RunWriter, table_name: str, *a: Any, **k: Any) -> None:
        if table_name == "paths":  # the nodes of this batch are already inserted
            raise OSError("disk on fire")
        original(self, table_name, *a, **k)

    monkeypatch.setattr(RunWriter, "_insert_arrow", fail_on_paths)
    with pytest.raises(StoreError, match="disk on fire"):
        w.flush(frontier_add=([1, 2], [0.5, 0.1]), frontier_remove=[0])
    monkeypatch.setattr(RunWriter, "_insert_arrow", original)
    q = store.con.execute
    assert q("SELECT count(*) FROM nodes").fetchall()[0] == (1,)
    assert q("SELECT path_id FROM paths").fetchall() == [(0,)]
    assert q("SELECT path_id FROM frontier").fetchall() == [(0,)]
    assert q("SELECT n_evaluated, write_s FROM runs").fetchall()[0] == counts_before
    with pytest.raises(StoreError, match="reopen"):
        w.add_paths([0], [0], [1], None, [0.1], "exact", False, True)
    w.finish("failed", error="disk on fire")
    assert q("SELECT status, error FROM runs").fetchall() == [("failed", "disk on fire")]
    w2 = RunWriter.reopen(store, w.run_id)
    assert w2.next_path_id == 1 and w2.nodes == {FINAL: 0} and w2.batch_id == 1


def test_same_process_readers_see_committed_data_only(store: Store) -> None:
    w = RunWriter.create(store, name="vis", meta=META, flush_rows=1)
    w.add_paths([-1], [w.node_id(FINAL)], [0], None, [np.nan], "root", False, True)
    assert w.buffered_rows == 0  # spilled into the open transaction, not committed
    reader_cur = store.cursor()
    assert reader_cur.execute("SELECT count(*) FROM paths").fetchall()[0] == (0,)
    w.flush()
    assert reader_cur.execute("SELECT count(*) FROM paths").fetchall()[0] == (1,)
    # a second open in the same process does not mark the live run interrupted
    with open_store(store.path) as again:
        assert reader.get_run(again, "vis")["status"] == "running"


def test_create_run_errors(store: Store) -> None:
    w = RunWriter.create(store, name=None, meta=META)
    assert w.name == f"run-{w.run_id}"
    with pytest.raises(StoreError, match=r"a run named 'run-1' already exists.*--name"):
        RunWriter.create(store, name="run-1", meta=META)
    bad = {k: v for k, v in META.items() if k != "metric"}
    with pytest.raises(StoreError, match=r"missing \['metric'\]"):
        RunWriter.create(store, name="x", meta=bad)
    with pytest.raises(StoreError, match=r"no run 'nope'.*run-1 \(id 1\)"):
        reader.get_run(store, "nope")
    with pytest.raises(StoreError, match="node ids must come from node_id"):
        w.add_paths([-1], [5], [0], None, [np.nan], "root", False, True)
    w.node_id(FINAL)
    with pytest.raises(StoreError, match="parent id"):
        w.add_paths([0], [0], [0], None, [np.nan], "root", False, True)


def test_prompts_round_trip(store: Store) -> None:
    w = RunWriter.create(store, name="p", meta=META)
    recs = [
        {"prompt_idx": 0, "clean": "When Mary and John", "counterfactual": "When Ann and Bob",
         "target": " Mary", "cf_target": " Ann", "target_id": 5, "cf_target_id": 6,
         "tokens": [1, 2, 3, 4], "token_strs": ["When", " Mary", " and", " John"],
         "cf_tokens": [1, 7, 3, 8], "roles": [None, "IO", None, "S"]},
        {"prompt_idx": 1, "clean": "x", "target": "y", "target_id": 1, "tokens": [9],
         "token_strs": ["x"]},
    ]  # fmt: skip
    w.add_prompts(recs)
    got = (
        store.con.sql("SELECT * EXCLUDE (run_id) FROM prompts ORDER BY prompt_idx")
        .to_arrow_table()
        .to_pylist()
    )
    assert got == [{k: r.get(k) for k in PROMPT_COLUMNS} for r in recs]
    with pytest.raises(StoreError, match=r"unknown keys \['tokenz'\]"):
        w.add_prompts([{"tokenz": [1]}])


# ---- interrupted runs, locks and other processes ---------------------------------------------
def test_run_left_running_becomes_interrupted(tmp_path: Path) -> None:
    db = tmp_path / "i.duckdb"
    with open_store(db) as s:
        w = RunWriter.create(s, name="crash", meta=META)
        w.add_paths([-1], [w.node_id(FINAL)], [0], None, [np.nan], "root", False, True)
        w.flush()
    # closing without finish() and letting the writer go: the next open marks it
    w.close()
    with open_store(db) as s:
        run = reader.get_run(s, "crash")
        assert run["status"] == "interrupted" and run["finished_at"] is not None


def test_sigkilled_writer_is_interrupted_and_lock_error_is_clear(tmp_path: Path) -> None:
    db = tmp_path / "k.duckdb"
    proc = _start_holder(db)
    try:
        with pytest.raises(StoreError, match=rf"another pathdb process \(PID {proc.pid}\)") as ei:
            open_store(db)
        assert "read-only" in str(ei.value)
        # DuckDB allows no read-only open from another process while a writer holds the lock
        with pytest.raises(StoreError, match="another pathdb process"):
            open_store(db, read_only=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with open_store(db) as s:
        run = reader.get_run(s, "held")
        assert run["status"] == "interrupted"
        assert s.con.execute("SELECT count(*) FROM paths").fetchall()[0] == (1,)


def test_read_only_reader_in_other_process_sees_committed_runs(tmp_path: Path) -> None:
    db = tmp_path / "r.duckdb"
    with open_store(db) as s:
        w = RunWriter.create(s, name="shared", meta=META)
        _hand_tree(w)
        w.finish("completed")
    code = """
        import sys
        from pathdb.store.db import open_store
        from pathdb.store import reader
        with open_store(sys.argv[1], read_only=True) as s:
            print(reader.list_runs(s)[["name", "n_paths"]].to_records(index=False).tolist())
    """
    procs = [_run_py(code, str(db)) for _ in range(2)]  # two concurrent readers are fine
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "[('shared', 8)]"


# ---- bad paths ------------------------------------------------------------------------------
def test_directory_missing_parent_and_not_duckdb(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"is a directory.*pathdb.duckdb"):
        open_store(tmp_path)
    missing = tmp_path / "no" / "such" / "x.duckdb"
    with pytest.raises(StoreError, match=r"directory .*no/such does not exist; create it"):
        open_store(missing)
    assert not (tmp_path / "no").exists()
    junk = tmp_path / "notes.txt"
    junk.write_text("hello, I am not a database\n" * 10)
    for ro in (False, True):
        with pytest.raises(StoreError, match=r"notes.txt is not a DuckDB database"):
            open_store(junk, read_only=ro)
    assert junk.read_text() == "hello, I am not a database\n" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(StoreError, match="no pathdb store at"):
        open_store(tmp_path / "absent.duckdb", read_only=True)
    with pytest.raises(StoreError, match="no pathdb store at"):
        open_store(tmp_path / "absent.duckdb", create=False)
    assert not (tmp_path / "absent.duckdb").exists()


def test_read_only_location(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # chmod does not stop root; sysfs refuses new files even for root.
        target = Path("/sys/pathdb-test.duckdb")
        if not Path("/sys").is_dir():
            pytest.skip("running as root and no /sys to act as a read-only location")
    else:
        ro_dir = tmp_path / "ro"
        ro_dir.mkdir()
        ro_dir.chmod(0o500)
        target = ro_dir / "x.duckdb"
    try:
        with pytest.raises(StoreError, match=r"(not writable|permission denied).*writable --db"):
            open_store(target)
        assert not target.exists()
    finally:
        if os.geteuid() != 0:
            target.parent.chmod(0o700)


def test_info_reports_counts(store: Store) -> None:
    w = RunWriter.create(store, name="i", meta=META)
    _hand_tree(w)
    w.finish("completed")
    info = store.info()
    assert info["revision"] == info["head"] == "0009"
    assert info["n_runs"] == 1 and info["n_paths"] == 8
    assert info["runs"][0] | {"created_at": None, "finished_at": None} == {
        "run_id": 1, "name": "i", "status": "completed", "created_at": None, "finished_at": None,
        "n_paths": 8, "n_complete": 3, "n_kept": 6, "n_nodes": 6, "n_prompts": 0,
    }  # fmt: skip
    assert info["size_bytes"] > 0
