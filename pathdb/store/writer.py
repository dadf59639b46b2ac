"""Bulk writer for one search run: node dictionary, path rows through Arrow, atomic batches.

Rows are buffered in memory as NumPy columns and inserted with DuckDB ``INSERT ... SELECT`` from
a registered Arrow table (millions of rows per second; never ``executemany``). A *batch* is
everything written between two :meth:`RunWriter.flush` calls: buffered nodes, paths, frontier
changes and run counters go in ONE transaction, so a crash leaves either the whole batch or none
of it. The writer holds the store's connection only inside that transaction: on a detached
store (a search) the file is open just while a checkpoint commits, so other processes can read
it in between. Past :attr:`RunWriter.checkpoint_rows` buffered rows the search is asked to
checkpoint early; past ``flush_rows`` (a level-width level that is still running) the buffer is
moved into an open transaction (not committed, the file stays held) to bound memory. The
commit that completes a run also writes its circuit aggregate (:mod:`pathdb.store.circuit`);
reopening a run drops it.

SIGINT is held back while a transaction runs and delivered after it, so Ctrl-C never leaves a
half-done transaction; a full disk rolls the batch back and raises :class:`DiskFullError`.
The writer uses its own cursor (a separate DuckDB connection to the same database), so its open
transaction never captures statements run on ``store.con`` and readers there see committed data.
"""

from __future__ import annotations

import errno
import json
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from pathdb.graph import Node
from pathdb.store import reader
from pathdb.store.circuit import CIRCUIT_TABLES, drop_circuit_sums, write_circuit_sums
from pathdb.store.db import Store, fetch_one, register_live_run, unregister_live_run
from pathdb.store.effects import TABLE as GROUP_EFFECTS
from pathdb.store.effects import drop_group_effects, write_group_effects
from pathdb.store.errors import StoreError
from pathdb.store.nodes import NODE_COLUMNS, node_row

RUN_META_REQUIRED = (
    "model_name", "model_fingerprint", "n_layers", "n_heads", "d_model", "method", "strategy",
    "metric", "patch_type", "prompt_mode", "positional", "params", "package_version",
)  # fmt: skip
RUN_META_OPTIONAL = ("root_position", "baseline")
PROMPT_COLUMNS = (
    "prompt_idx", "clean", "counterfactual", "target", "cf_target", "target_id", "cf_target_id",
    "tokens", "token_strs", "cf_tokens", "roles",
)  # fmt: skip
_PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_idx", pa.int32()),
        ("clean", pa.string()),
        ("counterfactual", pa.string()),
        ("target", pa.string()),
        ("cf_target", pa.string()),
        ("target_id", pa.int32()),
        ("cf_target_id", pa.int32()),
        ("tokens", pa.list_(pa.int32())),
        ("token_strs", pa.list_(pa.string())),
        ("cf_tokens", pa.list_(pa.int32())),
        ("roles", pa.list_(pa.string())),
    ]
)
_NODE_SCHEMA = pa.schema(
    [
        ("node_id", pa.int32()),
        ("kind", pa.string()),
        ("layer", pa.int16()),
        ("head", pa.int16()),
        ("site", pa.string()),
        ("position", pa.int16()),
        ("kv_position", pa.int16()),
        ("label", pa.string()),
        ("component", pa.string()),
    ]
)
FINISH_STATUSES = ("completed", "interrupted", "failed")
STOP_REASONS = ("completed", "max_time", "top_n", "interrupted", "error")
_DEFAULT_STOP = {"completed": "completed", "interrupted": "interrupted", "failed": "error"}
DEFAULT_FLUSH_ROWS = 1_000_000  # ~40 MB of buffered rows; half of it asks for a checkpoint
REPLACING_SUFFIX = ".replacing"  # temporary name of a run that replaces another on completion
_RUN_TABLES = (
    "frontier", "paths", "nodes", "positions", "edge_scores", "node_scores", "prompts",
    *CIRCUIT_TABLES, GROUP_EFFECTS, "runs",
)  # fmt: skip
_PATH_SQL_COLUMNS = (
    "path_id, parent_id, node_id, depth, prompt_idx, contribution, method, complete, kept"
)

IntArray = npt.ArrayLike
Chunk = dict[str, Any]


class DiskFullError(StoreError):
    """The disk (or quota) is full: the batch was rolled back; the run keeps its last checkpoint."""


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "no space left on device" in str(exc).lower()


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back while a store transaction runs (main thread only), then deliver it.

    A KeyboardInterrupt raised inside DuckDB calls can leave the transaction half aborted (the
    run then ended as ``failed: TransactionContext Error``); after the block it is harmless.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(*caught[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _column(value: npt.ArrayLike, n: int, dtype: npt.DTypeLike, name: str) -> np.ndarray:
    """``value`` as a length-``n`` array of ``dtype`` (scalars broadcast); clear error otherwise."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise StoreError(f"add_paths: {name} has shape {arr.shape}, expected ({n},)")
    return arr.astype(dtype, copy=False)


METHOD_VALUES = ("root", "exact", "attribution", "confirmed")
_METHOD_CODES = {m: i for i, m in enumerate(METHOD_VALUES)}


def _method_codes(methods: str | Sequence[str] | np.ndarray, n: int) -> np.ndarray:
    """Methods as int8 codes into :data:`METHOD_VALUES` (one dictionary for the whole run)."""
    try:
        if isinstance(methods, str):
            return np.full(n, _METHOD_CODES[methods], dtype=np.int8)
        if len(methods) != n:
            raise StoreError(f"add_paths: methods has length {len(methods)}, expected {n}")
        return np.fromiter((_METHOD_CODES[m] for m in methods), dtype=np.int8, count=n)
    except KeyError as e:
        raise StoreError(
            f"add_paths: unknown method {e.args[0]!r}; expected one of {METHOD_VALUES}"
        ) from None


class RunWriter:
    """Writes one run's prompts, nodes, paths and frontier; see the module docstring."""

    def __init__(
        self,
        store: Store,
        run_id: int,
        name: str,
        *,
        next_path_id: int = 0,
        nodes: Mapping[Node, int] | None = None,
        batch_id: int = 0,
        counts: tuple[int, int, int] = (0, 0, 0),
        write_seconds: float = 0.0,
        flush_rows: int = DEFAULT_FLUSH_ROWS,
        replaces: str | None = None,
        position_names: Sequence[str] | None = None,
    ) -> None:
        if store.read_only:
            raise StoreError(f"{store.path} is open read-only; open it writable to record a run")
        self.store = store
        self.run_id = run_id
        self.name = name
        self.replaces = replaces  # name of the run this one replaces when it completes
        # role-aligned runs: position -> name (node labels use them); None: integer positions
        self.position_names: tuple[str, ...] | None = (
            None if position_names is None else tuple(position_names)
        )
        self.flush_rows = flush_rows
        self.batch_id = batch_id  # the batch being built (committed by the next flush)
        self.write_seconds = write_seconds
        self.n_evaluated, self.n_complete, self.n_kept = counts
        self._cur: duckdb.DuckDBPyConnection | None = None  # held only inside a transaction
        self._node_ids: dict[Node, int] = dict(nodes or {})
        self._nodes_written = len(self._node_ids)  # node ids below this are in the db / tx
        self._next_path_id = next_path_id
        self._chunks: list[Chunk] = []
        self._buffered = 0
        self._in_tx = False
        self._broken: str | None = None
        self._closed = False
        # False while the store cannot hold frontier rows of this run (created here, none added
        # yet): frontier() then answers without opening a detached store's file
        self._frontier_stored = True
        register_live_run(store, run_id)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        store: Store,
        *,
        name: str | None,
        meta: Mapping[str, Any],
        replaces: str | None = None,
        **kwargs: Any,
    ) -> RunWriter:
        """Insert a ``running`` run row (name auto-generated as ``run-<id>`` when None).

        With ``replaces`` the run is an atomic replacement of the run of that name: it is
        written under ``name`` (a temporary name) and takes over ``replaces`` when it completes.
        """
        missing = [k for k in RUN_META_REQUIRED if k not in meta]
        unknown = sorted(set(meta) - set(RUN_META_REQUIRED) - set(RUN_META_OPTIONAL))
        if missing or unknown:
            raise StoreError(
                f"run metadata: missing {missing}, unknown {unknown}; expected the runs columns "
                f"{list(RUN_META_REQUIRED + RUN_META_OPTIONAL)}"
            )
        with store.attached() as con:
            if name is not None:
                row = fetch_one(con.execute("SELECT run_id FROM runs WHERE name = ?", [name]))
                if row is not None:
                    raise StoreError(
                        f"a run named {name!r} already exists in {store.path} (run_id {row[0]}); "
                        "choose another --name, or resume that run"
                    )
            (run_id,) = fetch_one(con.execute("SELECT nextval('runs_run_id_seq')")) or (None,)
            assert run_id is not None
            run_name = name if name is not None else f"run-{run_id}"
            values = {k: meta.get(k) for k in RUN_META_REQUIRED + RUN_META_OPTIONAL}
            values["params"] = json.dumps(values["params"], sort_keys=True, default=str)
            values["replaces"] = replaces
            cols = ["run_id", "name", "status", "created_at", *values]
            quoted = ", ".join(f'"{c}"' for c in cols)
            try:
                with _sigint_deferred():
                    con.execute(
                        f"INSERT INTO runs ({quoted}) VALUES ({', '.join('?' * len(cols))})",
                        [run_id, run_name, "running", _now(), *values.values()],
                    )
            except duckdb.ConstraintException as exc:
                raise StoreError(f"cannot create run {run_name!r}: {exc}") from None
        writer = cls(store, int(run_id), run_name, replaces=replaces, **kwargs)
        writer._frontier_stored = False
        return writer

    @classmethod
    def reopen(
        cls, store: Store, run_id: int, *, allow_completed: bool = False, **kwargs: Any
    ) -> RunWriter:
        """Resume writing run ``run_id``: restores path ids, node dictionary, batch and counters."""
        with store.attached() as con:
            run = reader.get_run(store, run_id)
            if run["status"] == "completed" and not allow_completed:
                raise StoreError(f"run {run['name']!r} (id {run_id}) is already completed")
            next_path, next_batch = fetch_one(
                con.execute(
                    "SELECT coalesce(max(path_id) + 1, 0), coalesce(max(batch_id) + 1, 0) "
                    "FROM paths WHERE run_id = ?",
                    [run_id],
                )
            ) or (0, 0)
            nodes = {node: nid for nid, node in reader.run_nodes(store, run_id).items()}
            names = reader.position_names(con, run_id)
            with _sigint_deferred():
                drop_circuit_sums(con, run_id)  # before it runs: no stale sums
                drop_group_effects(con, run_id)  # rewritten when it completes again
                con.execute(
                    "UPDATE runs SET status = 'running', stop_reason = NULL, finished_at = NULL, "
                    "error = NULL WHERE run_id = ?",
                    [run_id],
                )
        return cls(
            store,
            int(run_id),
            str(run["name"]),
            next_path_id=int(next_path),
            nodes=nodes,
            batch_id=int(next_batch),
            counts=(int(run["n_evaluated"]), int(run["n_complete"]), int(run["n_kept"])),
            write_seconds=float(run["write_s"] or 0.0),
            replaces=run.get("replaces"),
            position_names=names,
            **kwargs,
        )

    @staticmethod
    def discard_replacements(store: Store, name: str) -> int:
        """Delete unfinished ``--replace`` runs that were to replace ``name``; return how many.

        Only called by a process holding the store's search lock, so none of them is alive.
        """
        with store.attached() as con:
            rows = con.execute(
                "SELECT run_id FROM runs WHERE replaces = ? AND status <> 'completed'", [name]
            ).fetchall()
            cur = con.cursor()
            try:
                with _sigint_deferred():
                    cur.begin()
                    for (rid,) in rows:
                        _delete_run_rows(cur, int(rid))
                    cur.commit()
            finally:
                cur.close()
        return len(rows)

    # ---- inputs -----------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of run {self.name!r} is finished/closed")
        if self._broken is not None:
            raise StoreError(
                f"a flush of run {self.name!r} failed ({self._broken}); its batch was rolled "
                "back: reopen the run with RunWriter.reopen to continue"
            )

    def add_prompts(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Insert prompt rows (keys: the ``prompts`` columns except ``run_id``), committed."""
        self._check_usable()
        for rec in records:
            extra = set(rec) - set(PROMPT_COLUMNS)
            if extra:
                raise StoreError(
                    f"add_prompts: unknown keys {sorted(extra)}; expected {PROMPT_COLUMNS}"
                )
        table = pa.Table.from_pylist([dict(r) for r in records], schema=_PROMPT_SCHEMA)
        self._insert_committed("prompts", table, ", ".join(PROMPT_COLUMNS), "the prompts")

    def add_positions(self, names: Sequence[str]) -> None:
        """Record the run's role-aligned position axis (position -> name), committed; node labels
        written from now on name positions by role (``a3.h0<q>@END``)."""
        self._check_usable()
        table = pa.table(
            {
                "position": pa.array(range(len(names)), pa.int16()),
                "name": pa.array(names, pa.string()),
            }
        )
        self._insert_committed("positions", table, "position, name", "the role positions")
        self.position_names = tuple(names)

    def _insert_committed(self, table_name: str, table: pa.Table, columns: str, what: str) -> None:
        """Insert ``table`` into ``table_name`` for this run in its own committed transaction."""
        t0 = time.perf_counter()
        self._hold()
        with _sigint_deferred():
            try:
                self._begin()
                self._insert_arrow(table_name, table, columns)
                self._tx().commit()
                self._in_tx = False
            except Exception as exc:
                self._fail(exc)
                raise self._error(exc, f"writing {what} of run {self.name!r} failed") from exc
            finally:
                if not self._in_tx:
                    self._unhold()
        self.write_seconds += time.perf_counter() - t0

    def node_id(self, node: Node) -> int:
        """The run-local id of ``node``, interning it (written with the next flush) if new."""
        nid = self._node_ids.get(node)
        if nid is None:
            nid = len(self._node_ids)
            self._node_ids[node] = nid
        return nid

    @property
    def nodes(self) -> dict[Node, int]:
        """A copy of the node dictionary (node -> id)."""
        return dict(self._node_ids)

    @property
    def next_path_id(self) -> int:
        """The id the next added path will get."""
        return self._next_path_id

    @property
    def closed(self) -> bool:
        """True once the run was finished, abandoned or closed by this writer."""
        return self._closed

    @property
    def buffered_rows(self) -> int:
        """Path rows held in memory, not yet sent to DuckDB."""
        return self._buffered

    @property
    def checkpoint_rows(self) -> int:
        """Buffered rows past which the search should checkpoint early (half of ``flush_rows``)."""
        return max(self.flush_rows // 2, 1)

    def add_paths(
        self,
        parent_ids: IntArray,
        node_ids: IntArray,
        depths: IntArray,
        prompt_idx: IntArray | None,
        contributions: npt.ArrayLike,
        methods: str | Sequence[str] | np.ndarray,
        complete: npt.ArrayLike,
        kept: npt.ArrayLike,
    ) -> np.ndarray:
        """Buffer evaluated paths; return their new ids (sequential per run, the root gets 0).

        ``parent_ids`` -1 marks the root (NULL parent); ``prompt_idx`` None or -1 is NULL
        (batch mode); NaN contributions are stored as NULL. Scalars broadcast.
        """
        self._check_usable()
        node_arr = np.asarray(node_ids)
        if node_arr.ndim != 1:
            raise StoreError(f"add_paths: node_ids must be 1-D, got shape {node_arr.shape}")
        n = node_arr.shape[0]
        ids = np.arange(self._next_path_id, self._next_path_id + n, dtype=np.int64)
        parents = _column(parent_ids, n, np.int64, "parent_ids")
        nodes = node_arr.astype(np.int32, copy=False)
        if n and (nodes.min() < 0 or nodes.max() >= len(self._node_ids)):
            raise StoreError(
                f"add_paths: node ids must come from node_id() (0..{len(self._node_ids) - 1})"
            )
        if n and (parents.min() < -1 or np.any(parents >= ids)):
            raise StoreError(
                "add_paths: every parent id must be -1 (root) or an earlier path id of this run"
            )
        chunk: Chunk = {
            "path_id": ids,
            "parent_id": parents,
            "node_id": nodes,
            "depth": _column(depths, n, np.int16, "depths"),
            "prompt_idx": _column(
                -1 if prompt_idx is None else prompt_idx, n, np.int32, "prompt_idx"
            ),
            "contribution": _column(contributions, n, np.float64, "contributions"),
            "method": _method_codes(methods, n),
            "complete": _column(complete, n, np.bool_, "complete"),
            "kept": _column(kept, n, np.bool_, "kept"),
        }
        self._chunks.append(chunk)
        self._buffered += n
        self._next_path_id += n
        if self._buffered >= self.flush_rows:
            self._spill()
        return ids

    # ---- connection and transaction ----------------------------------------------------------
    def _hold(self) -> duckdb.DuckDBPyConnection:
        """This writer's cursor, attaching the store (reopening a detached file) if needed."""
        if self._cur is None:
            con = self.store.attach()
            try:
                self._cur = con.cursor()
            except BaseException:
                self.store.release()
                raise
        return self._cur

    def _unhold(self) -> None:
        """Close the cursor and release the store (a detached store closes the file)."""
        if self._cur is not None:
            cur, self._cur = self._cur, None
            with suppress(duckdb.Error):
                cur.close()
            self.store.release()

    def _tx(self) -> duckdb.DuckDBPyConnection:
        assert self._cur is not None, "no open transaction"
        return self._cur

    def _begin(self) -> None:
        if not self._in_tx:
            self._hold().begin()
            self._in_tx = True

    def _rollback(self) -> None:
        """Roll back the open transaction, if any (DuckDB may already have aborted it)."""
        if self._in_tx:
            self._in_tx = False
            with suppress(duckdb.Error):
                self._tx().rollback()

    @contextmanager
    def _reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for reads: the open transaction's, or one held for the block."""
        if self._cur is not None:
            yield self._cur
            return
        cur = self._hold()
        try:
            yield cur
        finally:
            self._unhold()

    def _error(self, exc: BaseException, what: str) -> StoreError:
        """The exception to raise for a failed write: :class:`DiskFullError` for a full disk."""
        if _is_disk_full(exc):
            return DiskFullError(
                f"no space left on device writing {self.store.path}: the batch was rolled back "
                f"and run {self.name!r} keeps its last checkpoint; free some space, then continue "
                f"with `pathdb resume {self.name} --db {self.store.path}`"
            )
        return StoreError(f"{what}: {exc}")

    # ---- writing ----------------------------------------------------------------------------
    def _insert_arrow(
        self, table_name: str, data: pa.Table, columns: str, with_batch: bool = False
    ) -> None:
        """``INSERT ... SELECT`` from ``data`` registered as an Arrow view (run_id prepended).

        ``with_batch`` also writes the writer's current batch id into ``batch_id``.
        """
        cur = self._tx()
        view = f"_pathdb_{table_name}_buf"
        extra_cols = ", batch_id" if with_batch else ""
        extra_vals = f", {self.batch_id}" if with_batch else ""
        cur.register(view, data)
        try:
            cur.execute(
                f"INSERT INTO {table_name} (run_id, {columns}{extra_cols}) "
                f"SELECT {self.run_id}, {columns}{extra_vals} FROM {view}"
            )
        finally:
            cur.unregister(view)

    def _write_nodes(self) -> None:
        new = list(self._node_ids.items())[self._nodes_written :]
        if not new:
            return
        rows = [node_row(nid, node, self.position_names) for node, nid in new]
        table = pa.Table.from_pylist(
            [dict(zip(NODE_COLUMNS, r, strict=True)) for r in rows], schema=_NODE_SCHEMA
        )
        self._insert_arrow("nodes", table, ", ".join(NODE_COLUMNS))
        self._nodes_written = len(self._node_ids)

    def _paths_table(self) -> pa.Table:
        """One Arrow table for all buffered chunks: columns concatenated in NumPy first, so the
        insert sees one contiguous array per column rather than thousands of tiny chunks."""
        col = {k: np.concatenate([ch[k] for ch in self._chunks]) for k in self._chunks[0]}
        return pa.table(
            {
                "path_id": pa.array(col["path_id"]),
                "parent_id": pa.array(col["parent_id"], mask=col["parent_id"] < 0),
                "node_id": pa.array(col["node_id"]),
                "depth": pa.array(col["depth"]),
                "prompt_idx": pa.array(col["prompt_idx"], mask=col["prompt_idx"] < 0),
                "contribution": pa.array(col["contribution"], mask=np.isnan(col["contribution"])),
                "method": pa.DictionaryArray.from_arrays(
                    pa.array(col["method"]), pa.array(METHOD_VALUES, pa.string())
                ),
                "complete": pa.array(col["complete"]),
                "kept": pa.array(col["kept"]),
            }
        )

    def _spill(self) -> None:
        """Move buffered nodes and paths into the open transaction (no commit).

        Called with SIGINT deferred (inside a flush) or on its own when the buffer passes
        ``flush_rows``; then the store stays held until the next flush commits.
        """
        t0 = time.perf_counter()
        self._hold()
        with _sigint_deferred():
            try:
                self._begin()
                self._write_nodes()
                table = self._paths_table() if self._chunks else None
                if table is not None:
                    self._insert_arrow("paths", table, _PATH_SQL_COLUMNS, with_batch=True)
            except Exception as exc:
                self._fail(exc)
                raise self._error(exc, f"writing run {self.name!r} failed") from exc
        self._count(table)
        self._chunks.clear()
        self._buffered = 0
        self.write_seconds += time.perf_counter() - t0

    def _count(self, table: pa.Table | None) -> None:
        if table is None:
            return
        depth = table["depth"].to_numpy()
        self.n_evaluated += int(np.count_nonzero(depth > 0))
        self.n_complete += int(np.count_nonzero(table["complete"].to_numpy()))
        self.n_kept += int(np.count_nonzero(table["kept"].to_numpy()))

    def _fail(self, exc: BaseException) -> None:
        self._broken = f"{type(exc).__name__}: {exc}"
        self._rollback()
        self._unhold()
        unregister_live_run(self.store, self.run_id)

    def flush(
        self,
        frontier_add: tuple[IntArray, npt.ArrayLike | None] | IntArray | None = None,
        frontier_remove: IntArray | None = None,
        *,
        mark_kept: IntArray | None = None,
        n_evaluated: int | None = None,
        n_complete: int | None = None,
        n_kept: int | None = None,
        wall_s: float | None = None,
        eval_s: float | None = None,
    ) -> int:
        """Commit the batch: buffered rows, frontier changes and counters in ONE transaction.

        ``frontier_add`` is ``(path_ids, priorities)`` or just path ids; ``frontier_remove``
        path ids; ``mark_kept`` path ids (written earlier or in this batch) whose ``kept`` flag
        becomes true (best-first pops, level-width selections). Counters default to the
        writer's own counts of rows written. Returns the id of the committed batch.
        """
        self._check_usable()
        if n_evaluated is not None:
            self.n_evaluated = n_evaluated
        if n_complete is not None:
            self.n_complete = n_complete
        if n_kept is not None:
            self.n_kept = n_kept
        return self._commit(
            frontier_add, frontier_remove, mark_kept, wall_s=wall_s, eval_s=eval_s, close=None
        )

    def _commit(
        self,
        frontier_add: tuple[IntArray, npt.ArrayLike | None] | IntArray | None,
        frontier_remove: IntArray | None,
        mark_kept: IntArray | None,
        *,
        wall_s: float | None,
        eval_s: float | None,
        close: tuple[str, str | None, str, Mapping[str, float] | None, bool] | None,
    ) -> int:
        """One transaction: spill, frontier, kept flags, counters and, with ``close`` =
        (status, error, stop_reason, group effects, prune unkept), the run's end (and a completed
        replacement's swap)."""
        t0 = time.perf_counter()
        batch = self.batch_id
        self._hold()  # may wait for readers to close the file: before SIGINT is deferred
        with _sigint_deferred():
            self._spill()
            try:
                cur = self._tx()
                if frontier_remove is not None:
                    rm = np.asarray(frontier_remove, dtype=np.int64).ravel()
                    if rm.size:
                        cur.register("_pathdb_rm", pa.table({"path_id": rm}))
                        try:
                            cur.execute(
                                "DELETE FROM frontier WHERE run_id = ? AND path_id IN "
                                "(SELECT path_id FROM _pathdb_rm)",
                                [self.run_id],
                            )
                        finally:
                            cur.unregister("_pathdb_rm")
                if frontier_add is not None:
                    self._add_frontier(frontier_add)
                if mark_kept is not None:
                    self._mark_kept(mark_kept)
                write_s = self.write_seconds + (time.perf_counter() - t0)
                cur.execute(
                    "UPDATE runs SET n_evaluated = ?, n_complete = ?, n_kept = ?, write_s = ?, "
                    "wall_s = coalesce(?, wall_s), eval_s = coalesce(?, eval_s) WHERE run_id = ?",
                    [
                        self.n_evaluated,
                        self.n_complete,
                        self.n_kept,
                        write_s,
                        wall_s,
                        eval_s,
                        self.run_id,
                    ],
                )
                name = self.name
                if close is not None:
                    name = self._close_run(cur, *close)
                cur.commit()
                self._in_tx = False
            except Exception as exc:
                self._fail(exc)
                raise self._error(
                    exc, f"flushing batch {batch} of run {self.name!r} failed"
                ) from exc
            self.name = name
            if close is not None:
                self.replaces = None
            self.batch_id += 1
            self._unhold()
        self.write_seconds += time.perf_counter() - t0
        return batch

    def _close_run(
        self,
        cur: duckdb.DuckDBPyConnection,
        status: str,
        error: str | None,
        stop_reason: str,
        group_effects: Mapping[str, float] | None,
        prune: bool,
    ) -> str:
        """Record how the run ended (a completed run with its circuit aggregate and the group
        effects the search measured, :mod:`pathdb.store.effects`; with ``prune``, less its
        rejected leaf rows: :meth:`finish`); a completed replacement deletes the run it replaces
        and takes its name, in the same transaction. Returns the run's final name."""
        if prune:
            self._prune_unkept(cur)
        cur.execute(
            "UPDATE runs SET status = ?, stop_reason = ?, finished_at = ?, error = ? "
            "WHERE run_id = ?",
            [status, stop_reason, _now(), error, self.run_id],
        )
        if status == "completed":
            write_circuit_sums(cur, self.run_id)
            if group_effects:
                write_group_effects(cur, self.run_id, group_effects)
        if status != "completed" or self.replaces is None:
            return self.name
        old = cur.execute(
            "SELECT run_id FROM runs WHERE name = ? AND run_id <> ?", [self.replaces, self.run_id]
        ).fetchall()
        for (rid,) in old:
            _delete_run_rows(cur, int(rid))
        cur.execute(
            "UPDATE runs SET name = ?, replaces = NULL WHERE run_id = ?",
            [self.replaces, self.run_id],
        )
        return self.replaces

    def _mark_kept(self, path_ids: IntArray) -> None:
        ids = np.unique(np.asarray(path_ids, dtype=np.int64).ravel())
        if not ids.size:
            return
        cur = self._tx()
        cur.register("_pathdb_kept", pa.table({"path_id": ids}))
        try:
            changed = fetch_one(
                cur.execute(
                    "SELECT count(*) FROM paths WHERE run_id = ? AND NOT kept AND path_id IN "
                    "(SELECT path_id FROM _pathdb_kept)",
                    [self.run_id],
                )
            )
            cur.execute(
                "UPDATE paths SET kept = true WHERE run_id = ? AND NOT kept AND path_id IN "
                "(SELECT path_id FROM _pathdb_kept)",
                [self.run_id],
            )
        finally:
            cur.unregister("_pathdb_kept")
        self.n_kept += int(changed[0]) if changed else 0

    def _prune_unkept(self, cur: duckdb.DuckDBPyConnection) -> None:
        """``--store kept``: delete the run's rejected leaf rows (in the open transaction).

        A rejected path is never extended, so no stored path has it as a parent; evaluated
        counters keep counting it.
        """
        cur.execute(
            "DELETE FROM paths WHERE run_id = $run AND path_id IN (SELECT p.path_id FROM paths p "
            "WHERE p.run_id = $run AND NOT p.kept AND p.depth > 0 AND NOT EXISTS "
            "(SELECT 1 FROM paths c WHERE c.run_id = $run AND c.parent_id = p.path_id))",
            {"run": self.run_id},
        )

    def _set_status(self, status: str, error: str | None, stop_reason: str) -> None:
        """Record how the run ended, outside any batch (after a rollback)."""
        with self.store.attached() as con, _sigint_deferred():
            try:
                con.execute(
                    "UPDATE runs SET status = ?, stop_reason = ?, finished_at = ?, error = ? "
                    "WHERE run_id = ?",
                    [status, stop_reason, _now(), error, self.run_id],
                )
            except duckdb.Error as exc:
                raise self._error(exc, f"marking run {self.name!r} {status} failed") from exc

    def abandon(
        self, status: str, error: str | None = None, *, stop_reason: str | None = None
    ) -> None:
        """Roll back everything since the last flush and close the run with ``status``.

        Used on interruption: the store keeps exactly the last checkpoint (rows + frontier),
        which is what resume continues from. ``stop_reason`` defaults from ``status``.
        """
        if status not in FINISH_STATUSES:
            raise StoreError(f"abandon: status {status!r} is not one of {FINISH_STATUSES}")
        self.close()
        self._set_status(status, error, stop_reason or _DEFAULT_STOP[status])

    def prompt_rows(self) -> list[dict[str, Any]]:
        """The run's stored prompts (the ``prompts`` columns), ordered by index."""
        with self._reading() as cur:
            tbl = cur.sql(
                f"SELECT {', '.join(PROMPT_COLUMNS)} FROM prompts WHERE run_id = $run "
                "ORDER BY prompt_idx",
                params={"run": self.run_id},
            ).to_arrow_table()
        return tbl.to_pylist()

    def _add_frontier(self, frontier_add: tuple[IntArray, npt.ArrayLike | None] | IntArray) -> None:
        if isinstance(frontier_add, tuple):
            ids_like, prio_like = frontier_add
        else:
            ids_like, prio_like = frontier_add, None
        ids = np.asarray(ids_like, dtype=np.int64).ravel()
        if not ids.size:
            return
        prio = (
            np.full(ids.size, np.nan)
            if prio_like is None
            else np.asarray(prio_like, dtype=np.float64).ravel()
        )
        if prio.shape != ids.shape:
            raise StoreError("flush: frontier priorities must match the frontier path ids")
        table = pa.table({"path_id": ids, "priority": pa.array(prio, mask=np.isnan(prio))})
        self._frontier_stored = True
        cur = self._tx()
        cur.register("_pathdb_fr", table)
        try:
            cur.execute(
                f"INSERT OR REPLACE INTO frontier (run_id, path_id, priority) "
                f"SELECT {self.run_id}, path_id, priority FROM _pathdb_fr"
            )
        finally:
            cur.unregister("_pathdb_fr")

    def finish(
        self,
        status: str,
        error: str | None = None,
        *,
        stop_reason: str | None = None,
        group_effects: Mapping[str, float] | None = None,
        frontier_add: tuple[IntArray, npt.ArrayLike | None] | IntArray | None = None,
        frontier_remove: IntArray | None = None,
        mark_kept: IntArray | None = None,
        prune_unkept: bool = False,
        **timings: float,
    ) -> None:
        """Flush what is left and close the run with ``status`` (completed/interrupted/failed),
        in one transaction; a completed replacement takes over the run it replaces. A completed
        run stores ``group_effects`` (receiver -> effect, :mod:`pathdb.store.effects`) when given.
        The frontier and kept changes are :meth:`flush`'s (the last checkpoint commits with the
        run's end); ``prune_unkept`` (``--store kept``) deletes the rejected leaf rows first."""
        if status not in FINISH_STATUSES:
            raise StoreError(f"finish: status {status!r} is not one of {FINISH_STATUSES}")
        reason = stop_reason or _DEFAULT_STOP[status]
        if reason not in STOP_REASONS:
            raise StoreError(f"finish: stop_reason {reason!r} is not one of {STOP_REASONS}")
        unknown = set(timings) - {"wall_s", "eval_s"}
        if unknown:
            raise StoreError(f"finish: unknown timings {sorted(unknown)}; use wall_s, eval_s")
        if self._broken is None:
            self._check_usable()
            self._commit(
                frontier_add,
                frontier_remove,
                mark_kept,
                wall_s=timings.get("wall_s"),
                eval_s=timings.get("eval_s"),
                close=(status, error, reason, group_effects, prune_unkept),
            )
        elif self._closed:
            raise StoreError(f"the writer of run {self.name!r} is finished/closed")
        else:  # a writer whose flush failed can still record how the run ended (its batch is gone)
            self._set_status(status, error, reason)
        self.close()

    def close(self) -> None:
        """Drop the writer without finishing: uncommitted rows are rolled back."""
        if self._closed:
            return
        with _sigint_deferred():
            self._rollback()
            self._unhold()
        self._closed = True
        unregister_live_run(self.store, self.run_id)

    # ---- resume -----------------------------------------------------------------------------
    def frontier(self) -> tuple[np.ndarray, np.ndarray]:
        """The stored frontier: (path ids, priorities; NaN where NULL), ordered by path id."""
        if not self._frontier_stored:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        with self._reading() as cur:
            tbl = cur.sql(
                "SELECT path_id, coalesce(priority, 'NaN'::DOUBLE) AS priority FROM frontier "
                "WHERE run_id = $run ORDER BY path_id",
                params={"run": self.run_id},
            ).to_arrow_table()
        ids = np.asarray(tbl["path_id"].to_numpy(), dtype=np.int64)
        prio = np.asarray(tbl["priority"].to_numpy(zero_copy_only=False), dtype=np.float64)
        return ids, prio

    def path_nodes(self, path_ids: IntArray) -> dict[int, tuple[Node, ...]]:
        """Node sequences (start -> FINAL) of the given stored paths of this run."""
        ids = np.asarray(path_ids, dtype=np.int64).ravel()
        by_id = {nid: node for node, nid in self._node_ids.items()}
        with self._reading() as cur:
            seqs = reader.node_id_sequences(cur, self.run_id, ids)
        return {pid: tuple(by_id[n] for n in seq) for pid, seq in seqs.items()}


def _delete_run_rows(cur: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Delete every row of one run, its faithfulness evaluations included (in the caller's
    transaction), so a replaced or deleted run leaves no evaluation behind that names its id."""
    cur.execute(
        "DELETE FROM evaluation_points WHERE evaluation_id IN "
        "(SELECT evaluation_id FROM evaluations WHERE run_id = ?)",
        [run_id],
    )
    cur.execute("DELETE FROM evaluations WHERE run_id = ?", [run_id])
    for table in _RUN_TABLES:
        cur.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
