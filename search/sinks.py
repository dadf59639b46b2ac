"""Where a search's evaluated paths go: an in-memory list (Python API, tests) or the DuckDB store.

Both give every evaluated path an integer id (its row in the store's path tree), so children can
point at their parent and a resumed search can continue from stored frontier ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathdb.graph import Node, Path
from pathdb.store.writer import RunWriter
from search.memo import ByTuple
from search.strategies import FrontierEntry

METHOD_CODES = ("root", "exact", "attribution", "confirmed")


@dataclass
class EvaluatedPath:
    """One evaluated path as the Python API returns it."""

    path_id: int
    parent_id: int | None
    path: Path
    contribution: float | None
    method: str
    complete: bool
    kept: bool
    prompt_idx: int | None = None


@dataclass
class MemorySink:
    """Keeps every evaluated path in memory (for the Python API without a store, and for tests)."""

    prompt_idx: int | None = None
    paths: list[EvaluatedPath] = field(default_factory=list)
    frontier: list[FrontierEntry] = field(default_factory=list)

    def root(self, node: Node) -> FrontierEntry:
        """Record the root path ``[FINAL]`` and return its frontier entry."""
        pid = len(self.paths)
        self.paths.append(
            EvaluatedPath(pid, None, (node,), None, "root", False, True, self.prompt_idx)
        )
        return FrontierEntry(pid, (node,), 0.0, None)

    def add(
        self,
        parent_id: int | None,
        parent: Path,
        nodes: Sequence[Node],
        scores: np.ndarray,
        methods: Sequence[str],
        complete: np.ndarray,
        kept: np.ndarray,
    ) -> np.ndarray:
        """Append the extensions of ``parent``; ids are positions in :attr:`paths`."""
        start = len(self.paths)
        sc, comp, kp = (
            np.asarray(scores, dtype=np.float64).tolist(),
            np.asarray(complete).tolist(),
            np.asarray(kept).tolist(),
        )
        self.paths.extend(
            EvaluatedPath(
                start + i,
                parent_id,
                (n, *parent),
                sc[i],
                methods[i],
                comp[i],
                kp[i],
                self.prompt_idx,
            )
            for i, n in enumerate(nodes)
        )
        return np.arange(start, start + len(nodes), dtype=np.int64)

    def mark_kept(self, path_ids: Sequence[int]) -> None:
        """Flip ``kept`` on already recorded paths (best-first pops, level-width selections)."""
        for pid in path_ids:
            self.paths[pid].kept = True

    def checkpoint(self, frontier: Sequence[FrontierEntry], *, final: bool = False) -> None:
        """Nothing to make durable in memory; remember the frontier for inspection."""
        self.frontier = list(frontier)

    @property
    def wants_checkpoint(self) -> bool:
        """Never: nothing is buffered for a store."""
        return False


class StoreSink:
    """Streams evaluated paths into a :class:`~pathdb.store.writer.RunWriter` (Arrow batches).

    ``store_level="kept"`` drops rows the pruning rule rejected (they are still counted as
    evaluated in the run's counters). Writes happen at checkpoints, atomically with the
    frontier, so an interrupted run resumes from its last checkpoint without duplicates; in
    between, rows wait in memory and the store file stays closed for other readers.
    """

    def __init__(
        self,
        writer: RunWriter,
        *,
        prompt_idx: int | None,
        store_level: str = "all",
        min_interval: float = 0.0,
    ) -> None:
        if store_level not in ("all", "kept"):
            raise ValueError(f"store level must be 'all' or 'kept' (got {store_level!r})")
        self.writer = writer
        self.prompt_idx = prompt_idx  # set per prompt group by the runner
        self.store_level = store_level
        self.min_interval = min_interval
        self.n_evaluated = 0
        self.n_complete = 0
        self.pending_kept: list[int] = []
        self.write_seconds = 0.0
        self._node_ids: dict[Node, int] = {}
        self._nids = ByTuple(self._node_array)  # a shared candidate tuple's ids, once
        # the frontier as committed in the store (a resumed run starts from the stored one)
        self._frontier_ids: set[int] = {int(i) for i in writer.frontier()[0]}
        self._latest: dict[int, float] | None = None  # a deferred final frontier, not yet committed
        self._last_flush = time.perf_counter()

    def _nid(self, node: Node) -> int:
        nid = self._node_ids.get(node)
        if nid is None:
            nid = self.writer.node_id(node)
            self._node_ids[node] = nid
        return nid

    def _node_array(self, nodes: Sequence[Node]) -> np.ndarray:
        """The run's node ids of ``nodes`` (read-only: a memoised array is shared)."""
        ids = np.fromiter(map(self._nid, nodes), dtype=np.int32, count=len(nodes))
        ids.flags.writeable = False
        return ids

    def root(self, node: Node) -> FrontierEntry:
        """Record the root ``[FINAL]`` row (depth 0) and return its frontier entry."""
        ids = self.writer.add_paths(
            parent_ids=np.array([-1], dtype=np.int64),
            node_ids=np.array([self._nid(node)], dtype=np.int32),
            depths=np.array([0], dtype=np.int16),
            prompt_idx=self.prompt_idx,
            contributions=np.array([np.nan]),
            methods=["root"],
            complete=np.array([False]),
            kept=np.array([True]),
        )
        return FrontierEntry(int(ids[0]), (node,), 0.0, None)

    def add(
        self,
        parent_id: int | None,
        parent: Path,
        nodes: Sequence[Node],
        scores: np.ndarray,
        methods: Sequence[str],
        complete: np.ndarray,
        kept: np.ndarray,
    ) -> np.ndarray:
        """Buffer the extensions of ``parent`` as one columnar batch; return their ids."""
        t0 = time.perf_counter()
        n = len(nodes)
        self.n_evaluated += n
        self.n_complete += int(complete.sum())
        if self.store_level == "all" or kept.all():  # every row stored: scalars broadcast
            ids = self.writer.add_paths(
                parent_ids=-1 if parent_id is None else parent_id,
                node_ids=self._nids(nodes),
                depths=len(parent),
                prompt_idx=self.prompt_idx,
                contributions=scores,
                methods=methods,
                complete=complete,
                kept=kept,
            )
            self.write_seconds += time.perf_counter() - t0
            return ids
        sel = kept.astype(bool)  # --store kept: rejected rows are counted, not stored
        self.writer.n_evaluated += int((~sel).sum())
        self.writer.n_complete += int((complete & ~sel).sum())
        ids = np.full(n, -1, dtype=np.int64)
        idx = [int(i) for i in np.flatnonzero(sel)]
        if idx:
            k = len(idx)
            ids[idx] = self.writer.add_paths(
                parent_ids=-1 if parent_id is None else parent_id,
                node_ids=np.fromiter((self._nid(nodes[i]) for i in idx), dtype=np.int32, count=k),
                depths=len(parent),
                prompt_idx=self.prompt_idx,
                contributions=np.asarray(scores, dtype=np.float64)[idx],
                methods=[methods[i] for i in idx],
                complete=np.asarray(complete, dtype=bool)[idx],
                kept=np.asarray(kept, dtype=bool)[idx],
            )
        self.write_seconds += time.perf_counter() - t0
        return ids

    @property
    def wants_checkpoint(self) -> bool:
        """The writer's memory buffer passed its bound: checkpoint early to keep memory bounded
        (the store is opened only at checkpoints, so rows wait in memory until then)."""
        return self.writer.buffered_rows >= self.writer.checkpoint_rows

    def mark_kept(self, path_ids: Sequence[int]) -> None:
        """Queue ``kept = true`` for recorded paths; applied at the next checkpoint."""
        self.pending_kept.extend(int(i) for i in path_ids if i >= 0)

    def checkpoint(self, frontier: Sequence[FrontierEntry], *, final: bool = False) -> None:
        """Commit buffered rows, kept flags and the frontier in one transaction.

        A prompt group's final checkpoint is deferred when the last commit is recent (per-prompt
        runs would otherwise commit once per prompt): it is committed, atomically with the rows,
        by the next checkpoint or by :meth:`commit` at the end of the run. Other checkpoints
        wait while the store rests (:meth:`~pathdb.store.db.Store.resting`) for readers.
        """
        self._latest = {e.path_id: e.score for e in frontier if e.path_id >= 0}
        if final and time.perf_counter() - self._last_flush < self.min_interval:
            return
        if not final and self.writer.store.resting():  # give waiting readers their turn
            return
        self.commit()

    def commit(self) -> None:
        """Flush everything recorded so far with the latest frontier (no-op when nothing is pending)."""
        if self._latest is None and not self.pending_kept and not self.writer.buffered_rows:
            return
        t0 = time.perf_counter()
        self.writer.flush(**self._changes())
        self._settled(t0)

    def finish(self, status: str, **kwargs: Any) -> None:
        """Commit what is pending and close the run with ``status`` in ONE transaction
        (:meth:`~pathdb.store.writer.RunWriter.finish` with ``kwargs``): the last checkpoint
        and the run's end, so a completed run costs one commit less than a flush then a finish."""
        t0 = time.perf_counter()
        self.writer.finish(status, **self._changes(), **kwargs)
        self._settled(t0)

    def _changes(self) -> dict[str, Any]:
        """The pending frontier and kept changes as :meth:`RunWriter.flush` arguments."""
        now = self._latest if self._latest is not None else {i: 0.0 for i in self._frontier_ids}
        added = [pid for pid in now if pid not in self._frontier_ids]
        removed = [pid for pid in self._frontier_ids if pid not in now]
        return {
            "frontier_add": (
                np.array(added, dtype=np.int64),
                np.array([now[p] for p in added], dtype=np.float64),
            ),
            "frontier_remove": np.array(removed, dtype=np.int64),
            "mark_kept": np.array(self.pending_kept, dtype=np.int64),
        }

    def _settled(self, t0: float) -> None:
        """After a commit begun at ``t0``: the committed frontier is the latest, nothing is
        pending, the time is counted."""
        if self._latest is not None:
            self._frontier_ids = set(self._latest)
        self._latest = None
        self.pending_kept = []
        self._last_flush = time.perf_counter()
        self.write_seconds += self._last_flush - t0
