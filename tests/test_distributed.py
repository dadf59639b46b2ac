"""``--workers``: per-prompt searches sharded over Ray actors store exactly what one process
stores, also when a worker is killed mid-run, and a SIGKILLed driver's run resumes to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch

from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store
from pathdb.store.effects import stored_group_effects
from search import SearchParams, SearchRequest, distributed, resume_search, run_loaded, run_search
from search.runner import SearchError, run_many
from tests.cli_process import ROOT

ray: Any
try:
    import ray
except ImportError:  # the hint test below still runs
    ray = None
needs_ray = pytest.mark.skipif(
    ray is None, reason="Ray is not installed: pip install 'pathdb[distributed]'"
)

N_PROMPTS = 6
Paths = dict[tuple[int, str], tuple[Any, ...]]


def _paths(db: Path, name: str) -> Paths:
    """A run's stored paths keyed by (prompt, label string): score, depth, complete, kept, method."""
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT s.prompt_idx, s.path, s.contribution, s.depth, s.complete, s.kept, s.method "
            "FROM v_path_strings s JOIN runs r USING (run_id) WHERE r.name = ?",
            [name],
        ).fetchall()
    out = {(r[0], r[1]): r[2:] for r in rows}
    assert len(out) == len(rows), "a path was stored twice"
    return out


def _effects(db: Path, name: str) -> dict[str, float] | None:
    """A run's stored group effects (None: none)."""
    with open_store(db, read_only=True) as store:
        rid = store.con.execute("SELECT run_id FROM runs WHERE name = ?", [name]).fetchall()[0][0]
        return stored_group_effects(store.con, rid)


def _counters(db: Path, name: str) -> tuple[Any, ...]:
    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute(
            "SELECT status, n_evaluated, n_complete, n_kept FROM runs WHERE name = ?", [name]
        ).fetchall()
    return row[0]


def test_without_ray_workers_say_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--workers without Ray, or on a batch search, is refused in one line before any loading."""
    req = SearchRequest(model="toy-ioi-2l", prompt_mode="per-prompt")
    db = tmp_path / "unused.duckdb"
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SearchError, match=r"pip install 'pathdb\[distributed\]'"):
        run_search(req, db, workers=2)
    monkeypatch.undo()
    with pytest.raises(SearchError, match="add --prompt-mode per-prompt"):
        run_search(SearchRequest(model="toy-ioi-2l"), db, workers=2)
    with pytest.raises(SearchError, match="--ray-address needs --workers"):
        run_search(req, db, ray_address="127.0.0.1:6379")
    assert not db.exists()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 2-CPU local Ray cluster, 6 prompts of toy-ioi-small, and the run without workers."""
    d = tmp_path_factory.mktemp("dist")
    src = ROOT / "pathdb" / "data" / "prompts" / "toy-ioi-small.jsonl"
    prompts_file = d / "six.jsonl"
    prompts_file.write_text("".join(src.read_text().splitlines(keepends=True)[:N_PROMPTS]))
    model = load("toy-ioi-2l")
    prompts = load_prompts(prompts_file, model)
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts=str(prompts_file),
        prompt_mode="per-prompt",
        params=SearchParams(min_contribution=0.2),
    )
    base = d / "base.duckdb"
    run_loaded(req, model, prompts, base, run_name="local", quiet=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield {
            "model": model,
            "prompts": prompts,
            "req": req,
            "file": prompts_file,
            "paths": _paths(base, "local"),
            "counters": _counters(base, "local"),
            "effects": _effects(base, "local"),
        }
    finally:
        distributed.release_workers()
        ray.shutdown()


@needs_ray
def test_workers_store_what_one_process_stores(setup: dict[str, Any], tmp_path: Path) -> None:
    """2 workers: the same paths, scores and flags per prompt, and the same run counters; the
    driver measures the group effects with its model, so they are the one-process run's too."""
    db = tmp_path / "w.duckdb"
    res = run_loaded(
        setup["req"], setup["model"], setup["prompts"], db, run_name="w", quiet=True, workers=2
    )
    assert res.status == "completed"
    assert _paths(db, "w") == setup["paths"]
    assert _counters(db, "w") == setup["counters"]
    assert setup["effects"] is not None and _effects(db, "w") == setup["effects"]


@needs_ray
def test_killed_worker_is_retried(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of a worker process after the first prompt is written: Ray restarts the actor,
    its tasks are retried, and the run stores the identical result (nothing lost or doubled)."""
    actors = next(iter(distributed._POOLS.values()), [])
    assert len(actors) == 2, "the first test leaves a warm pool of 2 actors"
    victim = actors[1]
    old_pid = ray.get(victim.pid.remote())
    write = distributed.write_prompts
    calls = []

    def kill_after_first(writer: Any, results: list[Any]) -> None:
        write(writer, results)
        calls.append(len(results))
        if len(calls) == 1:
            os.kill(old_pid, signal.SIGKILL)

    monkeypatch.setattr(distributed, "write_prompts", kill_after_first)
    db = tmp_path / "k.duckdb"
    res = run_loaded(
        setup["req"], setup["model"], setup["prompts"], db, run_name="k", quiet=True, workers=2
    )
    assert res.status == "completed" and sum(calls) == N_PROMPTS
    assert ray.get(victim.pid.remote()) != old_pid  # the actor really died and was restarted
    assert _paths(db, "k") == setup["paths"]
    assert _counters(db, "k") == setup["counters"]


@needs_ray
def test_interrupted_run_resumes_with_workers(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the first prompts are written: the run is interrupted with exactly those
    prompts, and resume_search with workers writes the rest, ending identical (nothing doubled)."""
    write = distributed.write_prompts
    calls = []

    def interrupt_after_first(writer: Any, results: list[Any]) -> None:
        write(writer, results)
        calls.append(len(results))
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "write_prompts", interrupt_after_first)
    db = tmp_path / "i.duckdb"
    with pytest.raises(KeyboardInterrupt):
        run_loaded(
            setup["req"], setup["model"], setup["prompts"], db, run_name="i", quiet=True, workers=2
        )
    monkeypatch.undo()
    assert _counters(db, "i")[0] == "interrupted"
    assert len({k[0] for k in _paths(db, "i")}) == calls[0] < N_PROMPTS
    res = resume_search("i", db, quiet=True, workers=2)
    assert res.status == "completed"
    assert _paths(db, "i") == setup["paths"]
    assert _counters(db, "i") == setup["counters"]


def _written_prompts(db: Path) -> tuple[duckdb.DuckDBPyConnection, int] | None:
    """A read-only connection and the number of prompts written, or None while locked."""
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return None
    try:
        n = con.execute("SELECT count(DISTINCT prompt_idx) FROM paths").fetchall()[0][0]
    except duckdb.Error:  # the schema is not created yet
        con.close()
        return None
    return con, int(n)


# The CLI driver, SIGKILLed by itself right after its first checkpoint of finished prompts (a
# deterministic kill: polling the store from outside races the driver's next checkpoint).
KILL_AFTER_FIRST_WRITE = """
import os, signal, sys
import search.distributed as d
from cli.app import main
original = d.write_prompts
def write_then_die(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
d.write_prompts = write_then_die
sys.argv = ["pathdb", *sys.argv[1:]]
main()
"""


@needs_ray
def test_sigkilled_driver_resumes_to_the_same_result(setup: dict[str, Any], tmp_path: Path) -> None:
    """The CLI driver (one worker on the test's cluster, so its first checkpoint holds few
    prompts) dies by SIGKILL right after its first checkpoint; `pathdb resume` (no workers)
    skips the written prompts and ends identical."""
    distributed.release_workers()  # the subprocess's actor needs the cluster's CPUs
    db = tmp_path / "s.duckdb"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cli.app"]
    args = ["search", "-m", "toy-ioi-2l", "-p", str(setup["file"]), "--prompt-mode", "per-prompt"]
    args += ["-t", "0.2", "--db", str(db), "--run-name", "s", "-q", "--workers", "1"]
    args += ["--ray-address", ray.get_runtime_context().gcs_address]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_WRITE, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    got = _written_prompts(db)
    assert got is not None
    got[0].close()
    assert 1 <= got[1] <= N_PROMPTS
    assert _counters(db, "s")[0] == "running"  # the driver died without closing the run
    res = subprocess.run(
        [*cmd, "resume", "s", "--db", str(db), "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert _paths(db, "s") == setup["paths"]
    assert _counters(db, "s") == setup["counters"]


def _two_sets(setup: dict[str, Any]) -> list[SearchRequest]:
    """Two batch searches of toy-ioi-2l, on the first and on the last 3 of the six prompts."""
    lines = Path(setup["file"]).read_text().splitlines(keepends=True)
    reqs = []
    for i, part in enumerate((lines[:3], lines[3:])):
        f = Path(setup["file"]).with_name(f"set{i}.jsonl")
        f.write_text("".join(part))
        reqs.append(
            SearchRequest(
                model="toy-ioi-2l", prompts=str(f), params=SearchParams(min_contribution=0.2)
            )
        )
    return reqs


@pytest.fixture(scope="module")
def batch_base(setup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two batch runs of :func:`_two_sets` without workers: their paths and counters."""
    db = tmp_path_factory.mktemp("batch") / "base.duckdb"
    res = run_many(_two_sets(setup), db, run_names=["a", "b"], quiet=True)
    assert [r.status for r in res] == ["completed", "completed"]
    return {n: (_paths(db, n), _counters(db, n)) for n in ("a", "b")}


@needs_ray
def test_batch_runs_as_worker_tasks_store_the_same(
    setup: dict[str, Any], batch_base: dict[str, Any], tmp_path: Path
) -> None:
    """run_many with 2 workers: each batch run is one task, and both runs store the same paths,
    scores and counters as the same runs searched one after another without workers."""
    db = tmp_path / "bw.duckdb"
    res = run_many(_two_sets(setup), db, run_names=["a", "b"], quiet=True, workers=2)
    assert [(r.name, r.status) for r in res] == [("a", "completed"), ("b", "completed")]
    for name, (paths, counters) in batch_base.items():
        assert _paths(db, name) == paths
        assert _counters(db, name) == counters


@needs_ray
def test_interrupted_batch_runs_resume_to_the_same(
    setup: dict[str, Any],
    batch_base: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C as the first batch run is written: both runs are left interrupted (one with all
    its paths, one with none), and resuming each ends identical to the uninterrupted runs."""
    write = distributed.write_prompts

    def interrupt_after_write(writer: Any, results: list[Any]) -> None:
        write(writer, results)
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "write_prompts", interrupt_after_write)
    db = tmp_path / "bi.duckdb"
    with pytest.raises(KeyboardInterrupt):
        run_many(_two_sets(setup), db, run_names=["a", "b"], quiet=True, workers=2)
    monkeypatch.undo()
    assert [_counters(db, n)[0] for n in ("a", "b")] == ["interrupted", "interrupted"]
    assert sorted(bool(_paths(db, n)) for n in ("a", "b")) == [False, True]
    with pytest.raises(SearchError, match=r"is a batch search, which resumes .* drop --workers"):
        resume_search("a", db, quiet=True, workers=2)
    for name, (paths, counters) in batch_base.items():
        assert resume_search(name, db, quiet=True).status == "completed"
        assert _paths(db, name) == paths
        assert _counters(db, name) == counters


@needs_ray
def test_worker_refuses_a_model_with_other_weights(setup: dict[str, Any], tmp_path: Path) -> None:
    """The driver's model differs from the one a worker loads by name: the worker refuses to
    search (fingerprint mismatch), the run fails with that cause in one line, nothing stored."""
    model = load("toy-ioi-2l")
    with torch.no_grad():
        next(iter(model.parameters())).add_(0.01)
    db = tmp_path / "fp.duckdb"
    with pytest.raises(SearchError, match="has other weights than the driver's") as e:
        run_loaded(setup["req"], model, setup["prompts"], db, run_name="fp", quiet=True, workers=2)
    assert "\n" not in str(e.value)
    assert _counters(db, "fp")[0] == "failed"
    assert _paths(db, "fp") == {}


@needs_ray
def test_cli_resume_with_workers(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pathdb resume RUN --workers 1 --ray-address ADDR` finishes a per-prompt run interrupted
    after its first prompts, ending identical."""
    write = distributed.write_prompts

    def interrupt_after_first(writer: Any, results: list[Any]) -> None:
        write(writer, results)
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "write_prompts", interrupt_after_first)
    db = tmp_path / "cr.duckdb"
    with pytest.raises(KeyboardInterrupt):
        run_loaded(
            setup["req"], setup["model"], setup["prompts"], db, run_name="r", quiet=True, workers=2
        )
    monkeypatch.undo()
    distributed.release_workers()  # the subprocess's actor needs a CPU of the cluster
    assert 1 <= len({k[0] for k in _paths(db, "r")}) < N_PROMPTS
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cli.app", "resume", "r", "--db", str(db), "-q"]
    address = ray.get_runtime_context().gcs_address
    res = subprocess.run(
        [*cmd, "--workers", "1", "--ray-address", address],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert _paths(db, "r") == setup["paths"]
    assert _counters(db, "r") == setup["counters"]
