"""`pathdb sql` read-only mode touches nothing but the store (issue 9, item 1; item 4's SQL part).

Each probe a hostile-but-fair user tried (writes through EXPLAIN ANALYZE, extension installs,
reads of arbitrary files) is refused with one line, through the CLI and the Python API, and every
file in sight keeps its checksum; legitimate queries (SELECT, PIVOT, EXPLAIN) still work, and a
long query stops on the first Ctrl-C.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathdb.graph import Node
from pathdb.query import QueryError, sql
from pathdb.store.db import open_store
from tests.conftest_query import TreeBuilder, add_run

PATHDB = [sys.executable, "-m", "cli.app"]
F = Node.final(2, 3)


def build_store(path: Path) -> None:
    """A migrated store (views installed) with one completed run of two complete paths."""
    with open_store(path) as store:
        add_run(store.con, 1, "demo")
        tb = TreeBuilder(1)
        tb.add((Node.embed(3), Node.attn(0, 1, "q", 3), F), 1.0, prompt=0)
        tb.add((Node.embed(1), Node.attn(0, 1, "kv", 3, 1), Node.mlp(1, 3), F), -2.0, prompt=0)
        tb.write(store.con)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The store, another store, and other files a query could try to read or overwrite."""
    d = tmp_path_factory.mktemp("ro")
    f = {
        "store": d / "store.duckdb", "other": d / "other.duckdb", "secret": d / "secret.txt",
        "csv": d / "data.csv", "parquet": d / "data.parquet",
    }  # fmt: skip
    build_store(f["store"])
    shutil.copy(f["store"], f["other"])
    f["secret"].write_text("top secret\n")
    f["csv"].write_text("a,b\n1,2\n")
    pq.write_table(pa.table({"a": [1]}), f["parquet"])
    return f


def checksums(d: Path) -> dict[str, str]:
    """sha256 of every file under ``d`` (new files and directories show up as new keys)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


def probes(f: dict[str, Path]) -> list[str]:
    """Statements read-only mode must refuse (each one worked or was attempted before)."""
    d = f["store"].parent
    return [
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{f['other']}'",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{f['other']}' (FORMAT csv)",
        "EXPLAIN ANALYZE INSTALL httpfs",
        "INSTALL httpfs",
        "LOAD httpfs",
        "UPDATE EXTENSIONS",
        "SELECT * FROM read_text('/etc/shadow')",
        f"SELECT * FROM read_text('{f['secret']}')",
        f"SELECT * FROM read_csv('{f['csv']}')",
        f"SELECT * FROM '{f['csv']}'",
        f"SELECT * FROM glob('{d}/*')",
        f"SELECT * FROM read_blob('{f['secret']}')",
        f"SELECT * FROM read_parquet('{f['parquet']}')",
        f"SELECT * FROM sniff_csv('{f['csv']}')",
        f"SELECT * FROM query('SELECT * FROM read_text(''{f['secret']}'')')",
        f"ATTACH '{f['other']}' AS o",
        f"COPY runs TO '{d / 'out.csv'}'",
        f"EXPORT DATABASE '{d / 'dump'}'",
        "SET enable_external_access = true",
        "PRAGMA enable_profiling",
        "SELECT 1; DELETE FROM runs",
        "EXPLAIN ANALYZE DELETE FROM runs",
        "CREATE TABLE t AS PIVOT runs ON status USING count(*)",
    ]


def test_probes_refused_python(files: dict[str, Path]) -> None:
    d = files["store"].parent
    before = checksums(d)
    with open_store(files["store"], read_only=True) as store:
        for probe in probes(files):
            with pytest.raises(QueryError) as info:
                sql(store.con, probe)
            assert "\n" not in str(info.value), probe
        assert len(sql(store.con, "SELECT * FROM runs")) == 1
    assert checksums(d) == before


def test_writes_refused_on_a_writable_connection(tmp_path: Path) -> None:
    """read_only=True refuses statements that write or install even on a caller's writable
    connection (only reads of other files need the locked connection of a read-only store)."""
    build_store(tmp_path / "w.duckdb")
    with open_store(tmp_path / "w.duckdb") as store:
        for probe in (
            f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp_path / 'x.duckdb'}'",
            "EXPLAIN ANALYZE INSTALL httpfs",
            "UPDATE EXTENSIONS",
            "EXPLAIN (ANALYZE) DELETE FROM runs",
            "/* hi */ EXPLAIN ANALYZE -- there\n UPDATE runs SET name = 'x'",
            "PRAGMA force_checkpoint",
            "EXPLAIN ANALYZE CREATE TABLE t AS PIVOT runs ON status USING count(*)",
        ):
            with pytest.raises(QueryError, match=r"not allowed in read-only mode"):
                sql(store.con, probe)
        assert sql(store.con, "SELECT name FROM runs")["name"].tolist() == ["demo"]
    assert not (tmp_path / "x.duckdb").exists()


# The probes of the issue, each through a real `pathdb sql` process (all probes: Python above).
CLI_PROBES = [0, 2, 5, 6, 8, 10, 11, 12]


@pytest.mark.parametrize("index", CLI_PROBES)
def test_probes_refused_cli(files: dict[str, Path], index: int) -> None:
    probe = probes(files)[index]
    d = files["store"].parent
    before = checksums(d)
    proc = subprocess.run(
        [*PATHDB, "sql", probe, "--db", str(files["store"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, (probe, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert checksums(d) == before


def test_legitimate_queries_work(files: dict[str, Path]) -> None:
    with open_store(files["store"], read_only=True) as store:
        con = store.con
        assert sql(con, "SELECT count(*) AS n FROM paths WHERE complete")["n"].tolist() == [2]
        assert sql(con, "PIVOT runs ON status USING count(*)")["completed"].tolist() == [1]
        assert sql(
            con, "WITH r AS (SELECT status FROM runs) PIVOT r ON status USING count(*)"
        ).shape == (1, 1)
        assert "explain_value" in sql(con, "EXPLAIN SELECT * FROM v_path_strings").columns
        assert not sql(con, "EXPLAIN ANALYZE SELECT count(*) FROM v_paths").empty
        assert not sql(con, "EXPLAIN ANALYZE PIVOT runs ON status USING count(*)").empty
        assert not sql(con, "EXPLAIN (FORMAT json) SELECT 1").empty
        assert "column_name" in sql(con, "DESCRIBE runs").columns
        assert "name" in sql(con, "PRAGMA table_info('runs')").columns
        assert len(sql(con, "SUMMARIZE paths")) > 0
        assert sql(con, "-- comment\nSELECT 1 AS a; SELECT 2 AS b")["b"].tolist() == [2]


def test_pivot_and_explain_through_cli(files: dict[str, Path]) -> None:
    db = str(files["store"])
    pivot = subprocess.run([*PATHDB, "sql", "PIVOT (SELECT status FROM runs) ON status USING count(*)", "--db", db],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert pivot.returncode == 0 and "completed" in pivot.stdout, pivot.stderr
    explain = subprocess.run([*PATHDB, "sql", "EXPLAIN ANALYZE SELECT count(*) FROM v_paths", "--db", db],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert explain.returncode == 0 and "analyzed_plan" in explain.stdout, explain.stderr


def test_write_mode_is_unrestricted(tmp_path: Path) -> None:
    """--write runs any statement: it may write other files (documented in the README)."""
    build_store(tmp_path / "w.duckdb")
    out = tmp_path / "runs.csv"
    proc = subprocess.run(
        [*PATHDB, "sql", f"COPY (SELECT name FROM runs) TO '{out}'", "--write", "--db", str(tmp_path / "w.duckdb")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines() == ["name", "demo"]
    create = subprocess.run(
        [*PATHDB, "sql", "CREATE TABLE notes (x INT)", "--write", "--db", str(tmp_path / "w.duckdb")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert create.returncode == 0 and "no result set" in create.stderr, create.stderr


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_long_query_stops_on_first_ctrl_c(files: dict[str, Path]) -> None:
    long_query = "SELECT sum(a.range * b.range) FROM range(100000) a, range(10000000) b"
    proc = subprocess.Popen(
        [*PATHDB, "sql", long_query, "--db", str(files["store"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        # Start-up costs well under 1.5 s of CPU; beyond that the query is running.
        while cpu_seconds(proc.pid) < 1.5 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
        assert time.monotonic() - sent < 3.0
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "the SQL query was stopped" in stderr and "Traceback" not in stderr
