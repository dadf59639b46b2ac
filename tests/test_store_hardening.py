"""Store hardening (issue 9): live reads during a search, one search per store, atomic --replace,
Ctrl-C inside a store write, a full disk, and why a run stopped (``stop_reason``)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.store import db as store_db
from pathdb.store.db import open_store, search_lock
from pathdb.store.errors import StoreError
from pathdb.store.writer import DiskFullError, RunWriter
from search import SearchParams, SearchRequest, resume_search, run_loaded
from search import runner as search_runner
from search.runner import RunInterrupted, run_search
from tests.interrupts import PATHDB, SLOW_SEARCH, run_cli

# A search that outlasts any machine's load (the test that uses it stops it with Ctrl-C).
LONG = [*SLOW_SEARCH[:-3], "0.0002", "--checkpoint-every", "0.2"]


def _start(*args: str, db: Path) -> subprocess.Popen[str]:
    """Start a CLI search and wait until its search phase began (the "started" line)."""
    proc = subprocess.Popen(
        [*PATHDB, *args, "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "started" in line, line + proc.stderr.read()
    return proc


def _runs(db: Path) -> dict[str, tuple[Any, ...]]:
    """name -> (run_id, status, stop_reason, n_paths, model_name, error) of every run."""
    with open_store(db, read_only=True) as store:
        rows = store.con.execute(
            "SELECT name, run_id, status, stop_reason, n_paths, model_name, error FROM v_runs"
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


@pytest.fixture(scope="module")
def toy() -> tuple[Any, Any]:
    model = load("toy-ioi-2l")
    return model, load_prompts("toy-ioi-small", model)


def _req(**params: Any) -> SearchRequest:
    return SearchRequest(model="toy-ioi-2l", prompts="toy-ioi-small", params=SearchParams(**params))


# ---- live reads while a search writes; one search per store -------------------------------------
@pytest.mark.slow
def test_readers_see_checkpoints_while_a_search_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "live.duckdb"
    proc = _start(*LONG, "-n", "live", db=db)
    try:
        time.sleep(1.0)  # a few checkpoints
        commands = {
            "runs": ["runs"],
            "paths": ["query", "paths", "live", "--top", "3"],
            "sql": ["sql", "SELECT count(*) AS n FROM paths"],
            "export": ["export", "live", "-o", str(tmp_path / "paths.parquet"), "--what", "paths"],
            # a second search into the same store is refused with one line
            "second": ["search", "-m", "toy-ioi-2l", "-n", "other", "-q"],
        }
        procs = {
            k: subprocess.Popen(
                [*PATHDB, *a, "--db", str(db)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k, a in commands.items()
        }
        outs = {k: (*p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
        # ... before it loads a model
        monkeypatch.setattr(
            search_runner,
            "_load_inputs",
            lambda req: pytest.fail(
                f"model loaded; the search process: {proc.poll()=} "
                + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
            ),
        )
        with pytest.raises(StoreError, match=r"being written by another search \(PID \d+\)"):
            run_search(_req(min_contribution=0.5), db, run_name="other2")
        still_running = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    second = outs.pop("second")
    for name, (_out, err_text, rc) in outs.items():
        assert rc == 0, f"{name}: {err_text}"
        assert "Traceback" not in err_text
    assert "live" in outs["runs"][0] and "running" in outs["runs"][0]
    assert "logits" in outs["paths"][0]  # stored paths up to the last checkpoint
    assert (tmp_path / "paths.parquet").stat().st_size > 0
    n_seen = max(int(x) for x in re.findall(r"\d+", outs["sql"][0].replace(",", "")))
    assert n_seen > 1
    assert second[2] == 2 and "Traceback" not in second[1]
    assert "another search (PID" in second[1] and len(second[1].strip().splitlines()) == 1
    assert still_running, "the search ended before the readers ran: make LONG slower"
    assert proc.returncode == 130 and "pathdb resume live --db" in err
    runs = _runs(db)
    assert runs["live"][1:3] == ("interrupted", "interrupted")
    assert runs["live"][3] >= n_seen  # nothing a reader saw was lost
    assert not (tmp_path / "live.duckdb.lock").exists()


def test_reader_gives_up_with_one_line_when_a_search_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "busy.duckdb"
    open_store(db).close()
    code = f"""
        import time
        from pathdb.store.db import open_store, search_lock
        with search_lock({str(db)!r}), open_store({str(db)!r}):
            print("ready", flush=True)
            time.sleep(60)
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        monkeypatch.setattr(store_db, "LOCK_WAIT_S", 0.5)
        t0 = time.perf_counter()
        with pytest.raises(
            StoreError, match=rf"is busy: a search \(PID {holder.pid}\) has kept it open"
        ) as ei:
            open_store(db, read_only=True)
        assert time.perf_counter() - t0 < 5
        assert "\n" not in str(ei.value)
        with (
            pytest.raises(StoreError, match=rf"another search \(PID {holder.pid}\)"),
            search_lock(db),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with search_lock(db):  # released by the kernel when its holder died
        assert store_db.search_holder(db) is None  # this process holds it


# ---- atomic --replace ---------------------------------------------------------------------------
@pytest.mark.slow
def test_replace_is_atomic_under_sigkill_and_resume_finishes_it(
    tmp_path: Path, toy: tuple[Any, Any]
) -> None:
    db = tmp_path / "rep.duckdb"
    model, prompts = toy
    old = run_loaded(_req(min_contribution=0.5), model, prompts, db, run_name="demo", quiet=True)
    before = _runs(db)["demo"]
    proc = _start(*SLOW_SEARCH, "-n", "demo", "--replace", db=db)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with open_store(db):  # a writable open marks the killed replacement interrupted
        pass
    runs = _runs(db)
    assert runs["demo"] == before  # the old run is untouched and still visible
    assert runs["demo.replacing"][1:3] == ("interrupted", "interrupted")
    assert runs["demo.replacing"][4] == "toy-ioi"
    res = resume_search("demo.replacing", db, quiet=True)
    assert (res.name, res.status) == ("demo", "completed")
    runs = _runs(db)
    assert set(runs) == {"demo"}
    assert runs["demo"][0] == res.run_id != old.run_id and runs["demo"][4] == "toy-ioi"
    with open_store(db, read_only=True) as store:  # no rows of the old run are left
        assert store.con.execute(
            "SELECT count(*) FROM paths WHERE run_id = ?", [old.run_id]
        ).fetchall() == [(0,)]


def test_completed_replacement_swaps_in_one_step(tmp_path: Path, toy: tuple[Any, Any]) -> None:
    db = tmp_path / "swap.duckdb"
    model, prompts = toy
    old = run_loaded(_req(min_contribution=0.5), model, prompts, db, run_name="demo", quiet=True)
    with open_store(db) as store:  # an evaluation of the old run (as `pathdb evaluate` stores it)
        store.con.execute(
            "INSERT INTO evaluations (evaluation_id, run_id, created_at, prompts, heldout, n_prompts, "
            "intervention, metric, score, n_edges_total, m_full, m_empty, package_version) "
            "VALUES (1, ?, now(), 'toy-ioi-heldout', true, 8, 'counterfactual', 'logit_difference', "
            "'score', 479, 1.0, 0.0, '0')",
            [old.run_id],
        )
        store.con.execute(
            "INSERT INTO evaluation_points VALUES (1, 0, 'signed', 1, 0.1, 1, 0.5, 0.5, 'mib')"
        )
    res = run_loaded(
        _req(min_contribution=0.3), model, prompts, db, run_name="demo", replace=True, quiet=True
    )
    with open_store(db, read_only=True) as store:
        left = store.con.execute(
            "SELECT (SELECT count(*) FROM evaluations), (SELECT count(*) FROM evaluation_points)"
        ).fetchall()
    assert left == [(0, 0)], "the replaced run's evaluations must go with it"
    runs = _runs(db)
    assert set(runs) == {"demo"} and runs["demo"][0] == res.run_id and res.name == "demo"
    with open_store(db, read_only=True) as store:
        (t,) = store.con.execute(
            "SELECT json_extract(params, '$.params.min_contribution') FROM runs"
        ).fetchone()  # type: ignore[misc]
    assert float(t) == 0.3


# ---- Ctrl-C inside a store write; a full disk ---------------------------------------------------
def _every_batch_req() -> SearchRequest:
    """A checkpoint at every opportunity: write batch 2 exists however fast the search runs."""
    return _req(min_contribution=0.05, checkpoint_every=1e-9)


def _before_batch_2_paths(
    monkeypatch: pytest.MonkeyPatch, action: Callable[[RunWriter], None]
) -> None:
    """Run ``action(writer)`` before each insert of write batch 2's paths (the writer's seam)."""
    original = RunWriter._insert_arrow

    def hooked(self: RunWriter, table_name: str, *a: Any, **k: Any) -> None:
        if table_name == "paths" and self.batch_id == 2:
            action(self)
        original(self, table_name, *a, **k)

    monkeypatch.setattr(RunWriter, "_insert_arrow", hooked)


def test_sigint_inside_a_store_write_ends_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy: tuple[Any, Any]
) -> None:
    db = tmp_path / "sig.duckdb"
    model, prompts = toy
    req = _every_batch_req()
    full = run_loaded(req, model, prompts, db, run_name="full", quiet=True)
    fired: list[bool] = []

    def ctrl_c_in_a_statement(writer: RunWriter) -> None:
        if not fired:
            # Ctrl-C lands while DuckDB runs a statement of the write transaction
            fired.append(True)
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            writer._tx().execute("SELECT count(*) FROM range(3000000000)").fetchall()

    _before_batch_2_paths(monkeypatch, ctrl_c_in_a_statement)
    with pytest.raises(RunInterrupted) as ei:
        run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    monkeypatch.undo()
    assert fired and ei.value.run_name == "r" and ei.value.db == str(db)
    r = _runs(db)["r"]
    assert r[1:3] == ("interrupted", "interrupted") and r[5] == "interrupted by the user (SIGINT)"
    with open_store(db, read_only=True) as store:  # the batch the signal landed in was committed
        assert store.con.execute(
            "SELECT max(batch_id) FROM paths p JOIN runs USING (run_id) WHERE name = 'r'"
        ).fetchall() == [(2,)]
    res = resume_search("r", db, quiet=True)
    assert res.status == "completed" and res.n_evaluated == full.n_evaluated


def test_disk_full_is_reported_and_resumable_injected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy: tuple[Any, Any]
) -> None:
    """The writer's insert seam raises ENOSPC (portable stand-in for the tmpfs test below)."""
    db = tmp_path / "full.duckdb"
    model, prompts = toy
    req = _every_batch_req()

    def enospc(writer: RunWriter) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    _before_batch_2_paths(monkeypatch, enospc)
    with pytest.raises(
        DiskFullError, match=r"no space left on device.*`pathdb resume r --db "
    ) as ei:
        run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    monkeypatch.undo()
    assert "\n" not in str(ei.value)
    r = _runs(db)["r"]
    assert r[1:3] == ("interrupted", "interrupted") and r[5].startswith("no space left on device")
    assert resume_search("r", db, quiet=True).status == "completed"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (root only, where mounting is allowed), unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_on_a_real_full_filesystem(tiny_tmpfs: Path) -> None:
    db = tiny_tmpfs / "s.duckdb"
    res = run_cli(*SLOW_SEARCH, "-q", "-n", "big", db=db, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on device" in lines[0]
    assert f"pathdb resume big --db {db}" in lines[0]
    r = _runs(db)["big"]
    assert r[1] in ("interrupted", "running")  # running: even marking it needed space
    if r[1] == "interrupted":
        assert r[5].startswith("no space left on device")


# ---- stop_reason ------------------------------------------------------------------------------
def test_stop_reason_says_why_a_run_stopped(tmp_path: Path, toy: tuple[Any, Any]) -> None:
    db = tmp_path / "why.duckdb"
    model, prompts = toy
    cases = {
        "full": _req(min_contribution=0.5),
        "timed": _req(min_contribution=0.01, max_time=1e-6),
        "top": _req(strategy="best-first", top_n=2),
        "beam": _req(strategy="level-width", max_width=5, max_time=1e-6),
    }
    for name, req in cases.items():
        res = run_loaded(req, model, prompts, db, run_name=name, quiet=True)
        assert res.status == "completed"
    runs = _runs(db)
    assert {n: runs[n][2] for n in cases} == {
        "full": "completed",
        "timed": "max_time",
        "top": "top_n",
        "beam": "max_time",
    }
    out = run_cli("runs", db=db)
    assert out.returncode == 0 and "stop_reason" in out.stdout and "max_time" in out.stdout


# ---- Ctrl-C while the CLI starts ------------------------------------------------------------------
@pytest.mark.parametrize(
    "module", ["typer", "search.runner"], ids=["module-imports", "engine-import"]
)
def test_sigint_during_startup_imports_exits_130_without_traceback(
    tmp_path: Path, module: str
) -> None:
    """Ctrl-C while ``pathdb`` imports its own modules (typer) or the engine (search.runner)."""
    code = f"""
        import builtins, os, signal, sys
        real = builtins.__import__
        def imp(name, *a, **k):
            if name == {module!r}:
                builtins.__import__ = real
                os.kill(os.getpid(), signal.SIGINT)
            return real(name, *a, **k)
        builtins.__import__ = imp
        sys.argv = ["pathdb", "search", "-q", "--db", {str(tmp_path / "s.duckdb")!r}]
        from cli.app import main
        main()
    """
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "s.duckdb").exists()


def test_a_search_waits_out_a_slow_reader(tmp_path: Path) -> None:
    """The searching process gets the file back even when a reader keeps it open for longer than
    the grace period a plain open waits (it once gave up after 0.5 s and the search failed)."""
    db = tmp_path / "wait.duckdb"
    open_store(db).close()
    code = f"""
        import duckdb, time
        con = duckdb.connect({str(db)!r}, read_only=True)
        print("ready", flush=True)
        time.sleep(1.5)
        con.close()
    """
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        with search_lock(db):
            t0 = time.perf_counter()
            con = store_db._connect_waiting(db, False, 30.0, reopening=True)
            con.close()
        assert time.perf_counter() - t0 > store_db.LOCK_GRACE_S
    finally:
        reader.wait(timeout=30)
