"""Run a search end to end: model + prompts -> engine -> strategy -> DuckDB store; and resume one.

This is what ``pathdb search`` and ``pathdb resume`` call, and the Python API behind them.
Everything that can be checked before touching the store (parameters, model, prompts) is checked
first, so bad input writes nothing. The store gets a checkpoint (rows + frontier, atomically)
every few seconds; SIGINT marks the run ``interrupted`` after its last checkpoint and SIGKILL
leaves it ``running``, which the next writable open turns into ``interrupted``. ``resume``
continues from the stored frontier and ends with the same paths as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import pathdb
from pathdb.graph import Node
from pathdb.positions import ROLE_NAME
from pathdb.prompts import PromptSet
from pathdb.store.db import Store, open_store, search_lock
from pathdb.store.errors import StoreError
from pathdb.store.names import check_run_name
from pathdb.store.reader import get_run
from pathdb.store.writer import REPLACING_SUFFIX, DiskFullError, RunWriter
from search.progress import SearchProgress
from search.scorer import AnyScorer, build_scorer, metric_name, position_names
from search.sinks import StoreSink
from search.strategies import FrontierEntry, SearchParams, SearchRun, check_size
from search.threads import DEFAULT_THREADS, torch_threads

PROMPT_MODES = ("batch", "per-prompt")


class SearchError(ValueError):
    """Invalid search request (names the option and how to fix it)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stored search: the run was saved at its last checkpoint as ``interrupted``."""

    def __init__(self, run_name: str, db: str | FsPath) -> None:
        super().__init__(run_name)
        self.run_name = run_name
        self.db = str(db)


class CompletedInterrupted(RunInterrupted):
    """Ctrl-C after the run was committed as ``completed`` (while its refined edge scores were
    measured, :func:`_refine`): the run is stored whole; its default edge rule is ``group``."""


@dataclass
class SearchRequest:
    """Everything ``pathdb search`` needs; stored with the run so it can be resumed or repeated."""

    model: str = "toy-ioi"
    prompts: str | None = "toy-ioi-small"  # bundled prompt set name or JSONL path
    clean: str | None = None  # single-prompt mode (instead of ``prompts``)
    target: str | None = None
    counterfactual: str | None = None
    cf_target: str | None = None
    metric: str = "logit-diff"
    patch_type: str = "counterfactual"
    positional: bool = True
    root_position: int | str | None = None  # default: last position; a role name on role positions
    prompt_mode: str = "batch"
    store_level: str = "all"
    params: SearchParams = field(default_factory=SearchParams)
    device: str | None = None  # cpu, cuda, cuda:N, auto (None: auto)
    dtype: str | None = None  # float32 (None), bfloat16, float16, float64
    # measure and store the receivers' group effects when the run completes (the group edge rule)
    group_effects: bool = True

    def validate(self) -> None:
        """Check option combinations before any work is done."""
        if self.prompt_mode not in PROMPT_MODES:
            raise SearchError(
                f"--prompt-mode must be one of {', '.join(PROMPT_MODES)} (got {self.prompt_mode!r})"
            )
        if self.store_level not in ("all", "kept"):
            raise SearchError(f"--store must be 'all' or 'kept' (got {self.store_level!r})")
        if self.params.recall and self.store_level == "kept":
            raise SearchError(
                "--recall stores the complete extensions of pruned partial paths under them, so it "
                "needs --store all"
            )
        if self.patch_type not in ("zero", "counterfactual", "mean"):
            raise SearchError(
                f"--patch must be zero, counterfactual or mean (got {self.patch_type!r})"
            )
        if self.clean is None:
            given = [
                o
                for o, v in (
                    ("--target", self.target),
                    ("--counterfactual", self.counterfactual),
                    ("--cf-target", self.cf_target),
                )
                if v is not None
            ]
            if given:
                raise SearchError(
                    f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for a single --prompt; "
                    "a prompt set takes targets and counterfactuals from its file (drop the option, or give --prompt)"
                )
        if self.clean is not None and self.target is None:
            raise SearchError(
                "a single --prompt needs --target (the token whose logit the metric reads)"
            )
        if self.clean is None and self.prompts is None:
            raise SearchError(
                "give a prompt set (--prompts NAME_OR_FILE) or a single --prompt with --target"
            )
        if self.patch_type == "mean" and self.prompt_mode == "per-prompt":
            raise SearchError(
                "mean patching averages over the prompt set, which a per-prompt search does not "
                "have; use --prompt-mode batch with --patch mean, or --patch zero/counterfactual"
            )
        if (
            self.patch_type == "counterfactual"
            and self.clean is not None
            and self.counterfactual is None
        ):
            raise SearchError(
                "counterfactual patching needs --counterfactual (a prompt of the same token length); "
                "or use --patch zero"
            )
        if not self.positional and self.root_position is not None:
            raise SearchError(
                "--root-position only applies to positional searches (drop --no-positional)"
            )
        if isinstance(self.root_position, str) and self.root_position.strip().isdigit():
            self.root_position = int(self.root_position)
        if isinstance(self.root_position, int) and self.root_position < 0:
            raise SearchError(f"--root-position must be >= 0 (got {self.root_position})")
        if isinstance(self.root_position, str) and not ROLE_NAME.match(
            self.root_position.split("+")[0].split("-")[0]
        ):
            raise SearchError(
                f"--root-position {self.root_position!r}: give a token index (e.g. 14) or a role "
                "name of the prompts (e.g. END)"
            )
        try:
            self.params.validate(positional=self.positional)
            self.metric = metric_name(self.metric)
        except ValueError as e:
            raise SearchError(str(e)) from e
        from pathdb.models import DeviceError, resolve_device, resolve_dtype

        try:
            resolve_device(self.device)
            resolve_dtype(self.dtype)
        except DeviceError as e:
            raise SearchError(str(e)) from e

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the run's ``params`` column."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> SearchRequest:
        """Inverse of :meth:`to_json`."""
        d = dict(d)
        params = SearchParams(**d.pop("params"))
        return SearchRequest(params=params, **d)


@dataclass
class RunResult:
    """What a finished (or interrupted) search reports."""

    run_id: int
    name: str
    status: str
    n_evaluated: int
    n_complete: int
    n_kept_complete: int
    wall_s: float
    eval_s: float
    write_s: float
    db: str
    stop_reason: str = "completed"  # completed | max_time | top_n | interrupted | error


def _load_inputs(req: SearchRequest) -> tuple[Any, PromptSet]:
    from pathdb.models import ensure_supported, load

    model = load(req.model, device=req.device, dtype=req.dtype)
    ensure_supported(model)
    return model, _request_prompts(req, model)


def _request_prompts(req: SearchRequest, model: Any) -> PromptSet:
    """The prompt set (or single prompt) ``req`` names, tokenized for ``model``."""
    from pathdb.prompts import load_prompts, single_prompt

    if req.clean is not None:
        return single_prompt(
            model,
            req.clean,
            req.target or "",
            counterfactual=req.counterfactual,
            cf_target=req.cf_target,
        )
    return load_prompts(req.prompts or "", model, require_equal_length=False)


def _stored_prompts(
    model: Any, rows: list[dict[str, Any]], req: SearchRequest, name: str
) -> PromptSet:
    """Rebuild a run's PromptSet from its stored prompt rows (resume needs no prompt file)."""
    import json

    from pathdb.prompts import parse_prompts

    keys = ("clean", "counterfactual", "target", "cf_target", "roles")
    text = "\n".join(json.dumps({k: r[k] for k in keys if r.get(k) is not None}) for r in rows)
    return parse_prompts(text, model, f"prompts of run {name!r}", require_equal_length=False)


def _check_name_free(store: Store, name: str) -> None:
    row = store.con.execute("SELECT status FROM runs WHERE name = ?", [name]).fetchall()
    if row:
        raise SearchError(
            f"a run named {name!r} already exists in {store.path} (status {row[0][0]}); choose "
            f"another --run-name, pass --replace to overwrite it, or `pathdb resume {name} --db {store.path}`"
        )


def _scorer(req: SearchRequest, model: Any, prompts: PromptSet) -> AnyScorer:
    return build_scorer(
        model,
        prompts,
        metric=req.metric,
        patch_type=req.patch_type,
        positional=req.positional,
        root_position=req.root_position,
    )


def _checked_prompts(req: SearchRequest, prompts: PromptSet) -> PromptSet:
    """The prompts whose scorer sizes the search and gives the run's baseline and root: the whole
    set, or for a per-prompt search over several lengths its longest prompt (the largest graph)."""
    if req.prompt_mode == "batch" or prompts.equal_length:
        return prompts
    return prompts.subset(int(prompts.lengths.argmax()))


def _prompt_groups(req: SearchRequest, prompts: PromptSet) -> list[tuple[int | None, PromptSet]]:
    if req.prompt_mode == "batch":
        return [(None, prompts)]
    return [(i, prompts.subset(i)) for i in range(len(prompts.records))]


def _run_meta(
    req: SearchRequest, model: Any, fingerprint: str, baseline: float, root: Node
) -> dict[str, Any]:
    return {
        "model_name": req.model,
        "model_fingerprint": fingerprint,
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
        "d_model": model.cfg.d_model,
        "method": req.params.method,
        "strategy": req.params.strategy,
        "metric": req.metric,
        "patch_type": req.patch_type,
        "prompt_mode": req.prompt_mode,
        "positional": req.positional,
        "root_position": root.position,
        "params": req.to_json(),
        "baseline": baseline,
        "package_version": pathdb.__version__,
    }


def _prompt_rows(prompts: PromptSet) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(prompts.records):
        rows.append(
            {
                "prompt_idx": i,
                "clean": r.clean,
                "counterfactual": r.counterfactual,
                "target": r.target,
                "cf_target": r.cf_target,
                "target_id": int(r.target_id),
                "cf_target_id": None if r.cf_target_id is None else int(r.cf_target_id),
                "tokens": [int(t) for t in r.tokens],
                "token_strs": list(r.token_strs),
                "cf_tokens": None if r.cf_tokens is None else [int(t) for t in r.cf_tokens],
                "roles": None if r.roles is None else list(r.roles),
            }
        )
    return rows


class _Driver:
    """Runs the prompt groups of one run against one writer, with progress and timings."""

    def __init__(
        self,
        req: SearchRequest,
        model: Any,
        prompts: PromptSet,
        writer: RunWriter,
        *,
        scorer_factory: Callable[[PromptSet], AnyScorer] | None = None,
    ) -> None:
        self.req = req
        self.model = model
        self.prompts = prompts
        self.scorer_factory = scorer_factory or (lambda ps: _scorer(req, model, ps))
        self.eval_s = 0.0
        self.stop_reasons: list[str] = []  # why each prompt group's search stopped
        # one sink per run: its view of the committed frontier spans prompt groups and resumes
        self.sink = StoreSink(
            writer,
            prompt_idx=None,
            store_level=req.store_level if req.params.strategy == "threshold" else "all",
            min_interval=req.params.checkpoint_every,
        )

    @property
    def write_s(self) -> float:
        """Seconds spent writing the store (buffering, conversion, inserts, commits)."""
        return self.sink.write_seconds

    def run_group(
        self,
        prompt_idx: int | None,
        group: PromptSet,
        progress: SearchProgress,
        *,
        frontier: list[FrontierEntry] | None = None,
        n_done: int = 0,
    ) -> None:
        scorer = self.scorer_factory(group)
        sink = self.sink
        sink.prompt_idx = prompt_idx
        if frontier is None:
            frontier = [sink.root(scorer.root)]
        progress.prefix = (
            "" if prompt_idx is None else f"  prompt {prompt_idx + 1}/{len(self.prompts.records)}"
        )
        run = SearchRun(scorer, sink, self.req.params, progress=progress)
        t0, w0 = time.perf_counter(), sink.write_seconds
        self.stop_reasons.append(run.run(frontier, n_done=n_done).stop_reason)
        self.eval_s += time.perf_counter() - t0 - (sink.write_seconds - w0)

    def stop_reason(self) -> str:
        """Why a finished run stopped: max_time or top_n when any prompt group stopped so."""
        return next((r for r in ("max_time", "top_n") if r in self.stop_reasons), "completed")


def _group_effects(driver: _Driver) -> tuple[dict[str, float], Any] | None:
    """The receivers' group effects on the run's search prompts, stored with the completed run,
    and the edge-masked evaluator that measured them (for :func:`_refine`)."""
    from pathdb.evaluate.groups import search_group_effects

    req = driver.req
    return search_group_effects(driver.model, driver.prompts, req.metric, req.patch_type)


def _refine(store: Store, run_id: int, measured: tuple[dict[str, float], Any]) -> None:
    """Store the completed run's refined top-edge scores (the default ``refined`` edge rule,
    :mod:`pathdb.evaluate.refine`): they need the run's stored edges, so they follow the
    transaction that completed it; where the edge-masked forward cannot run them the run keeps
    the ``group`` rule."""
    from pathdb.evaluate.groups import NOT_MEASURED
    from pathdb.evaluate.refine import refined_scores
    from pathdb.store.effects import write_refined

    t0 = time.perf_counter()
    effects, evaluator = measured
    try:
        refined = refined_scores(store.con, run_id, evaluator, effects)
    except NOT_MEASURED:
        return
    if refined:
        write_refined(store.con, run_id, refined, time.perf_counter() - t0)


def _finish(
    store: Store,
    writer: RunWriter,
    driver: _Driver,
    status: str,
    t_start: float,
    error: str | None = None,
) -> RunResult:
    # the group edge rule's input (pathdb.evaluate.groups), measured before wall_s is taken
    measured = (
        _group_effects(driver) if status == "completed" and driver.req.group_effects else None
    )
    wall = time.perf_counter() - t_start
    with store.attached():  # one connection for the run's end and the reads after it
        if status == "completed":
            # one transaction: a deferred final checkpoint of the last prompt group and the end
            reason = driver.stop_reason()
            driver.sink.finish(
                status, error=error, stop_reason=reason, wall_s=wall, eval_s=driver.eval_s,
                group_effects=measured[0] if measured else None,
                prune_unkept=driver.req.store_level == "kept",
            )  # fmt: skip
            if measured:
                _refine(store, writer.run_id, measured)
        else:
            # keep exactly the last checkpoint (rows + frontier): what resume continues from
            writer.abandon(status, error=error)
            reason = "interrupted" if status == "interrupted" else "error"
        info = get_run(store, writer.run_id)
        n_kept_complete = _kept_complete(store, writer.run_id)
    return RunResult(
        run_id=writer.run_id,
        name=str(info["name"]),
        status=status,
        n_evaluated=int(info["n_evaluated"]),
        n_complete=int(info["n_complete"]),
        n_kept_complete=n_kept_complete,
        wall_s=float(info["wall_s"] or wall),
        eval_s=driver.eval_s,
        write_s=driver.write_s,
        db=str(store.path),
        stop_reason=reason,
    )


def _abandon(
    store: Store, writer: RunWriter, driver: _Driver, status: str, t_start: float, error: str
) -> None:
    """Close an interrupted / failed run at its last checkpoint without masking the cause: when
    even that write fails (a full disk), the run stays ``running`` and the next open of the
    store marks it ``interrupted``."""
    try:
        _finish(store, writer, driver, status, t_start, error=error)
    except StoreError:
        writer.close()


def _drive(
    store: Store,
    writer: RunWriter,
    driver: _Driver,
    work: Sequence[tuple[int | None, PromptSet, _GroupState | None]],
    label: str,
    start_message: str,
    t_start: float,
    *,
    quiet: bool,
) -> RunResult:
    """Run the prompt groups (fresh, or from a resumed frontier) and close the run: completed,
    or interrupted / failed at the last checkpoint (the exception propagates)."""
    with closed_on_error(store, writer, driver, t_start):
        with SearchProgress(label, quiet=quiet) as progress:
            progress.message(start_message)
            for prompt_idx, group, st in work:
                if st is None:
                    driver.run_group(prompt_idx, group, progress)
                else:
                    driver.run_group(
                        prompt_idx, group, progress, frontier=st.frontier, n_done=st.n_done
                    )
            if driver.req.group_effects:  # the last steps take seconds: say what they are
                progress.message(
                    "measuring group effects and refining the top edges' order on the search prompts"
                )
        return _finish(store, writer, driver, "completed", t_start)


@contextmanager
def closed_on_error(
    store: Store, writer: RunWriter, driver: _Driver, t_start: float
) -> Iterator[None]:
    """Close the run at its last checkpoint when the body raises: ``interrupted`` on Ctrl-C (as
    :class:`RunInterrupted`) or a full disk (both resumable), ``failed`` otherwise; the exception
    propagates. Shared by the local and the sharded (:mod:`search.distributed`) drivers."""
    try:
        yield
    except KeyboardInterrupt:
        if writer.closed:  # Ctrl-C right after the run was committed as completed
            raise CompletedInterrupted(writer.name, store.path) from None
        _abandon(store, writer, driver, "interrupted", t_start, "interrupted by the user (SIGINT)")
        raise RunInterrupted(writer.name, store.path) from None
    except DiskFullError as e:  # resumable: the run keeps its last checkpoint
        if not writer.closed:
            _abandon(store, writer, driver, "interrupted", t_start, str(e))
        raise
    except Exception as e:
        if not writer.closed:
            _abandon(store, writer, driver, "failed", t_start, f"{type(e).__name__}: {e}")
        raise


def _kept_complete(store: Store, run_id: int) -> int:
    row = store.con.execute(
        "SELECT count(*) FROM paths WHERE run_id = ? AND complete AND kept", [run_id]
    ).fetchall()
    return int(row[0][0])


@dataclass
class _GroupState:
    done: bool
    frontier: list[FrontierEntry]
    n_done: int


def _resume_state(
    store: Store, writer: RunWriter, req: SearchRequest
) -> dict[int | None, _GroupState]:
    """Per prompt group: finished, or the stored frontier to continue from (absent: not started)."""
    con = store.con
    roots = con.execute(
        "SELECT DISTINCT prompt_idx FROM paths WHERE run_id = ? AND depth = 0", [writer.run_id]
    ).fetchall()
    rows = con.execute(
        "SELECT f.path_id, p.prompt_idx, p.parent_id, p.contribution FROM frontier f "
        "JOIN paths p ON p.run_id = f.run_id AND p.path_id = f.path_id WHERE f.run_id = ?",
        [writer.run_id],
    ).fetchall()
    seqs = writer.path_nodes([r[0] for r in rows]) if rows else {}
    by_group: dict[int | None, list[FrontierEntry]] = {}
    neg = req.params.include_negative
    # the order a level-width level was selected in (priority, then creation order), so that
    # tie-breaking after resume is the same as in an uninterrupted run
    for pid, pidx, parent, contribution in sorted(
        rows, key=lambda r: (-(abs(r[3] or 0.0) if neg else (r[3] or 0.0)), r[0])
    ):
        score = 0.0 if contribution is None else float(contribution)
        by_group.setdefault(pidx, []).append(FrontierEntry(int(pid), seqs[int(pid)], score, parent))
    positive = "" if req.params.include_negative else " AND contribution > 0"
    state: dict[int | None, _GroupState] = {}
    for (pidx,) in roots:
        n_done = con.execute(
            "SELECT count(*) FROM paths WHERE run_id = ? AND complete AND kept AND "
            "prompt_idx IS NOT DISTINCT FROM ?" + positive,
            [writer.run_id, pidx],
        ).fetchall()[0][0]
        frontier = by_group.get(pidx, [])
        state[pidx] = _GroupState(done=not frontier, frontier=frontier, n_done=int(n_done))
    return state


_Shard = tuple[int | None, str | None, int | None]  # (workers, ray_address, threads)


def _check_workers(req: SearchRequest, workers: int | None, ray_address: str | None) -> None:
    if workers is None and ray_address is None:
        return
    from search.distributed import check_workers

    check_workers(req, workers, ray_address)


def _sharded(
    store: Store, writer: RunWriter, driver: _Driver, model: Any,
    work: Sequence[tuple[int | None, PromptSet, _GroupState | None]],
    label: str, start: str, t_start: float, *, quiet: bool, shard: _Shard,
) -> RunResult:  # fmt: skip
    """:func:`_drive` with the prompts searched by Ray actors (``search.distributed``)."""
    from search.distributed import drive

    workers, address, threads = shard
    assert workers is not None
    return drive(
        store, writer, driver, model, work, label, start, t_start,
        quiet=quiet, workers=workers, ray_address=address, threads=threads,
    )  # fmt: skip


def run_search(
    req: SearchRequest,
    db: str | FsPath = "pathdb.duckdb",
    *,
    run_name: str | None = None,
    replace: bool = False,
    quiet: bool = False,
    threads: int | None = DEFAULT_THREADS,
    workers: int | None = None,
    ray_address: str | None = None,
) -> RunResult:
    """Validate, load the model and prompts named in ``req``, search and store one run.

    On KeyboardInterrupt the run is marked ``interrupted`` at its last checkpoint and the
    exception propagates (the CLI turns it into a message with the resume command).
    ``workers`` shards a per-prompt search over that many Ray actors (``search.distributed``),
    on a local Ray cluster or the one at ``ray_address``.
    """
    req.validate()
    _check_workers(req, workers, ray_address)
    if run_name is not None:
        check_run_name(run_name)
    with search_lock(db):  # a second search into the same store is refused before loading
        model, prompts = _load_inputs(req)
        return run_loaded(
            req, model, prompts, db, run_name=run_name, replace=replace, quiet=quiet, threads=threads,
            workers=workers, ray_address=ray_address,
        )  # fmt: skip


def run_loaded(
    req: SearchRequest,
    model: Any,
    prompts: PromptSet,
    db: str | FsPath = "pathdb.duckdb",
    *,
    run_name: str | None = None,
    replace: bool = False,
    quiet: bool = False,
    threads: int | None = DEFAULT_THREADS,
    workers: int | None = None,
    ray_address: str | None = None,
) -> RunResult:
    """Search with an already loaded model and prompt set and store the run (``req.model`` and
    ``req.prompts`` are only recorded). This is the Python API entry point for notebooks.

    ``threads`` sets torch's CPU threads during the search (default 1, as the CLI; None keeps torch's).
    ``workers`` / ``ray_address`` as in :func:`run_search` (each actor loads ``req.model`` by name).
    """
    with torch_threads(threads):
        return _run_loaded(
            req, model, prompts, db, run_name=run_name, replace=replace, quiet=quiet,
            shard=(workers, ray_address, threads),
        )  # fmt: skip


def _run_loaded(
    req: SearchRequest,
    model: Any,
    prompts: PromptSet,
    db: str | FsPath,
    *,
    run_name: str | None,
    replace: bool,
    quiet: bool,
    shard: _Shard = (None, None, DEFAULT_THREADS),
) -> RunResult:
    """The body of :func:`run_loaded`, under its thread setting."""
    req.validate()
    _check_workers(req, shard[0], shard[1])
    if run_name is not None:
        check_run_name(run_name)
    from pathdb.models import fingerprint

    fp = fingerprint(model)
    t_start = time.perf_counter()
    groups = _prompt_groups(req, prompts)
    first_scorer, names = _first_scorer(req, model, prompts)
    with search_lock(db), open_store(db) as store:
        name, replaces = run_name, None
        if replace and run_name is not None:
            # atomic: the old run stays intact until the new one completes and takes its name
            RunWriter.discard_replacements(store, run_name)
            if store.con.execute("SELECT 1 FROM runs WHERE name = ?", [run_name]).fetchall():
                name, replaces = run_name + REPLACING_SUFFIX, run_name
        elif run_name is not None:
            _check_name_free(store, run_name)
        writer = _new_writer(store, req, model, fp, first_scorer, prompts, names, name, replaces)
        store.detach()  # from here on the file is open only while a checkpoint commits
        driver = _Driver(req, model, prompts, writer)
        if req.prompt_mode == "batch":  # reuse the scorer (and its activation cache) built above
            driver.scorer_factory = lambda ps: first_scorer
        label = f"{req.params.strategy}/{req.params.method} on {req.model}"
        start = f"run {writer.name!r} (id {writer.run_id}) started: {label}, {len(prompts.records)} prompts, store {store.path}"
        if replaces is not None:
            start += f"; it replaces run {replaces!r} when it completes"
        work = [(prompt_idx, group, None) for prompt_idx, group in groups]
        if shard[0] is not None:
            return _sharded(
                store, writer, driver, model, work, label, start, t_start, quiet=quiet, shard=shard
            )
        return _drive(store, writer, driver, work, label, start, t_start, quiet=quiet)


def _first_scorer(
    req: SearchRequest, model: Any, prompts: PromptSet
) -> tuple[AnyScorer, list[str] | None]:
    """The scorer that sizes the search and gives its baseline and root, and the position names
    of role-aligned prompts: everything that can be refused, before the store is touched."""
    try:
        first_scorer = _scorer(req, model, _checked_prompts(req, prompts))
        check_size(req.params, first_scorer.root, first_scorer.shape)
    except ValueError as e:
        raise SearchError(str(e)) from e
    names = position_names(first_scorer)
    if names is not None and req.params.batch_positions:
        raise SearchError(
            "--batch-positions screens integer key/value positions; it is not available on role "
            "positions (prompts of different lengths); drop it"
        )
    return first_scorer, None if names is None else list(names)


def _new_writer(
    store: Store, req: SearchRequest, model: Any, fp: str, scorer: AnyScorer, prompts: PromptSet,
    names: list[str] | None, name: str | None, replaces: str | None = None,
) -> RunWriter:  # fmt: skip
    """Create the ``running`` run row with its metadata, prompts and position names."""
    meta = _run_meta(req, model, fp, scorer.baseline(), scorer.root)
    writer = RunWriter.create(store, name=name, replaces=replaces, meta=meta)
    writer.add_prompts(_prompt_rows(prompts))
    if names is not None:
        writer.add_positions(names)
    return writer


def run_many(
    requests: Sequence[SearchRequest],
    db: str | FsPath = "pathdb.duckdb",
    *,
    run_names: Sequence[str | None] | None = None,
    quiet: bool = False,
    threads: int | None = DEFAULT_THREADS,
    workers: int | None = None,
    ray_address: str | None = None,
) -> list[RunResult]:
    """Several searches (prompt sets, models), one stored run each, results in request order.

    Every search is loaded and checked, and every run created, before any is searched. With
    ``workers`` a batch search is one task and a per-prompt search one task per prompt, for one
    pool of that many Ray actors (each loads a model once, on its first task for it) and this
    process writes the results as they arrive; without, the searches run here one after another.
    Runs not completed when the driver stops (Ctrl-C, SIGKILL) are continued by ``pathdb
    resume`` one at a time.
    """
    names = [None] * len(requests) if run_names is None else list(run_names)
    if not requests or len(names) != len(requests):
        raise SearchError(
            f"run_many needs one or more requests and one run name (or None) per request "
            f"(got {len(requests)} requests, {len(names)} run_names)"
        )
    given = [n for n in names if n is not None]
    if len(set(given)) != len(given):
        raise SearchError(f"run_names repeats a name ({given}); give each run its own name")
    for req, name in zip(requests, names, strict=True):
        req.validate()
        if name is not None:
            check_run_name(name)
    from pathdb.models import ensure_supported, fingerprint, load
    from search.distributed import check_runs, drive_runs

    if workers is not None or ray_address is not None:
        check_runs(requests, workers, ray_address)
    with torch_threads(threads), search_lock(db):
        models: dict[tuple[str, str | None, str | None], Any] = {}
        checked = []
        for req in requests:  # load and check every search before the store is touched
            key = (req.model, req.device, req.dtype)
            if key not in models:
                models[key] = load(req.model, device=req.device, dtype=req.dtype)
                ensure_supported(models[key])
            model = models[key]
            prompts = _request_prompts(req, model)
            checked.append((req, model, prompts, *_first_scorer(req, model, prompts)))
        t_start = time.perf_counter()
        with open_store(db) as store:
            for name in given:
                _check_name_free(store, name)
            runs = []
            for (req, model, prompts, scorer, positions), name in zip(checked, names, strict=True):
                fp = fingerprint(model)
                writer = _new_writer(store, req, model, fp, scorer, prompts, positions, name)
                runs.append((writer, _Driver(req, model, prompts, writer), fp))
            store.detach()
            return drive_runs(
                store, runs, t_start, quiet=quiet, workers=workers, ray_address=ray_address,
                threads=threads,
            )  # fmt: skip


def resume_search(
    run: int | str,
    db: str | FsPath = "pathdb.duckdb",
    *,
    quiet: bool = False,
    threads: int | None = DEFAULT_THREADS,
    workers: int | None = None,
    ray_address: str | None = None,
) -> RunResult:
    """Continue an interrupted run from its last checkpoint; the result equals an uninterrupted run
    (``threads``, ``workers`` and ``ray_address`` as in :func:`run_loaded`)."""
    with torch_threads(threads):
        return _resume(run, db, quiet=quiet, shard=(workers, ray_address, threads))


def _resume(
    run: int | str, db: str | FsPath, *, quiet: bool, shard: _Shard = (None, None, DEFAULT_THREADS)
) -> RunResult:
    """The body of :func:`resume_search`, under its thread setting."""
    from pathdb.models import fingerprint, load

    with search_lock(db), open_store(db) as store:
        info = get_run(store, run)
        if info["status"] == "completed":
            raise SearchError(f"run {info['name']!r} is already completed; nothing to resume")
        req = SearchRequest.from_json(info["params"])
        if shard[0] is not None and req.prompt_mode == "batch":
            raise SearchError(
                f"run {info['name']!r} is a batch search, which resumes from its checkpoint in "
                "this process: drop --workers"
            )
        _check_workers(req, shard[0], shard[1])
        store.detach()  # readers may open the store while the model loads and the search runs
        model = load(req.model, device=req.device, dtype=req.dtype)
        if fingerprint(model) != info["model_fingerprint"]:
            raise SearchError(
                f"the weights of model {req.model!r} changed since run {info['name']!r} was started "
                "(fingerprint mismatch); resuming would mix results of two models"
            )
        writer = RunWriter.reopen(store, int(info["run_id"]))
        prompts = _stored_prompts(model, writer.prompt_rows(), req, str(info["name"]))
        with store.attached():
            state = _resume_state(store, writer, req)
        driver = _Driver(req, model, prompts, writer)
        t_start = time.perf_counter() - float(info["wall_s"] or 0.0)
        groups = _prompt_groups(req, prompts)
        label = f"resume {info['name']}: {req.params.strategy}/{req.params.method}"
        start = f"run {info['name']!r} (id {info['run_id']}) resumed from its last checkpoint"
        if info.get("replaces"):
            start += f"; it replaces run {info['replaces']!r} when it completes"
        work = [(pidx, group, state.get(pidx)) for pidx, group in groups]
        work = [w for w in work if w[2] is None or not w[2].done]  # skip finished prompt groups
        if shard[0] is not None:
            return _sharded(
                store, writer, driver, model, work, label, start, t_start, quiet=quiet, shard=shard
            )
        return _drive(store, writer, driver, work, label, start, t_start, quiet=quiet)
