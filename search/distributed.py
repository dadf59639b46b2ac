"""Searches sharded over a pool of Ray actors: the prompts of a per-prompt search
(``pathdb search --workers N``), or several runs over prompt sets and models (``pathdb search
--each --workers N -p A -p B -m X -m Y``, :func:`search.runner.run_many`): a batch run is one task, a
per-prompt run one task per prompt, all in one pool.

DuckDB allows one writing process per file, so the driver stays the store's only writer: each
actor loads each model once, on its first task for it (and checks its fingerprint against the
run's), searches one task at a time into an in-memory sink and returns the evaluated paths as
Arrow tables; the
driver writes each finished prompt through the run's :class:`~pathdb.store.writer.RunWriter`
in ONE checkpoint (local path ids shifted into the run's id space, nodes interned in the run's
node dictionary). A prompt is therefore either completely in the store or not at all, so a
driver killed mid-run leaves a store that ``pathdb resume`` (with or without workers) continues
by skipping the prompts already written; a batch run is written whole, so a driver killed
before it arrives leaves a run with no paths, which ``pathdb resume`` searches afresh. Several
runs without workers (:func:`drive_runs` with ``workers=None``) are searched in the driver one
after another, every run created up front, so each is resumable too. An actor that dies is restarted by Ray and its tasks
are retried (``max_restarts`` / ``max_task_retries``). A resumed run whose interrupted prompt
has a stored frontier (a run started without workers) continues that prompt in the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pathdb.graph import Node
from pathdb.store.nodes import row_node
from pathdb.store.writer import RunWriter
from search.progress import SearchProgress
from search.sinks import MemorySink
from search.strategies import SearchRun

if TYPE_CHECKING:
    from pathdb.prompts import PromptSet
    from pathdb.store.db import Store
    from search.runner import RunResult, SearchRequest, _Driver, _GroupState

INSTALL_HINT = (
    "--workers needs Ray, which is not installed: pip install 'pathdb[distributed]' "
    "(or pip install 'ray>=2.40'), or drop --workers"
)
# actors kept between searches of one process on a Ray session it did not start (notebooks,
# tests): (Ray job, device, threads, gpus) -> actors, each keeping the models it has loaded
_POOLS: dict[tuple[Any, ...], list[Any]] = {}
MAX_RETRIES = 3  # restarts of a dead actor and retries of its tasks before the run fails
IN_FLIGHT = 2  # tasks queued per actor, so an actor never waits for the driver's writes
_NODE_FIELDS = ("kind", "layer", "head", "site", "position", "kv_position")


def require_ray() -> ModuleType:
    """The ``ray`` module, or a :class:`~search.runner.SearchError` saying how to install it."""
    from search.runner import SearchError

    try:
        import ray
    except ImportError:
        raise SearchError(INSTALL_HINT) from None
    return ray


def check_workers(req: SearchRequest, workers: int | None, ray_address: str | None) -> None:
    """Refuse a ``--workers`` request that cannot run, before any model is loaded."""
    from search.runner import SearchError

    if workers is None:
        if ray_address is not None:
            raise SearchError("--ray-address needs --workers N (the number of Ray actors to start)")
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SearchError(f"--workers must be an integer >= 1 (got {workers!r})")
    if req.prompt_mode != "per-prompt":
        raise SearchError(
            "--workers shards a per-prompt search (one task per prompt); a batch search is one "
            "task: add --prompt-mode per-prompt, search several prompt sets or models at once "
            "(--each -p A -p B -m X -m Y: each batch run a task), or drop --workers"
        )
    require_ray()


def check_runs(reqs: Sequence[SearchRequest], workers: int | None, ray_address: str | None) -> None:
    """Refuse a :func:`~search.runner.run_many` request with workers that cannot run (a batch
    run is one task and a per-prompt run one task per prompt, so any prompt mode shards)."""
    check_workers(dataclasses.replace(reqs[0], prompt_mode="per-prompt"), workers, ray_address)


# ---- worker side ------------------------------------------------------------------------------
def paths_table(sink: MemorySink) -> tuple[pa.Table, pa.Table]:
    """A finished prompt's paths as Arrow: (nodes, paths); paths reference nodes by row and
    their parent by row (-1 for the root, which is row 0)."""
    nodes: dict[Node, int] = {}
    node_col = np.fromiter(
        (nodes.setdefault(p.path[0], len(nodes)) for p in sink.paths),
        dtype=np.int32,
        count=len(sink.paths),
    )
    ps = sink.paths
    paths = pa.table(
        {
            "parent": pa.array(
                [-1 if p.parent_id is None else p.parent_id for p in ps], pa.int64()
            ),
            "node": pa.array(node_col),
            "depth": pa.array([len(p.path) - 1 for p in ps], pa.int16()),
            "contribution": pa.array(
                [np.nan if p.contribution is None else p.contribution for p in ps], pa.float64()
            ),
            "method": pa.array([p.method for p in ps], pa.string()),
            "complete": pa.array([p.complete for p in ps], pa.bool_()),
            "kept": pa.array([p.kept for p in ps], pa.bool_()),
        }
    )
    order = list(nodes)
    node_tbl = pa.table(
        {
            "kind": pa.array([str(n.kind) for n in order], pa.string()),
            "layer": pa.array([n.layer for n in order], pa.int16()),
            "head": pa.array([n.head for n in order], pa.int16()),
            "site": pa.array([None if n.site is None else str(n.site) for n in order], pa.string()),
            "position": pa.array([n.position for n in order], pa.int16()),
            "kv_position": pa.array([n.kv_position for n in order], pa.int16()),
        }
    )
    return node_tbl, paths


class PromptWorker:
    """A Ray actor (wrapped by :func:`_actors`): loads each model once, on its first task for it,
    then searches one prompt or one batch run per call into a
    :class:`~search.sinks.MemorySink` and returns it as Arrow tables."""

    def __init__(self, device: str | None, threads: int | None) -> None:
        self.device, self.threads = device, threads
        self._models: dict[tuple[str, str | None, str], Any] = {}
        self._prompts: dict[str, PromptSet] = {}  # parsed prompts per run (runs interleave)

    def _model(self, req: SearchRequest, fingerprint: str) -> Any:
        """The run's model, loaded on first use; refused when its weights are not the driver's."""
        from pathdb.models import ensure_supported, load
        from pathdb.models import fingerprint as model_fingerprint
        from search.runner import SearchError

        key = (req.model, req.dtype, fingerprint)
        if key not in self._models:
            model = load(req.model, device=self.device, dtype=req.dtype)
            ensure_supported(model)
            if model_fingerprint(model) != fingerprint:
                raise SearchError(
                    f"model {req.model!r} on worker (host {os.uname().nodename}) has other weights "
                    "than the driver's (fingerprint mismatch); install the same weights on every node"
                )
            self._models[key] = model
        return self._models[key]

    def pid(self) -> int:
        """This actor's process id (tests kill it to simulate a crash)."""
        return os.getpid()

    def search(
        self,
        req: SearchRequest,
        fingerprint: str,
        key: str,
        rows: list[dict[str, Any]],
        prompt_idx: int | None,
    ) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
        """Search prompt ``prompt_idx`` of a run's stored prompt ``rows`` (parsed once per
        ``key``), or all of them as one batch search when None; returns (nodes, paths, stats:
        stop_reason, eval_s, n_paths)."""
        from search.runner import _scorer, _stored_prompts
        from search.threads import torch_threads

        t0 = time.perf_counter()
        with torch_threads(self.threads):
            model = self._model(req, fingerprint)
            # cached by content too: a kept pool may see a later run of the same name and store
            cache = f"{key} {req.model} {hashlib.sha1(repr(rows).encode()).hexdigest()}"
            if cache not in self._prompts:
                self._prompts[cache] = _stored_prompts(model, rows, req, key)
            prompts = self._prompts[cache]
            group = prompts if prompt_idx is None else prompts.subset(prompt_idx)
            scorer = _scorer(req, model, group)
            sink = MemorySink(prompt_idx=prompt_idx)
            stats = SearchRun(scorer, sink, req.params).run([sink.root(scorer.root)])
        nodes, paths = paths_table(sink)
        info = {
            "stop_reason": stats.stop_reason,
            "eval_s": time.perf_counter() - t0,
            "n_paths": paths.num_rows,
        }
        return nodes, paths, info


def _actors(
    ray: ModuleType, req: SearchRequest, threads: int | None, n: int, *, keep: bool
) -> list[Any]:
    """``n`` actors on ``req``'s device: from this process's pool (``keep``: grown and kept for
    the next search), else new ones for this search only."""
    gpu = _gpus_per_actor(ray, req, n)
    device = "cuda" if gpu else req.device
    cls = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)(PromptWorker)
    key = (ray.get_runtime_context().get_job_id(), device, threads, gpu)
    pool = _POOLS.setdefault(key, []) if keep else []
    while len(pool) < n:
        pool.append(cls.options(num_cpus=1, num_gpus=gpu).remote(device, threads))
    return pool[:n]


def release_workers() -> None:
    """Kill the actors this process keeps between searches (they hold their CPUs / GPUs)."""
    import ray

    for pool in _POOLS.values():
        for actor in pool:
            ray.kill(actor)
    _POOLS.clear()


# ---- driver side ------------------------------------------------------------------------------
def write_prompts(
    writer: RunWriter, results: Sequence[tuple[int | None, pa.Table, pa.Table]]
) -> None:
    """Write finished prompts ``(prompt_idx, nodes, paths)`` (None: a whole batch run) in one
    checkpoint: each prompt whole, so the store never holds part of a prompt."""
    for prompt_idx, nodes, paths in results:
        _add_prompt(writer, prompt_idx, nodes, paths)
    writer.flush()


def _add_prompt(
    writer: RunWriter, prompt_idx: int | None, nodes: pa.Table, paths: pa.Table
) -> None:
    """Buffer one prompt's paths: ids shifted into the run's, nodes interned in its dictionary."""
    node_map = np.array(
        [writer.node_id(row_node(*(r[f] for f in _NODE_FIELDS))) for r in nodes.to_pylist()],
        dtype=np.int32,
    )
    base = writer.next_path_id
    parent = paths["parent"].to_numpy()
    writer.add_paths(
        parent_ids=np.where(parent < 0, -1, parent + base),
        node_ids=node_map[paths["node"].to_numpy()],
        depths=paths["depth"].to_numpy(),
        prompt_idx=prompt_idx,
        contributions=paths["contribution"].to_numpy(zero_copy_only=False),
        methods=paths["method"].to_pylist(),
        complete=paths["complete"].to_numpy(zero_copy_only=False),
        kept=paths["kept"].to_numpy(zero_copy_only=False),
    )


class ShardProgress(SearchProgress):
    """One live line for the whole sharded run: prompts (or runs) done, paths written, paths/s."""

    def __init__(
        self, label: str, total: int, workers: int, *, quiet: bool = False, unit: str = "prompts"
    ) -> None:
        super().__init__(label, quiet=quiet)
        self.total, self.workers, self.done, self.paths = total, workers, 0, 0
        self.unit = unit
        self.t0 = time.perf_counter()

    def task_done(self, n_paths: int) -> None:
        """Count a written prompt and refresh the line."""
        self.done += 1
        self.paths += n_paths
        rate = self.paths / max(time.perf_counter() - self.t0, 1e-9)
        text = (
            f"{self.label}  {self.workers} workers  {self.unit} {self.done}/{self.total}  "
            f"paths {self.paths:,} ({rate:,.0f}/s)"
        )
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(text, style="cyan"))


def _init_ray(ray: ModuleType, address: str | None, workers: int) -> bool:
    """Connect to the cluster at ``address``, reuse this process's, or start a local one;
    True when this call started it (then the caller shuts it down)."""
    from search.runner import SearchError

    if ray.is_initialized():
        return False
    try:
        if address is not None:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(
                num_cpus=max(workers, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,  # no start-up banner on the search's stderr
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise SearchError(f"cannot start or join {where}: {e}; check `ray status`") from None
    return address is None


def _gpus_per_actor(ray: ModuleType, req: SearchRequest, workers: int) -> float:
    """One GPU per actor when the run may use a GPU and the cluster has them, else none."""
    from search.runner import SearchError

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus == 0 or (req.device or "auto") == "cpu":
        return 0.0
    if workers > gpus:
        raise SearchError(
            f"--workers {workers} but the Ray cluster has {gpus} GPU(s); one actor runs per GPU: "
            f"use --workers {gpus}, add GPU nodes, or --device cpu"
        )
    return 1.0


def drive(
    store: Store,
    writer: RunWriter,
    driver: _Driver,
    model: Any,
    work: Sequence[tuple[int | None, PromptSet, _GroupState | None]],
    label: str,
    start_message: str,
    t_start: float,
    *,
    quiet: bool,
    workers: int,
    ray_address: str | None,
    threads: int | None,
) -> RunResult:
    """:func:`search.runner._drive` for a sharded run: prompts go to Ray actors, the driver
    writes each finished prompt; the run is closed the same way (completed, or interrupted /
    failed at the last written prompt, the exception propagating)."""
    from search.runner import _finish, closed_on_error

    ray = require_ray()
    remote = [pidx for pidx, _, st in work if st is None and pidx is not None]
    started = False
    actors: list[Any] = []
    try:
        with closed_on_error(store, writer, driver, t_start):
            progress = ShardProgress(label, len(work), workers, quiet=quiet)
            with progress:
                progress.message(start_message)
                for prompt_idx, group, st in work:  # prompts interrupted mid-search continue here
                    if st is not None:
                        driver.run_group(
                            prompt_idx, group, progress, frontier=st.frontier, n_done=st.n_done
                        )
                        progress.task_done(0)
                driver.sink.commit()  # their deferred last checkpoint, before prompts are written directly
                if remote:
                    started = _init_ray(ray, ray_address, workers)
                    actors = _actors(
                        ray, driver.req, threads, min(workers, len(remote)), keep=not started
                    )
                    _run_prompts(ray, actors, remote, model, writer, driver, progress)
            return _finish(store, writer, driver, "completed", t_start)
    except Exception:
        if actors and not started:
            release_workers()  # an actor may be dead for good: the next search starts afresh
        raise
    finally:
        if started:
            ray.shutdown()  # the local cluster this search started, with its actors


Result = tuple[pa.Table, pa.Table, dict[str, Any]]  # a task's (nodes, paths, stats)


def _pump(
    ray: ModuleType,
    actors: list[Any],
    items: Sequence[Any],
    call: Any,
    write: Any,
    what: Any,
) -> None:
    """Keep every actor :data:`IN_FLIGHT` tasks busy (``call(actor, item)`` submits one) and
    hand the results to ``write([(item, result), ...])`` as they arrive, all those ready at once
    (a checkpoint costs tens of milliseconds); ``what(item)`` names an item in errors."""
    queue = deque(items)
    in_flight: dict[Any, tuple[Any, Any]] = {}

    def submit(actor: Any) -> None:
        item = queue.popleft()
        in_flight[call(actor, item)] = (actor, item)

    for _ in range(IN_FLIGHT):
        for actor in actors:
            if queue:
                submit(actor)
    while in_flight:
        ray.wait(list(in_flight), num_returns=1)
        ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
        done = []
        for ref in ready:
            actor, item = in_flight.pop(ref)
            done.append((item, _result(ray, ref, what(item))))
            if queue:
                submit(actor)
        write(done)


def _run_prompts(
    ray: ModuleType,
    actors: list[Any],
    prompts: Sequence[int],
    model: Any,
    writer: RunWriter,
    driver: _Driver,
    progress: ShardProgress,
) -> None:
    """Search a per-prompt run's ``prompts`` on the actors; write each batch of finished
    prompts in one checkpoint."""
    from pathdb.models import fingerprint
    from search.runner import _prompt_rows

    rows_ref = ray.put(_prompt_rows(driver.prompts))
    key = f"prompts of run {writer.name!r} ({writer.store.path})"
    fp = fingerprint(model)

    def write(done: list[tuple[int, Result]]) -> None:
        t0 = time.perf_counter()
        write_prompts(writer, [(pidx, nodes, paths) for pidx, (nodes, paths, _) in done])
        driver.sink.write_seconds += time.perf_counter() - t0
        for _, (_, _, info) in done:
            driver.stop_reasons.append(str(info["stop_reason"]))
            driver.eval_s += float(info["eval_s"])
            progress.task_done(int(info["n_paths"]))

    _pump(
        ray,
        actors,
        prompts,
        lambda actor, pidx: actor.search.remote(driver.req, fp, key, rows_ref, pidx),
        write,
        lambda pidx: f"prompt {pidx}",
    )


def drive_runs(
    store: Store,
    runs: Sequence[tuple[RunWriter, _Driver, str]],
    t_start: float,
    *,
    quiet: bool,
    workers: int | None,
    ray_address: str | None,
    threads: int | None,
) -> list[RunResult]:
    """Search runs ``(writer, driver, model fingerprint)``, all created beforehand, and complete
    each as its last result is written: with ``workers`` in one pool of Ray actors (a batch run
    one task, a per-prompt run one task per prompt), without them here, one run after another.
    On Ctrl-C or an error every run not yet completed is closed ``interrupted`` / ``failed`` at
    its last checkpoint (resume continues it) and the exception propagates."""
    from pathdb.store.writer import DiskFullError
    from search.runner import RunInterrupted, _abandon

    results: dict[int, RunResult] = {}

    def close_rest(status: str, error: str) -> None:
        for i, (writer, driver, _) in enumerate(runs):
            if i not in results and not writer.closed:
                _abandon(store, writer, driver, status, t_start, error)

    try:
        if workers is None:
            _local_runs(store, runs, results, quiet=quiet)
        else:
            _remote_runs(
                store, runs, results, t_start,
                quiet=quiet, workers=workers, ray_address=ray_address, threads=threads,
            )  # fmt: skip
        return [results[i] for i in range(len(runs))]
    except KeyboardInterrupt:
        close_rest("interrupted", "interrupted by the user (SIGINT)")
        rest = [w for i, (w, _, _) in enumerate(runs) if i not in results]
        if not rest:
            raise
        raise RunInterrupted(rest[0].name, store.path) from None
    except DiskFullError as e:
        close_rest("interrupted", str(e))
        raise
    except Exception as e:
        close_rest("failed", f"{type(e).__name__}: {e}")
        raise


def _local_runs(
    store: Store,
    runs: Sequence[tuple[RunWriter, _Driver, str]],
    results: dict[int, RunResult],
    *,
    quiet: bool,
) -> None:
    """Search the runs in this process one after another, each as ``pathdb search`` would."""
    from search.runner import _drive, _prompt_groups

    for i, (writer, driver, _) in enumerate(runs):
        req = driver.req
        label = f"run {i + 1}/{len(runs)} {writer.name}: {req.params.strategy}/{req.params.method}"
        start = f"run {writer.name!r} (id {writer.run_id}) started: {req.model}, {req.prompts}"
        work = [(pidx, group, None) for pidx, group in _prompt_groups(req, driver.prompts)]
        t0 = time.perf_counter()
        results[i] = _drive(store, writer, driver, work, label, start, t0, quiet=quiet)


def _remote_runs(
    store: Store,
    runs: Sequence[tuple[RunWriter, _Driver, str]],
    results: dict[int, RunResult],
    t_start: float,
    *,
    quiet: bool,
    workers: int,
    ray_address: str | None,
    threads: int | None,
) -> None:
    """Search the runs' tasks on one pool of actors; write each run's finished prompts (or the
    whole batch run) in one checkpoint and complete the run when its last task is written."""
    from search.runner import _finish, _prompt_groups, _prompt_rows

    ray = require_ray()
    items = [
        (i, pidx)
        for i, (_, d, _) in enumerate(runs)
        for pidx, _ in _prompt_groups(d.req, d.prompts)
    ]
    left = {i: sum(1 for j, _ in items if j == i) for i in range(len(runs))}
    started = False
    actors: list[Any] = []
    progress = ShardProgress(f"{len(runs)} runs", len(items), workers, quiet=quiet, unit="tasks")
    try:
        with progress:
            progress.message(
                f"{len(runs)} runs started in {store.path} ({len(items)} tasks): "
                + ", ".join(w.name for w, _, _ in runs)
            )
            started = _init_ray(ray, ray_address, workers)
            actors = _actors(
                ray, runs[0][1].req, threads, min(workers, len(items)), keep=not started
            )
            rows = [ray.put(_prompt_rows(d.prompts)) for _, d, _ in runs]

            def call(actor: Any, item: tuple[int, int | None]) -> Any:
                i, pidx = item
                writer, driver, fp = runs[i]
                key = f"prompts of run {writer.name!r} ({store.path})"
                return actor.search.remote(driver.req, fp, key, rows[i], pidx)

            def write(done: list[tuple[tuple[int, int | None], Result]]) -> None:
                by_run: dict[int, list[tuple[int | None, Result]]] = {}
                for (i, pidx), result in done:
                    by_run.setdefault(i, []).append((pidx, result))
                for i, got in by_run.items():
                    writer, driver, _ = runs[i]
                    t0 = time.perf_counter()
                    write_prompts(writer, [(pidx, nodes, paths) for pidx, (nodes, paths, _) in got])
                    driver.sink.write_seconds += time.perf_counter() - t0
                    for _, (_, _, info) in got:
                        driver.stop_reasons.append(str(info["stop_reason"]))
                        driver.eval_s += float(info["eval_s"])
                        progress.task_done(int(info["n_paths"]))
                    left[i] -= len(got)
                    if not left[i]:
                        results[i] = _finish(store, writer, driver, "completed", t_start)

            def what(item: tuple[int, int | None]) -> str:
                i, pidx = item
                run = f"run {runs[i][0].name!r}"
                return run if pidx is None else f"prompt {pidx} of {run}"

            _pump(ray, actors, items, call, write, what)
    except Exception:
        if actors and not started:
            release_workers()  # an actor may be dead for good: the next search starts afresh
        raise
    finally:
        if started:
            ray.shutdown()


def _result(ray: ModuleType, ref: Any, what: str) -> Result:
    """A finished task's result; a failed search or a worker dead for good as a SearchError."""
    from search.runner import SearchError

    try:
        result: Result = ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the search itself failed: its cause, in one line
        cause = e.cause if e.cause is not None else e
        raise SearchError(f"{what} failed on a worker: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayActorError as e:
        raise SearchError(
            f"the worker searching {what} died {MAX_RETRIES + 1} times "
            f"({str(e).splitlines()[0]}); what was already written is kept: continue with "
            "`pathdb resume`"
        ) from None
    return result
