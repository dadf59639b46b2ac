"""``pathdb search --each -p A -p B -m X -m Y [--workers N]``: one run per (prompt set, model) pair,
stored exactly as the same runs searched one at a time, resumable after a SIGKILLed driver,
and bad requests refused in one line with nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from typer.testing import CliRunner

from cli.app import app
from search import SearchParams, SearchRequest, distributed, resume_search, run_search
from search.runner import SearchError, run_many
from tests.cli_process import ROOT, pathdb
from tests.test_distributed import _paths

ray: Any
try:
    import ray
except ImportError:  # the install-hint test below still runs
    ray = None
needs_ray = pytest.mark.skipif(
    ray is None, reason="Ray is not installed: pip install 'pathdb[distributed]'"
)

MODELS = ("toy-ioi-2l", "toy-ioi")
T = "0.3"  # a high threshold keeps every search small


def _runs(db: Path) -> dict[str, tuple[Any, ...]]:
    """Every run of a store: name -> (status, model, prompt mode, n_evaluated, n_complete, n_kept)."""
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT name, status, model_name, prompt_mode, n_evaluated, n_complete, n_kept FROM runs"
        ).fetchall()
    return {r[0]: r[1:] for r in rows}


def _clean_prompts(db: Path, name: str) -> list[str]:
    """The clean prompts a run stored, in prompt order."""
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT p.clean FROM prompts p JOIN runs r USING (run_id) WHERE r.name = ? "
            "ORDER BY p.prompt_idx",
            [name],
        ).fetchall()
    return [r[0] for r in rows]


def _req(prompts: Path, model: str, mode: str = "batch") -> SearchRequest:
    return SearchRequest(
        model=model,
        prompts=str(prompts),
        prompt_mode=mode,
        params=SearchParams(min_contribution=float(T)),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two 3-prompt sets (a, b), each (set, model) pair searched alone without workers (batch,
    and per-prompt on toy-ioi-2l), and a 2-CPU local Ray cluster."""
    d = tmp_path_factory.mktemp("many")
    lines = (
        (ROOT / "pathdb" / "data" / "prompts" / "toy-ioi-small.jsonl").read_text().splitlines(True)
    )
    files = {"a": d / "a.jsonl", "b": d / "b.jsonl"}
    files["a"].write_text("".join(lines[:3]))
    files["b"].write_text("".join(lines[-3:]))
    base = d / "base.duckdb"
    for p, f in files.items():
        for m in MODELS:
            run_search(_req(f, m), base, run_name=f"{p}/{m}", quiet=True)
        run_search(_req(f, MODELS[0], "per-prompt"), base, run_name=f"pp/{p}", quiet=True)
    if ray is not None:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield {"dir": d, "files": files, "base": base}
    finally:
        if ray is not None:
            distributed.release_workers()
            ray.shutdown()


def _cli(args: list[str], cwd: Path, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI (or ``script`` running it) in a subprocess with this environment: a Ray client
    needs the cluster's auth token from the user's home."""
    run = ["-m", "cli.app"] if script is None else ["-c", script]
    return subprocess.run(
        [sys.executable, *run, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _same_as_base(setup: dict[str, Any], db: Path, got: str, base: str) -> None:
    """Run ``got`` of ``db`` stores what the single run ``base`` stored: paths, scores, flags,
    status, model, prompt mode and counters."""
    assert _paths(db, got) == _paths(setup["base"], base)
    assert _paths(db, got), "an empty run compares equal to anything"
    assert _runs(db)[got] == _runs(setup["base"])[base]


@needs_ray
def test_cli_runs_with_workers_store_what_single_runs_store(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    """`pathdb search --each -p a -p b -m toy-ioi-2l -m toy-ioi --workers 2 -n m` makes the 4 runs
    m/PROMPTS/MODEL, each on its own prompts and model, identical to the 4 single runs."""
    distributed.release_workers()  # the subprocess's actors need the cluster's 2 CPUs
    db = tmp_path / "m.duckdb"
    f = setup["files"]
    args = [
        "search",
        "--each",
        "-p",
        str(f["a"]),
        "-p",
        str(f["b"]),
        "-m",
        MODELS[0],
        "-m",
        MODELS[1],
    ]
    args += ["-t", T, "-n", "m", "--db", str(db), "-q", "--workers", "2"]
    args += ["--ray-address", ray.get_runtime_context().gcs_address]
    res = _cli(args, tmp_path)
    assert res.returncode == 0, res.stderr
    assert set(_runs(db)) == {f"m/{p}/{m}" for p in f for m in MODELS}
    for p, file in f.items():
        clean = [json.loads(line)["clean"] for line in file.read_text().splitlines()]
        for m in MODELS:
            assert _clean_prompts(db, f"m/{p}/{m}") == clean
            _same_as_base(setup, db, f"m/{p}/{m}", f"{p}/{m}")
    assert "4 runs" in res.stdout and "m/b/toy-ioi" in res.stdout


@pytest.mark.parametrize("workers", [None, 2], ids=["in-process", "workers"])
def test_per_prompt_runs(setup: dict[str, Any], tmp_path: Path, workers: int | None) -> None:
    """Two per-prompt runs, one after another in this process or with 2 workers (one task per
    prompt of either run, in one pool): both runs equal the single per-prompt runs."""
    if workers is not None and ray is None:
        pytest.skip("Ray is not installed")
    db = tmp_path / "pp.duckdb"
    reqs = [_req(setup["files"][p], MODELS[0], "per-prompt") for p in ("a", "b")]
    res = run_many(reqs, db, run_names=["pp/a", "pp/b"], quiet=True, workers=workers)
    assert [(r.name, r.status) for r in res] == [("pp/a", "completed"), ("pp/b", "completed")]
    for name in ("pp/a", "pp/b"):
        _same_as_base(setup, db, name, name)


# The CLI driver, SIGKILLed by itself right after the first run is completed in the store.
KILL_AFTER_FIRST_RUN = """
import os, signal, sys
import search.runner as r
from cli.app import main
original = r._finish
def finish_then_die(*args, **kwargs):
    result = original(*args, **kwargs)
    if result.status == "completed":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
r._finish = finish_then_die
sys.argv = ["pathdb", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("workers", [None, 1], ids=["in-process", "workers"])
def test_sigkilled_driver_leaves_the_other_runs_resumable(
    setup: dict[str, Any], tmp_path: Path, workers: int | None
) -> None:
    """The multi-run CLI driver dies by SIGKILL right after its first run completes: that run is
    complete, the other exists with no paths, and resuming it (``resume_search``, what `pathdb
    resume` runs) ends identical to the single run (in-process runs one after another; with a
    worker, batch runs as Ray tasks)."""
    if workers is not None and ray is None:
        pytest.skip("Ray is not installed")
    if ray is not None:
        distributed.release_workers()  # the subprocess's actor needs a CPU of the cluster
    db = tmp_path / "k.duckdb"
    f = setup["files"]
    args = ["search", "--each", "-p", str(f["a"]), "-p", str(f["b"]), "-m", MODELS[0]]
    args += ["-t", T, "--db", str(db), "-q"]
    if workers is not None:
        args += ["--workers", str(workers), "--ray-address", ray.get_runtime_context().gcs_address]
    killed = _cli(args, tmp_path, script=KILL_AFTER_FIRST_RUN)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names = [f"{p}/{MODELS[0]}" for p in ("a", "b")]
    status = {n: _runs(db)[n][0] for n in names}
    done = [n for n in names if status[n] == "completed"]
    assert len(done) == 1 and status[names[1 - names.index(done[0])]] == "running"
    rest = next(n for n in names if n not in done)
    assert _paths(db, rest) == {}
    assert resume_search(rest, db, quiet=True).status == "completed"
    for n in names:
        _same_as_base(setup, db, n, n)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_requests_are_refused_in_one_line(setup: dict[str, Any], tmp_path: Path) -> None:
    """Two prompt files of one name (the CLI in a subprocess), an unknown prompt set, and run
    names already in the store are each refused with one line naming the input, exit code 2,
    before anything is written."""
    f = setup["files"]
    (tmp_path / "sub").mkdir()
    twin = tmp_path / "sub" / "a.jsonl"
    twin.write_text(f["a"].read_text())
    db = tmp_path / "new.duckdb"
    res = pathdb(
        "search", "--each", "-p", str(f["a"]), "-p", str(twin), "--db", str(db), cwd=tmp_path
    )
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: -p {f['a']} -m toy-ioi and -p {twin} -m toy-ioi would both be run 'a/toy-ioi': "
        "give each -p / -m once, and prompt files (or model directories) distinct names"
    ]
    cases = [
        (["-p", str(f["a"]), "-p", "no-such-set"], db, "error: -p no-such-set: no such prompt file"),
        (["-p", str(f["a"]), "-p", str(f["b"]), "-m", MODELS[0]], setup["base"], "error: run 'a/toy-ioi-2l' already exists"),
        (["-p", str(f["a"]), "-m", MODELS[0], "-m", MODELS[1], "-n", "x", "--replace"], db, "error: --replace overwrites one run"),
    ]  # fmt: skip
    before = _sha(setup["base"])
    for args, store, message in cases:
        got = CliRunner().invoke(app, ["search", "--each", *args, "--db", str(store), "-q"])
        assert got.exit_code == 2, got.output
        assert got.stderr.startswith(message) and len(got.stderr.strip().splitlines()) == 1, (
            got.stderr
        )
    assert not db.exists() and not list(tmp_path.glob("*.duckdb*"))
    assert _sha(setup["base"]) == before


def test_without_ray_several_runs_with_workers_say_how_to_install_it(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Several runs with workers but no Ray: the install hint, before any model loads."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    reqs = [_req(setup["files"][p], MODELS[0]) for p in ("a", "b")]
    db = tmp_path / "no.duckdb"
    with pytest.raises(SearchError, match=r"pip install 'pathdb\[distributed\]'"):
        run_many(reqs, db, run_names=["x", "y"], workers=2)
    assert not db.exists()


def test_ctrl_c_names_the_resume_command_of_every_run_left(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C right after the first of two in-process runs completes: exit code 130, the other
    run is left `interrupted`, and the message gives its `pathdb resume` command."""
    import search.runner as runner

    finish = runner._finish

    def finish_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        result = finish(*args, **kwargs)
        if result.status == "completed":
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(runner, "_finish", finish_then_ctrl_c)
    db = tmp_path / "c.duckdb"
    f = setup["files"]
    args = ["search", "--each", "-p", str(f["a"]), "-p", str(f["b"]), "-m", MODELS[0], "-t", T]
    got = CliRunner().invoke(app, [*args, "--db", str(db), "-q"])
    assert got.exit_code == 130, got.output
    status = {name: r[0] for name, r in _runs(db).items()}
    assert status == {f"a/{MODELS[0]}": "completed", f"b/{MODELS[0]}": "interrupted"}
    assert "1 of 2 runs completed" in got.stderr
    assert f"`pathdb resume b/{MODELS[0]} --db {db}`" in got.stderr
