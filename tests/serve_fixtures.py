"""Stores and a live `pathdb serve` process shared by the explorer tests (test_serve*.py).

The demo store is made once per test session by the real CLI (`pathdb search --run-name demo`,
the README's first command) and reused by both test files, as is its copy with a second,
evaluated run for the compare view; the small store is hand-written
(per-prompt and batch runs, a stored evaluation) and stamped as a current pathdb store.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pathdb.evaluate.results import CurvePoint, Evaluation
from pathdb.evaluate.storage import save_evaluation
from pathdb.graph import Node
from pathdb.store import views
from pathdb.store.db import head_revision, stamp
from tests.cli_process import ROOT, pathdb
from tests.conftest_query import TreeBuilder, add_prompt, add_run, make_store

E, A, M = Node.embed, Node.attn, Node.mlp
F = Node.final(2, 3)
# per-prompt run "per": prompt -> (path, contribution); batch run "batch" reuses prompt 0's paths
PER_PROMPT: dict[int, list[tuple[tuple[Node, ...], float]]] = {
    0: [((E(1), A(0, 1, "kv", 3, 1), F), 2.0), ((E(3), A(0, 1, "q", 3), F), -1.0), ((E(2), M(1, 3), F), 0.25)],
    1: [((E(2), A(0, 1, "kv", 3, 2), F), 1.0), ((E(3), M(1, 3), F), 0.5), ((E(0), A(0, 0, "q", 3), M(1, 3), F), -0.75)],
    2: [((E(1), A(0, 1, "kv", 3, 1), F), -0.5)],
}  # fmt: skip


_MADE: dict[str, Path] = {}  # what this session already made: session dir, stores


def _session_dir(factory: pytest.TempPathFactory) -> Path:
    """One directory per test session under pytest's base temp (which pytest cleans up)."""
    if "dir" not in _MADE:
        _MADE["dir"] = factory.mktemp("serve")
    return _MADE["dir"]


def demo_store(factory: pytest.TempPathFactory) -> Path:
    """A store holding the bundled demo run, made by the real CLI once per session."""
    db = _session_dir(factory) / "demo.duckdb"
    if "demo" not in _MADE:
        res = pathdb(
            "search", "--run-name", "demo", "-q", "--db", str(db), cwd=db.parent, timeout=600
        )
        assert res.returncode == 0, res.stderr
        _MADE["demo"] = db
    return db


def compare_store(factory: pytest.TempPathFactory) -> Path:
    """The demo store plus run "attr" (`pathdb search --method attribution`), both evaluated by
    the real CLI (`pathdb evaluate demo attr`): two runs to put side by side, made once."""
    db = _session_dir(factory) / "compare.duckdb"
    if "compare" not in _MADE:
        shutil.copyfile(demo_store(factory), db)
        for args in (
            ("search", "--method", "attribution", "-n", "attr", "-q"),
            ("evaluate", "demo", "attr", "--no-paths", "--scan-step", "20"),
        ):
            res = pathdb(*args, "--db", str(db), cwd=db.parent, timeout=600)
            assert res.returncode == 0, res.stderr
        _MADE["compare"] = db
    return db


def small_store(factory: pytest.TempPathFactory) -> Path:
    """Runs "per" (per-prompt, 3 prompts) and "batch" (with a stored evaluation), made once."""
    db = _session_dir(factory) / "small.duckdb"
    if "small" not in _MADE:
        _write_small(db)
        _MADE["small"] = db
    return db


def _write_small(db: Path) -> None:
    con = make_store(db)
    add_run(con, 1, "per", prompt_mode="per-prompt")
    tb = TreeBuilder(1)
    for p, paths in PER_PROMPT.items():
        add_prompt(con, 1, p, 4, None)
        for path, v in paths:
            tb.add(path, v, prompt=p)
    tb.add((A(0, 0, "q", 3), F), 0.01, prompt=0, kept=False)  # a pruned partial: a tree leaf
    tb.write(con)
    add_run(con, 2, "batch", prompt_mode="batch")
    tb = TreeBuilder(2)
    for path, v in PER_PROMPT[0] + PER_PROMPT[1]:
        tb.add(path, v)
    tb.write(con)
    stamp(con, head_revision())
    views.install(con)
    points = [
        CurvePoint("abs", k, k / 8, k, 0.1 * k, min(1.0, 0.2 * k), "mib") for k in (1, 2, 4, 8)
    ] + [CurvePoint("signed", k, k / 8, k, 0.1 * k, 0.1 * k, "mib") for k in (1, 2, 4, 8)]
    ev = Evaluation(
        run_id=2, run_name="batch", prompts="toy-ioi-small", heldout=False, intervention="counterfactual",
        metric="logit_diff", score="score", n_prompts=8, n_edges_total=8, m_full=1.0, m_empty=0.0,
        points=points, cpr=0.71, cmd=0.12, edges_80=4, edges_90=8, wall_s=1.5,
    )  # fmt: skip
    save_evaluation(con, ev)
    con.close()


@contextmanager
def serving(db: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`pathdb serve --db DB --port 0 ARGS` in a subprocess; yields (URL, process)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.app", "serve", "--db", str(db), "--port", "0", *args],
        cwd=db.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "HOME": str(db.parent),
            "PYTHONUNBUFFERED": "1",
        },
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"http://\S+/", line)
        if not found:
            proc.kill()
            raise AssertionError(f"no URL from pathdb serve: {line!r} {proc.communicate()}")
        yield found.group(0), proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def artifacts_dir(factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests save screenshots (PATHDB_TEST_ARTIFACTS, else the session dir)."""
    out = Path(os.environ.get("PATHDB_TEST_ARTIFACTS") or _session_dir(factory) / "screens")
    out.mkdir(parents=True, exist_ok=True)
    return out
