"""Row-sparse start messages and shared first steps for the exact engine (issue 22).

Row sparsity: a non-positional start message ``[N, B, T, D]`` is exactly zero on every row where
the sender's clean and reference outputs agree (counterfactual patching: the rows before the first
changed token, and more). MLPs and query-side heads act row by row and a causal kv-side head only
changes query rows at or after its first changed source, so a message that carries only its
non-zero rows (:class:`search.node_functions.Msg` ``pos``) gives the same scores as the dense
message while every node computes only those rows. Candidates are split into a few groups by
their non-zero row set so one wide candidate does not widen all the others.

Shared steps: frontier paths ``(n, a, ...)`` and ``(n, b, ...)`` give the same candidates the
same message out of their common first node ``n``; :class:`StepCache` keeps that output (bounded
bytes, least recently used first out) so the second path starts at its second node.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import torch

from pathdb.graph import Node

from .activations import ActivationCache, take_rows
from .node_functions import Msg, span

MAX_ROW_SETS = 4  # more distinct row sets than this: coarser groups (fewer, wider tensor passes)


def row_sets(cache: ActivationCache) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero rows of every non-positional start message, as ``(set id per sender [n],
    sets [k, T])``: ``sets[id[i], r]`` is True where sender ``i``'s message is non-zero on row
    ``r`` (over prompts and d_model). Computed once per bank, dropped with it by ``release_banks``."""
    key = ("row_sets",)
    hit = cache.memo.get(key)
    if hit is None:
        mask = cache.bank(None).row_mask  # [n, T]
        sets, ids = np.unique(mask, axis=0, return_inverse=True)
        hit = {"ids": torch.from_numpy(ids.reshape(-1)), "sets": torch.from_numpy(sets)}
        cache.memo[key] = hit
    return hit["ids"].numpy(), hit["sets"].numpy()


def split_by_rows(ids: np.ndarray, sets: np.ndarray) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """Split candidates with row-set ids ``ids`` (rows of ``sets [k, T]``) into groups sharing a
    row set: ``(candidate indices, rows carried)``. Exactly equal row sets first; past
    :data:`MAX_ROW_SETS` of them, groups by first non-zero row carrying their union; past that
    again, one group carrying the union of all."""
    if len(ids) and (ids == ids[0]).all():
        return [(np.arange(len(ids)), tuple(int(r) for r in np.flatnonzero(sets[ids[0]])))]
    used, inverse = np.unique(ids, return_inverse=True)
    uniq = sets[used]
    if len(uniq) > MAX_ROW_SETS:
        keys, group = np.unique(uniq.argmax(axis=1), return_inverse=True)
        uniq = np.stack([uniq[group == i].any(axis=0) for i in range(len(keys))])
        inverse = group[inverse]
        if len(uniq) > MAX_ROW_SETS:
            uniq, inverse = uniq.any(axis=0, keepdims=True), np.zeros(len(ids), dtype=np.int64)
    out = []
    for i, rows in enumerate(uniq):
        idx = np.flatnonzero(inverse == i)
        out.append((idx, tuple(int(r) for r in np.flatnonzero(rows))))
    return out


def row_messages(cache: ActivationCache, bank_rows: np.ndarray, pos: tuple[int, ...]) -> Msg:
    """Non-positional start messages of bank rows ``bank_rows`` carrying only residual rows ``pos``
    (a zero-copy bank slice when they are a contiguous run of senders and rows; otherwise only
    the carried rows are copied)."""
    m = cache.bank(None).messages
    sel = span(pos) if len(pos) < cache.seq_len else slice(None)
    if isinstance(sel, slice):  # a view of the bank: only the rows taken are copied
        return Msg(take_rows(m[:, :, sel], bank_rows), pos)
    return Msg(take_rows(m, bank_rows)[:, :, sel], pos)


class StepCache:
    """First-step outputs keyed by (first node, candidate batch), least recently used evicted
    first once their bytes pass ``budget``; entries above a quarter of it are not kept."""

    def __init__(self, budget: int) -> None:
        """An empty cache holding at most ``budget`` bytes of messages."""
        self.budget = budget
        self.used = 0
        self.hits = 0
        self._entries: OrderedDict[Hashable, Msg] = OrderedDict()

    @staticmethod
    def key(
        node: Node,
        position: int | None,
        bank_rows: np.ndarray,
        pos: tuple[int, ...],
        want: tuple[int, ...],
    ) -> Hashable:
        """The key of ``node``'s output rows ``want`` for the candidates at ``bank_rows`` carrying
        rows ``pos``."""
        return (node, position, bank_rows.tobytes(), pos, want)

    def fits(self, nbytes: int) -> bool:
        """Would an output of ``nbytes`` be kept?"""
        return 4 * nbytes <= self.budget

    def get(self, key: Hashable) -> Msg | None:
        """The cached output, or None."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return hit

    def put(self, key: Hashable, msg: Msg) -> None:
        """Keep ``msg`` (if it fits), evicting the least recently used entries."""
        size = _nbytes(msg)
        if not self.fits(size):
            return
        while self._entries and self.used + size > self.budget:
            _, old = self._entries.popitem(last=False)
            self.used -= _nbytes(old)
        self._entries[key] = msg
        self.used += size


def _nbytes(msg: Msg) -> int:
    return msg.rows.numel() * msg.rows.element_size()


def concat(parts: list[Msg]) -> Msg:
    """Chunk outputs (same rows) as one message batch."""
    if len(parts) == 1:
        return parts[0]
    return Msg(torch.cat([p.rows for p in parts]), parts[0].pos)
