"""Bounded memo helpers of the search engine: a count-bounded LRU map (:class:`Recent`) and a
memo keyed by the identity of shared candidate tuples (:class:`ByTuple`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from pathdb.graph import Node

MAX_TUPLES = 4096  # candidate tuples a search (and each memo of them) keeps

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A map holding at most ``size`` entries, the least recently used evicted first: the
    per-path gradients and the nodes' forward graphs of :mod:`search.attribution` (bounded by
    count, where :class:`~search.sparse_rows.StepCache` bounds messages by bytes)."""

    def __init__(self, size: int) -> None:
        """An empty map for at most ``size`` entries."""
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The entry of ``key`` (now the most recently used), or None."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` as the most recently used entry, evicting past ``size``."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        """Remove and return the entry of ``key``, or None."""
        return self._entries.pop(key, None)


T = TypeVar("T")


class ByTuple(Generic[T]):
    """``compute(nodes)`` memoised by the identity of a tuple ``nodes`` (a search hands the same
    candidate tuple for every path with the same start:
    :meth:`search.strategies.SearchRun.candidates`), so per-node work is done once per tuple.
    Holding the tuple keeps its id from being reused; the :data:`MAX_TUPLES` most recent are
    kept. Other sequences are computed every time."""

    def __init__(self, compute: Callable[[Sequence[Node]], T]) -> None:
        """A memo of ``compute``."""
        self.compute = compute
        self._memo: dict[int, tuple[tuple[Node, ...], T]] = {}

    def __call__(self, nodes: Sequence[Node]) -> T:
        if not isinstance(nodes, tuple):
            return self.compute(nodes)
        hit = self._memo.get(id(nodes))
        if hit is not None:
            return hit[1]
        value = self.compute(nodes)
        if len(self._memo) >= MAX_TUPLES:
            self._memo.pop(next(iter(self._memo)))
        self._memo[id(nodes)] = (nodes, value)
        return value
