"""A search killed with SIGINT or SIGKILL leaves a consistent store, and `pathdb resume` ends with
exactly the paths and scores of an uninterrupted run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pathdb.store.db import open_store
from tests.interrupts import PATHDB, SLOW_SEARCH, run_cli


def _paths(db: Path, name: str) -> dict[tuple[str, ...], tuple[float | None, bool, str]]:
    with open_store(db, read_only=True) as store:
        rows = store.con.execute(
            "SELECT s.path, p.contribution, p.kept, p.method FROM v_path_strings s "
            "JOIN paths p USING (run_id, path_id) JOIN runs r USING (run_id) WHERE r.name = ?",
            [name],
        ).fetchall()
    out: dict[tuple[str, ...], tuple[float | None, bool, str]] = {}
    for path, c, kept, method in rows:
        key = tuple(path.split(" -> "))
        assert key not in out, f"path stored twice: {path}"
        out[key] = (c, kept, method)
    return out


def _status(db: Path, name: str) -> str:
    with open_store(db) as store:  # a writable open marks dead 'running' runs 'interrupted'
        (status,) = store.con.execute("SELECT status FROM runs WHERE name = ?", [name]).fetchone()  # type: ignore[misc]
    return str(status)


def _consistent(db: Path, name: str) -> None:
    """Every stored path's parent is stored; every frontier entry is a stored, kept, incomplete path."""
    with open_store(db, read_only=True) as store:
        (orphans,) = store.con.execute(
            "SELECT count(*) FROM paths c JOIN runs r USING (run_id) WHERE r.name = ? AND c.parent_id IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM paths p WHERE p.run_id = c.run_id AND p.path_id = c.parent_id)",
            [name],
        ).fetchone()  # type: ignore[misc]
        (bad_frontier,) = store.con.execute(
            "SELECT count(*) FROM frontier f JOIN runs r USING (run_id) WHERE r.name = ? AND NOT EXISTS "
            "(SELECT 1 FROM paths p WHERE p.run_id = f.run_id AND p.path_id = f.path_id AND p.kept AND NOT p.complete)",
            [name],
        ).fetchone()  # type: ignore[misc]
    assert orphans == 0 and bad_frontier == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, float]:
    db = tmp_path_factory.mktemp("ref") / "ref.duckdb"
    t0 = time.perf_counter()
    res = run_cli(*SLOW_SEARCH, "-q", "--run-name", "full", db=db, timeout=600)
    total = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    with open_store(db, read_only=True) as store:
        (wall,) = store.con.execute("SELECT wall_s FROM runs WHERE name = 'full'").fetchone()  # type: ignore[misc]
    assert wall > 3.0, "the reference search is too short to interrupt reliably"
    return db, total - wall, wall


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_search_resumes_to_the_same_result(
    tmp_path: Path, reference: tuple[Path, float, float], sig: int
) -> None:
    ref_db, _, wall = reference
    db = tmp_path / "s.duckdb"
    proc = subprocess.Popen(
        [*PATHDB, *SLOW_SEARCH, "--run-name", "r", "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "run 'r' (id 1) started: ..." once the search phase begins
    assert "started" in line, line
    time.sleep(0.5 * wall)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "pathdb resume r" in err
    assert _status(db, "r") == "interrupted"
    _consistent(db, "r")
    partial = _paths(db, "r")
    full = _paths(ref_db, "full")
    assert 0 < len(partial) < len(full)
    res = run_cli("resume", "r", "-q", db=db, timeout=600)
    assert res.returncode == 0, res.stderr
    assert _status(db, "r") == "completed"
    got = _paths(db, "r")
    assert set(got) == set(full)
    for k, (c, kept, method) in full.items():
        gc, gk, gm = got[k]
        assert gk == kept and gm == method
        assert (c is None and gc is None) or math.isclose(gc, c, rel_tol=1e-6, abs_tol=1e-9)  # type: ignore[arg-type]


def test_second_writer_gets_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathdb.store.db import open_store; import time; s = open_store({str(db)!r}); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        res = run_cli(*SLOW_SEARCH, "-q", "--run-name", "x", db=db, timeout=600)
        assert res.returncode == 2
        assert "another" in res.stderr.lower() and "Traceback" not in res.stderr
    finally:
        holder.kill()
        holder.wait()
