"""Read commands start fast (issue 9, item 9): they import none of the heavy modules.

`pathdb runs`, `pathdb query paths` and `pathdb sql` used to take 2-4 s, mostly importing
Alembic, SQLAlchemy, pandas and torch. The property tested here (not a time; see
benchmarks/bench_startup.py) is that a fresh process running those commands, or failing on a bad
run name, never imports them; and that the schema head read without Alembic is Alembic's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from migrations import make_config
from pathdb.store.db import head_revision, known_revisions, revision_graph
from tests.test_sql_readonly import build_store

HEAVY = ("torch", "alembic", "sqlalchemy", "pandas", "pyarrow", "networkx", "search")

# Runs each command in-process (as the `pathdb` entry point does), then reports what got imported.
PROBE = """
import json, sys
from cli.app import app
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        app(argv)
    except SystemExit as e:
        codes.append(e.code)
heavy = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "store.duckdb"
    build_store(path)
    return path


def run_commands(*argvs: list[str]) -> tuple[list[object], list[str], str]:
    """Exit codes, heavy modules imported, and stdout of ``argvs`` run in one fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["codes"], report["heavy"], proc.stdout


def test_read_commands_import_no_heavy_module(db: Path) -> None:
    codes, heavy, stdout = run_commands(
        ["runs", "--db", str(db)],
        ["query", "paths", "demo", "--top", "10", "--db", str(db)],
        ["sql", "SELECT count(*) AS n_paths_total FROM paths", "--db", str(db)],
    )
    assert codes == [0, 0, 0]
    assert heavy == []
    assert "demo" in stdout and "input@1 -> a0.h1<kv>@3:1 -> m1@3 -> logits@3" in stdout
    assert "n_paths_total" in stdout


def test_user_error_imports_no_heavy_module(db: Path) -> None:
    """A bad run name is reported without importing every error class's module (search.* loads torch)."""
    codes, heavy, _ = run_commands(["query", "paths", "nope", "--db", str(db)])
    assert codes == [2]
    assert heavy == []


def test_query_paths_output_file_still_written(db: Path, tmp_path: Path) -> None:
    """--output takes the DataFrame route (pandas is imported there, and only there)."""
    out = tmp_path / "top.csv"
    codes, heavy, _ = run_commands(["query", "paths", "demo", "--db", str(db), "-o", str(out)])
    assert codes == [0]
    assert "pandas" in heavy and "torch" not in heavy
    assert out.read_text().splitlines()[0].startswith("path_id,contribution")


def test_revisions_without_alembic_match_alembic() -> None:
    script = ScriptDirectory.from_config(make_config())
    assert head_revision() == script.get_current_head()
    assert revision_graph() == {r.revision: r.down_revision for r in script.walk_revisions()}
    assert known_revisions() == {r.revision for r in script.walk_revisions()}
