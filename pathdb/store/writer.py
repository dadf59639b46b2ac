"""Bulk writer for one search run: node dictionary, path rows through Arrow, atomic batches.

Rows are buffered as NumPy columns and inserted with DuckDB ``INSERT ... SELECT`` from a
registered Arrow table (millions of rows per second; never ``executemany``). A *batch* is
everything written between two :meth:`RunWriter.flush` calls: buffered nodes, paths, frontier
changes and run counters go in ONE transaction, so a crash leaves either the whole batch or none
of it. When the buffer exceeds ``flush_rows`` rows it is moved into the open transaction (not
committed) to bound memory; only :meth:`RunWriter.flush` commits.

The writer uses its own cursor (a separate DuckDB connection to the same database), so its open
transaction never captures statements run on ``store.con`` and readers there see committed data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from pathdb.graph import Node
from pathdb.store import reader
from pathdb.store.db import Store, fetch_one, register_live_run, unregister_live_run
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
DEFAULT_FLUSH_ROWS = 200_000
_PATH_SQL_COLUMNS = (
    "path_id, parent_id, node_id, depth, prompt_idx, contribution, method, complete, kept"
)

IntArray = npt.ArrayLike
Chunk = dict[str, Any]


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
        raise StoreError(f"add_paths: unknown method {e.args[0]!r}; expected one of {METHOD_VALUES}") from None


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
    ) -> None:
        if store.read_only:
            raise StoreError(f"{store.path} is open read-only; open it writable to record a run")
        self.store = store
        self.run_id = run_id
        self.name = name
        self.flush_rows = flush_rows
        self.batch_id = batch_id  # the batch being built (committed by the next flush)
        self.write_seconds = write_seconds
        self.n_evaluated, self.n_complete, self.n_kept = counts
        self._cur = store.cursor()
        self._node_ids: dict[Node, int] = dict(nodes or {})
        self._nodes_written = len(self._node_ids)  # node ids below this are in the db / tx
        self._next_path_id = next_path_id
        self._chunks: list[Chunk] = []
        self._buffered = 0
        self._in_tx = False
        self._broken: str | None = None
        self._closed = False
        register_live_run(store, run_id)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def create(
        cls, store: Store, *, name: str | None, meta: Mapping[str, Any], **kwargs: Any
    ) -> RunWriter:
        """Insert a ``running`` run row (name auto-generated as ``run-<id>`` when None)."""
        missing = [k for k in RUN_META_REQUIRED if k not in meta]
        unknown = sorted(set(meta) - set(RUN_META_REQUIRED) - set(RUN_META_OPTIONAL))
        if missing or unknown:
            raise StoreError(
                f"run metadata: missing {missing}, unknown {unknown}; expected the runs columns "
                f"{list(RUN_META_REQUIRED + RUN_META_OPTIONAL)}"
            )
        con = store.con
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
        cols = ["run_id", "name", "status", "created_at", *values]
        quoted = ", ".join(f'"{c}"' for c in cols)
        try:
            con.execute(
                f"INSERT INTO runs ({quoted}) VALUES ({', '.join('?' * len(cols))})",
                [run_id, run_name, "running", _now(), *values.values()],
            )
        except duckdb.ConstraintException as exc:
            raise StoreError(f"cannot create run {run_name!r}: {exc}") from None
        return cls(store, int(run_id), run_name, **kwargs)

    @classmethod
    def reopen(
        cls, store: Store, run_id: int, *, allow_completed: bool = False, **kwargs: Any
    ) -> RunWriter:
        """Resume writing run ``run_id``: restores path ids, node dictionary, batch and counters."""
        run = reader.get_run(store, run_id)
        if run["status"] == "completed" and not allow_completed:
            raise StoreError(f"run {run['name']!r} (id {run_id}) is already completed")
        con = store.con
        next_path, next_batch = fetch_one(
            con.execute(
                "SELECT coalesce(max(path_id) + 1, 0), coalesce(max(batch_id) + 1, 0) "
                "FROM paths WHERE run_id = ?",
                [run_id],
            )
        ) or (0, 0)
        nodes = {node: nid for nid, node in reader.run_nodes(store, run_id).items()}
        con.execute(
            "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL WHERE run_id = ?",
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
            **kwargs,
        )

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
        """Insert prompt rows (keys: the ``prompts`` columns except ``run_id``)."""
        self._check_usable()
        for rec in records:
            extra = set(rec) - set(PROMPT_COLUMNS)
            if extra:
                raise StoreError(
                    f"add_prompts: unknown keys {sorted(extra)}; expected {PROMPT_COLUMNS}"
                )
        table = pa.Table.from_pylist([dict(r) for r in records], schema=_PROMPT_SCHEMA)
        t0 = time.perf_counter()
        self._insert_arrow("prompts", table, ", ".join(PROMPT_COLUMNS))
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
    def buffered_rows(self) -> int:
        """Path rows held in memory, not yet sent to DuckDB."""
        return self._buffered

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

    # ---- writing ----------------------------------------------------------------------------
    def _begin(self) -> None:
        if not self._in_tx:
            self._cur.begin()
            self._in_tx = True

    def _insert_arrow(
        self, table_name: str, data: pa.Table, columns: str, with_batch: bool = False
    ) -> None:
        """``INSERT ... SELECT`` from ``data`` registered as an Arrow view (run_id prepended).

        ``with_batch`` also writes the writer's current batch id into ``batch_id``.
        """
        view = f"_pathdb_{table_name}_buf"
        extra_cols = ", batch_id" if with_batch else ""
        extra_vals = f", {self.batch_id}" if with_batch else ""
        self._cur.register(view, data)
        try:
            self._cur.execute(
                f"INSERT INTO {table_name} (run_id, {columns}{extra_cols}) "
                f"SELECT {self.run_id}, {columns}{extra_vals} FROM {view}"
            )
        finally:
            self._cur.unregister(view)

    def _write_nodes(self) -> None:
        new = list(self._node_ids.items())[self._nodes_written :]
        if not new:
            return
        rows = [node_row(nid, node) for node, nid in new]
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
        """Move buffered nodes and paths into the open transaction (no commit)."""
        t0 = time.perf_counter()
        try:
            self._begin()
            self._write_nodes()
            table = self._paths_table() if self._chunks else None
            if table is not None:
                self._insert_arrow("paths", table, _PATH_SQL_COLUMNS, with_batch=True)
        except Exception as exc:
            self._fail(exc)
            raise StoreError(f"writing run {self.name!r} failed: {exc}") from exc
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
        if self._in_tx:
            try:
                self._cur.rollback()
            finally:
                self._in_tx = False
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
        self._spill()
        t0 = time.perf_counter()
        batch = self.batch_id
        try:
            self._begin()
            if frontier_remove is not None:
                rm = np.asarray(frontier_remove, dtype=np.int64).ravel()
                if rm.size:
                    self._cur.register("_pathdb_rm", pa.table({"path_id": rm}))
                    try:
                        self._cur.execute(
                            "DELETE FROM frontier WHERE run_id = ? AND path_id IN "
                            "(SELECT path_id FROM _pathdb_rm)",
                            [self.run_id],
                        )
                    finally:
                        self._cur.unregister("_pathdb_rm")
            if frontier_add is not None:
                self._add_frontier(frontier_add)
            if mark_kept is not None:
                self._mark_kept(mark_kept)
            if n_evaluated is not None:
                self.n_evaluated = n_evaluated
            if n_complete is not None:
                self.n_complete = n_complete
            if n_kept is not None:
                self.n_kept = n_kept
            write_s = self.write_seconds + (time.perf_counter() - t0)
            self._cur.execute(
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
            self._cur.commit()
            self._in_tx = False
        except Exception as exc:
            self._fail(exc)
            raise StoreError(f"flushing batch {batch} of run {self.name!r} failed: {exc}") from exc
        self.batch_id += 1
        self.write_seconds += time.perf_counter() - t0
        return batch

    def _mark_kept(self, path_ids: IntArray) -> None:
        ids = np.unique(np.asarray(path_ids, dtype=np.int64).ravel())
        if not ids.size:
            return
        self._cur.register("_pathdb_kept", pa.table({"path_id": ids}))
        try:
            changed = fetch_one(
                self._cur.execute(
                    "SELECT count(*) FROM paths WHERE run_id = ? AND NOT kept AND path_id IN "
                    "(SELECT path_id FROM _pathdb_kept)",
                    [self.run_id],
                )
            )
            self._cur.execute(
                "UPDATE paths SET kept = true WHERE run_id = ? AND NOT kept AND path_id IN "
                "(SELECT path_id FROM _pathdb_kept)",
                [self.run_id],
            )
        finally:
            self._cur.unregister("_pathdb_kept")
        self.n_kept += int(changed[0]) if changed else 0

    def prune_unkept(self) -> int:
        """``--store kept``: delete rejected leaf rows (in the open batch); returns rows deleted.

        A rejected path is never extended, so no stored path has it as a parent; evaluated
        counters keep counting it.
        """
        self._check_usable()
        self._spill()
        self._begin()
        sql = (
            "FROM paths p WHERE p.run_id = $run AND NOT p.kept AND p.depth > 0 AND NOT EXISTS "
            "(SELECT 1 FROM paths c WHERE c.run_id = $run AND c.parent_id = p.path_id)"
        )
        row = fetch_one(self._cur.execute(f"SELECT count(*) {sql}", {"run": self.run_id}))
        self._cur.execute(
            "DELETE FROM paths WHERE run_id = $run AND path_id IN (SELECT p.path_id " + sql + ")",
            {"run": self.run_id},
        )
        return int(row[0]) if row else 0

    def abandon(self, status: str, error: str | None = None) -> None:
        """Roll back everything since the last flush and close the run with ``status``.

        Used on interruption: the store keeps exactly the last checkpoint (rows + frontier),
        which is what resume continues from.
        """
        if status not in FINISH_STATUSES:
            raise StoreError(f"abandon: status {status!r} is not one of {FINISH_STATUSES}")
        self.close()
        self.store.con.execute(
            "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE run_id = ?",
            [status, _now(), error, self.run_id],
        )

    @staticmethod
    def delete_run(store: Store, run: int | str) -> bool:
        """Delete a run and all its rows (for ``--replace``); False when no such run exists."""
        col = "run_id" if isinstance(run, int) else "name"
        row = fetch_one(store.con.execute(f"SELECT run_id FROM runs WHERE {col} = ?", [run]))
        if row is None:
            return False
        cur = store.cursor()
        try:
            cur.begin()
            for table in ("frontier", "paths", "nodes", "prompts", "runs"):
                cur.execute(f"DELETE FROM {table} WHERE run_id = ?", [row[0]])
            cur.commit()
        finally:
            cur.close()
        return True

    def prompt_rows(self) -> list[dict[str, Any]]:
        """The run's stored prompts (the ``prompts`` columns), ordered by index."""
        tbl = self._cur.sql(
            f"SELECT {', '.join(PROMPT_COLUMNS)} FROM prompts WHERE run_id = $run ORDER BY prompt_idx",
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
        self._cur.register("_pathdb_fr", table)
        try:
            self._cur.execute(
                f"INSERT OR REPLACE INTO frontier (run_id, path_id, priority) "
                f"SELECT {self.run_id}, path_id, priority FROM _pathdb_fr"
            )
        finally:
            self._cur.unregister("_pathdb_fr")

    def finish(self, status: str, error: str | None = None, **timings: float) -> None:
        """Flush what is left and close the run with ``status`` (completed/interrupted/failed)."""
        if status not in FINISH_STATUSES:
            raise StoreError(f"finish: status {status!r} is not one of {FINISH_STATUSES}")
        unknown = set(timings) - {"wall_s", "eval_s"}
        if unknown:
            raise StoreError(f"finish: unknown timings {sorted(unknown)}; use wall_s, eval_s")
        if self._broken is None:
            self.flush(wall_s=timings.get("wall_s"), eval_s=timings.get("eval_s"))
        elif self._closed:
            raise StoreError(f"the writer of run {self.name!r} is finished/closed")
        # A writer whose flush failed can still record how the run ended (its batch is gone).
        self._cur.execute(
            "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE run_id = ?",
            [status, _now(), error, self.run_id],
        )
        self.close()

    def close(self) -> None:
        """Drop the writer without finishing: uncommitted rows are rolled back."""
        if self._closed:
            return
        if self._in_tx:
            self._cur.rollback()
            self._in_tx = False
        self._cur.close()
        self._closed = True
        unregister_live_run(self.store, self.run_id)

    # ---- resume -----------------------------------------------------------------------------
    def frontier(self) -> tuple[np.ndarray, np.ndarray]:
        """The stored frontier: (path ids, priorities; NaN where NULL), ordered by path id."""
        tbl = self._cur.sql(
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
        seqs = reader.node_id_sequences(self._cur, self.run_id, ids)
        return {pid: tuple(by_id[n] for n in seq) for pid, seq in seqs.items()}
