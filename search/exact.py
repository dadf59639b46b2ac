"""Exact path message patching, batched over candidates.

``expand(path, candidates)`` stacks the start messages of all candidates (one bank slice per
output position), pushes the whole stack through the path's nodes with the node functions of
:mod:`search.node_functions` (candidates on the leading axis) and applies the metric to
``clean_final[root] - m``. Every tensor operation is independent along the candidate axis, so the
result equals scoring each candidate alone; the candidate axis is chunked to bound memory.
Non-positional messages carry only their non-zero rows, and the first node's output is shared by
frontier paths that start with the same node (:mod:`search.sparse_rows`); rows the rest of a path
never reads are dropped before each step (:func:`search.node_functions.needed_rows`), candidates
with the same start message are computed once, and ``expand_many`` / ``prefetch`` take a search
level at once so frontier paths sharing a prefix share its steps and those sharing a first node
share its candidate plan (index work, memoised). All exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pathdb.graph import GraphError, Node, NodeKind, Path, feeds
from pathdb.metrics import Metric, Readout, get_metric

from .activations import ActivationCache, take_rows
from .evaluator import EXACT, ExtensionPaths, Scores
from .node_functions import Msg, needed_rows, propagate, read_rows, root_row, step
from .sparse_rows import StepCache, concat, row_messages, row_sets, split_by_rows


def build_metric(
    cache: ActivationCache,
    metric: str | Callable[..., Metric],
    root: Node,
    target: Tensor | list[int] | None = None,
    cf_target: Tensor | list[int] | None = None,
) -> Metric:
    """Instantiate a metric (registry name or factory ``(readout, clean_row, target, cf_target)``)
    on the clean final residual at ``root``'s row."""
    factory: Callable[..., Metric] = get_metric(metric) if isinstance(metric, str) else metric
    clean_row = cache.clean.final[:, root_row(root, cache.seq_len)]
    return factory(Readout(cache.weights.model), clean_row, target, cf_target)


def validate_extension(
    cache: ActivationCache, path: Sequence[Node], candidates: Sequence[Node]
) -> Path:
    """Check ``path`` and that every candidate feeds its first node; return the path as a tuple."""
    p = tuple(path)
    cache.shape.validate_path(p)
    validate_candidates(cache, p[0], candidates)
    return p


def validate_candidates(cache: ActivationCache, receiver: Node, candidates: Sequence[Node]) -> None:
    """Check node by node that every candidate is a sender feeding ``receiver`` (clear errors)."""
    for c in candidates:
        cache.shape.validate(c)
        if c.kind is NodeKind.FINAL:
            raise GraphError(f"{c.label}: FINAL cannot be prepended to a path")
        if not feeds(c, receiver, parallel=cache.shape.parallel):
            raise GraphError(f"candidate {c.label} does not feed {receiver.label}")


def group_by_position(candidates: Sequence[Node]) -> dict[int | None, list[int]]:
    """Indices of the candidates grouped by the position they write at (one bank per group)."""
    groups: dict[int | None, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(c.position, []).append(i)
    return groups


@dataclass
class Group:
    """Candidates writing at one position: their indices in the candidate list and bank rows."""

    position: int | None
    index: np.ndarray | None  # None: all candidates, in order
    rows: np.ndarray

    def messages(self, cache: ActivationCache) -> Msg:
        """Start messages of the group's candidates as one :class:`Msg` (a bank slice when contiguous)."""
        m = take_rows(cache.bank(self.position).messages, self.rows)
        if self.position is None:
            return Msg(m, tuple(range(cache.seq_len)))
        return Msg(m[:, :, None], (self.position,))


_SMALL = 8  # below this many candidates a plain Python loop beats NumPy's per-call overhead
_NONE = -(2**40)  # stands for None in the integer columns
_KIND = {NodeKind.EMBED: 0, NodeKind.ATTN: 1, NodeKind.MLP: 2, NodeKind.FINAL: 3}


def _plan_small(cache: ActivationCache, receiver: Node, candidates: Sequence[Node]) -> list[Group]:
    """:func:`plan_extension` for a handful of candidates, node by node."""
    validate_candidates(cache, receiver, candidates)
    by_pos: dict[int | None, list[int]] = {}
    for i, c in enumerate(candidates):
        by_pos.setdefault(c.position, []).append(i)
    single = len(by_pos) == 1
    groups: list[Group] = []
    for position, idx in by_pos.items():
        bank = cache.bank(position)
        rows = np.array([bank.index(candidates[i]) for i in idx], dtype=np.int64)
        groups.append(Group(position, None if single else np.array(idx, dtype=np.int64), rows))
    return groups


def plan_extension(
    cache: ActivationCache, receiver: Node, candidates: Sequence[Node]
) -> list[Group]:
    """Validate that every candidate is a sender feeding ``receiver`` and compute its bank row,
    vectorised over the candidates (a few list comprehensions, then NumPy). Invalid input is
    re-checked node by node so the error names the offending candidate."""
    if len(candidates) <= _SMALL:
        return _plan_small(cache, receiver, candidates)
    shape = cache.shape
    kind = np.array([_KIND[c.kind] for c in candidates], dtype=np.int64)
    layer = np.array([c.layer for c in candidates], dtype=np.int64)
    head = np.array([_NONE if c.head is None else c.head for c in candidates], dtype=np.int64)
    site_ok = np.array([c.site is not None or c.kind is not NodeKind.ATTN for c in candidates])
    pos = np.array(
        [_NONE if c.position is None else c.position for c in candidates], dtype=np.int64
    )
    kv = np.array(
        [_NONE if c.kv_position is None else c.kv_position for c in candidates], dtype=np.int64
    )
    is_kv = np.array([c.is_kv for c in candidates])
    L, H, T = shape.n_layers, shape.n_heads, shape.n_positions
    attn = kind == 1
    has_kv = kv != _NONE
    # node rules (ModelShape.validate)
    ok = (kind <= 2) & site_ok & ((head == _NONE) | ((head >= 0) & (head < H)))
    ok &= (pos == _NONE) | ((pos >= 0) & (pos < T))
    ok &= np.where(kind == 2, (layer >= 0) & (layer < L), True)
    ok &= np.where(attn, (layer >= 0) & (layer < L), True)
    ok &= np.where(attn & has_kv, (pos != _NONE) & (kv >= 0) & (kv <= pos), True)
    # edge rule (pathdb.graph.feeds) against the fixed receiver
    r = receiver
    if r.kind is NodeKind.EMBED:
        ok &= False
    elif r.kind is not NodeKind.FINAL:
        same = (layer == r.layer) & attn & (r.kind is NodeKind.MLP) & (not shape.parallel)
        ok &= (kind == 0) | (layer < r.layer) | same
    read = r.read_position
    if r.position is None:
        ok &= pos == _NONE
    elif read is None:
        ok &= (pos >= 0) & (pos <= r.position)
    else:
        ok &= pos == read
    if not bool(ok.all()):
        validate_candidates(cache, r, candidates)  # raises, naming the candidate
        raise GraphError(f"invalid candidates for {r.label}")
    groups: list[Group] = []
    head = np.where(head == _NONE, -1, head)
    kv = np.where(attn & is_kv & has_kv, kv, -1)
    layer = np.maximum(layer, 0)
    uniq = np.unique(pos)
    for u in uniq.tolist():
        position = None if u == _NONE else int(u)
        bank = cache.bank(position)
        if len(uniq) == 1:
            groups.append(Group(position, None, bank.rows(kind, layer, head, kv)))
        else:
            idx = np.flatnonzero(pos == u)
            groups.append(
                Group(position, idx, bank.rows(kind[idx], layer[idx], head[idx], kv[idx]))
            )
    return groups


Index = np.ndarray | slice | None  # rows of a score buffer: an index array, a range, or all
# ExactEvaluator._batch_plan's batches and ExactEvaluator.plan's groups
_Batch = tuple[np.ndarray | None, np.ndarray, tuple[int, ...] | None]
_Planned = tuple[int | None, np.ndarray | None, Tensor | None, int, list[_Batch]]
_MAX_PLANS = 4096  # planned candidate lists kept per evaluator (index arrays only)


@dataclass
class _Unit:
    """Start messages of some candidates on their way through the rest of a path: their scores
    go to ``buf`` at ``index`` (None: all of it)."""

    buf: Tensor
    index: Index
    msg: Msg
    rest: Path
    needs: list[tuple[tuple[int, ...], tuple[int, ...]]]  # needed_rows(rest): suffixes slice it
    position: int | None = None  # the candidates' write position (chunk sizing)
    lineage: Hashable = None  # equal for batches carrying equal messages (same start, same steps)


def _order(node: Node) -> tuple[int, int]:
    """Position of ``node`` in the model's computation order (attention before the MLP of a
    layer, FINAL last): every path visits its nodes in increasing order."""
    return node.layer, {NodeKind.ATTN: 0, NodeKind.MLP: 1}.get(node.kind, 2)


def _write(buf: Tensor, index: Index, res: Tensor) -> None:
    """``buf[index] = res`` (all of ``buf`` when ``index`` is None; ``res`` may broadcast)."""
    if index is None:
        buf.copy_(res)
    elif isinstance(index, slice):
        buf[index] = res.to(buf.dtype)
    else:
        buf[torch.from_numpy(index).to(buf.device)] = res.to(buf.dtype)


def _sub_index(index: Index, a: int, k: int, n: int) -> Index:
    """The part of ``index`` (over ``n`` rows) for rows ``a .. a + k``."""
    if index is None:
        return None if (a, k) == (0, n) else slice(a, a + k)
    if isinstance(index, slice):
        return slice(index.start + a, index.start + a + k)
    return index[a : a + k]


class ExactEvaluator:
    """Path message patching (exact), all candidates of a frontier path in one batched pass."""

    method = EXACT
    # internal switch (tests, benchmarks): True runs the dense engine of before issue 22 (every
    # row of a non-positional message, no shared first steps, chunks sized by intermediates only)
    dense: bool = False

    def __init__(
        self,
        cache: ActivationCache,
        metric: Metric,
        root: Node,
        *,
        memory_budget: int = 256 * 2**20,
        chunk_bytes: int = 2 * 2**20,
        share_steps: bool = True,
    ) -> None:
        """``metric`` must be built on ``root``'s clean row (see :func:`build_metric`);
        ``chunk_bytes`` sizes candidate chunks for the CPU cache, ``memory_budget`` bounds memory;
        ``share_steps`` keeps first-step outputs for frontier paths sharing their first node."""
        if root.kind is not NodeKind.FINAL:
            raise GraphError(f"the root must be a FINAL node, got {root.label}")
        cache.shape.validate(root)
        self.cache = cache
        self.metric = metric
        self.root = root
        self.root_row = root_row(root, cache.seq_len)
        self.memory_budget = memory_budget
        self.chunk_bytes = chunk_bytes
        self._clean_row = cache.clean.final[:, self.root_row]
        self._valid_paths: set[Path] = set()
        self._clean: Tensor | None = None
        self.share_steps = share_steps
        self.steps = StepCache(memory_budget // 2)
        self._needed: dict[Path, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._prefetched: dict[tuple[Path, tuple[Node, ...]], Scores] = {}
        self._plans: dict[Hashable, list[_Planned]] = {}

    @classmethod
    def create(
        cls,
        model: Any,
        tokens: Tensor,
        *,
        cf_tokens: Tensor | None = None,
        patch_type: str = "counterfactual",
        metric: str | Callable[..., Metric] = "logit_difference",
        target: Tensor | list[int] | None = None,
        cf_target: Tensor | list[int] | None = None,
        root_position: int | None = None,
    ) -> ExactEvaluator:
        """Cache activations, build the metric and the evaluator in one call."""
        cache = ActivationCache.build(model, tokens, cf_tokens, patch_type)
        pos = cache.seq_len - 1 if root_position is None else root_position
        root = Node.final(cache.shape.n_layers, pos)
        return cls(cache, build_metric(cache, metric, root, target, cf_target), root)

    def baseline(self) -> float:
        """Batch-mean metric on the clean run."""
        with torch.no_grad():
            return float(self.metric(self._clean_row).mean())

    def release(self, path: Sequence[Node]) -> None:
        """No per-path state is kept by the exact evaluator."""

    def _chunk_size(self, nodes: Sequence[Node], rows: int) -> int:
        """Candidates per chunk of a pass through ``nodes`` with messages of ``rows`` rows: the
        widest per-candidate intermediate times the chunk stays within ``chunk_bytes``
        (cache-sized: fused passes over a chunk stay in L2/L3) or within a quarter of the nodes'
        weight bytes when those are larger (each chunk re-reads the weights: wide MLPs want
        bigger chunks), and the whole working set within ``memory_budget``."""
        c = self.cache
        w = c.weights
        cfg = w.cfg
        width = cfg.d_model
        if any(n.kind is NodeKind.MLP for n in nodes):
            width = max(width, cfg.d_mlp or 0)
        if any(n.kind is NodeKind.ATTN for n in nodes):
            width = max(width, w.n_heads * c.seq_len)
        per = c.batch * max(1, rows) * width * c.clean.final.element_size()
        if c.device.type != "cpu":  # no CPU cache to fit: the largest pass the budget allows
            return max(1, self.memory_budget // (6 * per))
        target = (
            self.chunk_bytes
            if self.dense
            else max(self.chunk_bytes, self._weight_bytes(nodes) // 4)
        )
        return max(1, min(target // per, self.memory_budget // (6 * per)))

    def _rows(self, path: Path, carried: tuple[int, ...]) -> int:
        """Rows of the widest message of ``path`` for start messages carrying rows ``carried``:
        messages never reach rows before their first one, nor rows the path does not read."""
        first = carried[0] if carried else 0
        return max(1, *(sum(r >= first for r in rs) for need in self._needs(path) for rs in need))

    def _dense_rows(self, path: Path, group_pos: int | None, carried: tuple[int, ...]) -> int:
        """Rows the dense engine sizes its chunks by: every row from the first carried one on
        when the group or a node of ``path`` is non-positional (or a kv node over all sources)."""
        wide = group_pos is None or any(
            n.position is None or (n.kind is NodeKind.ATTN and n.is_kv and n.kv_position is None)
            for n in path
        )
        first_row = carried[0] if group_pos is None and carried else 0
        return self.cache.seq_len - first_row if wide else 1

    def _weight_bytes(self, nodes: Sequence[Node]) -> int:
        """Bytes of the weight matrices ``nodes`` multiply by (read once per chunk)."""
        cfg = self.cache.weights.cfg
        D = cfg.d_model
        total = 0
        for n in nodes:
            if n.kind is NodeKind.MLP:
                total += (3 if cfg.gated_mlp else 2) * D * (cfg.d_mlp or 0)
            elif n.kind is NodeKind.ATTN:
                total += 4 * D * cfg.d_head * (cfg.n_heads if n.head is None else 1)
        return total * self.cache.clean.final.element_size()

    def message_batch(self, path: Path, start: Msg) -> Tensor:
        """Per-prompt scores ``[N, B]`` of a start-message batch entering ``path[0]``."""
        out = propagate(
            start, path, self.cache, demand=not self.dense
        )  # ends at FINAL: the root row
        patched = self._clean_row - out.gather((self.root_row,))[:, :, 0]
        return self.metric(patched)

    def message_scores(self, path: Path, start: Msg) -> Tensor:
        """:meth:`message_batch` in chunks sized by this evaluator's rule (:meth:`_chunk_size`, as
        :meth:`expand` sizes a frontier path's), so any number of messages fits the memory budget."""
        rows = (
            self._dense_rows(path, None, start.pos) if self.dense else self._rows(path, start.pos)
        )
        size = self._chunk_size(path, rows)
        return torch.cat([self.message_batch(path, ch) for ch in start.chunk(size)])

    def checked_path(self, path: Sequence[Node]) -> Path:
        """``path`` as a tuple, validated (once per distinct path: the check is memoised)."""
        p = tuple(path)
        if p not in self._valid_paths:
            self.cache.shape.validate_path(p)
            self._check_root(p)
            if len(self._valid_paths) > 100_000:
                self._valid_paths.clear()
            self._valid_paths.add(p)
        return p

    def expand(self, path: Sequence[Node], candidates: Sequence[Node]) -> Scores:
        """Exact scores of ``(c, *path)`` for every candidate ``c`` (one copy to the host), or
        the result :meth:`prefetch` kept for exactly this path and candidate list."""
        if self._prefetched:
            hit = self._prefetched.pop((tuple(path), tuple(candidates)), None)
            if hit is not None:
                return hit
        return self.expand_many([(path, candidates)], batched=False)[0]

    def prefetch(self, items: Sequence[tuple[Sequence[Node], Sequence[Node]]]) -> None:
        """Score several frontier paths' extensions in shared passes (:meth:`expand_many`) and
        keep each result for the one :meth:`expand` call asking for exactly that path and
        candidate list (a search level handed over at once; results not asked for are dropped
        by the next ``prefetch``)."""
        todo = [(self.checked_path(p), list(c)) for p, c in items]
        scores = self.expand_many(todo)
        self._prefetched = {(p, tuple(c)): s for (p, c), s in zip(todo, scores, strict=True)}

    def expand_many(
        self, items: Sequence[tuple[Sequence[Node], Sequence[Node]]], *, batched: bool = True
    ) -> list[Scores]:
        """:meth:`expand` of several frontier paths at once (a search level): node by node over
        all of them, so frontier paths sharing a prefix share its steps (``batched=False``: each
        path alone, chunk by chunk through the whole path). Every operation acts candidate by
        candidate, so each result equals :meth:`expand` of its path alone up to float rounding,
        and the same path scores the same bits in any level (chunks never mix paths)."""
        paths = [self.checked_path(p) for p, _ in items]
        outs = self._expand_all([(p, c) for p, (_, c) in zip(paths, items, strict=True)], batched)
        return [
            Scores(ExtensionPaths(c, p), o.cpu(), [EXACT] * len(c))
            for p, (_, c), o in zip(paths, items, outs, strict=True)
        ]

    def expand_on_device(self, path: Sequence[Node], candidates: Sequence[Node]) -> Tensor:
        """Per-prompt exact scores ``[n, B]`` of ``(c, *path)``, left on the cache's device
        (nothing is read back to the host)."""
        return self._expand_all([(self.checked_path(path), candidates)], batched=False)[0]

    def _expand_all(self, items: list[tuple[Path, Sequence[Node]]], batched: bool) -> list[Tensor]:
        """Scores ``[n_i, B]`` of every item's candidates, on the device. Items are taken in
        slices whose messages fit a quarter of ``memory_budget`` (one item's candidate list is
        split when it alone does not): a slice's messages all exist at once, node by node."""
        B, dev, dtype = self.cache.batch, self.cache.device, self._clean_row.dtype
        outs = [torch.empty(len(c), B, dtype=dtype, device=dev) for _, c in items]
        cap = self.memory_budget // 4
        work: list[tuple[Path, Sequence[Node], Tensor]] = []
        used = 0
        with torch.inference_mode():
            for (p, cands), out in zip(items, outs, strict=True):
                per = self._message_bytes(p)
                step_n = max(1, cap // per)
                for a in range(0, len(cands), step_n):
                    piece = cands[a : a + step_n]
                    if work and used + per * len(piece) > cap:
                        self._expand_slice(work, batched)
                        work, used = [], 0
                    work.append((p, piece, out[a : a + step_n]))
                    used += per * len(piece)
            if work:
                self._expand_slice(work, batched)
        return outs

    def _message_bytes(self, path: Path) -> int:
        """Bytes of one candidate's widest message along ``path`` (rows it can carry)."""
        rows = max(1, *(len(rs) for need in self._needs(path) for rs in need))
        c = self.cache
        return c.batch * rows * c.weights.cfg.d_model * c.clean.final.element_size()

    def _needs(self, path: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """:func:`needed_rows` of ``path`` (memoised per path)."""
        hit = self._needed.get(path)
        if hit is None:
            if len(self._needed) > 100_000:
                self._needed.clear()
            hit = self._needed[path] = needed_rows(path, self.cache.seq_len)
        return hit

    def _expand_slice(self, work: list[tuple[Path, Sequence[Node], Tensor]], batched: bool) -> None:
        """Fill each ``out`` with the scores of its candidates: plan, drop repeated start
        messages, split by carried rows, then push every batch through its path: node by node
        over all paths (``batched``, :meth:`_run`) or chunk by chunk through one path."""
        units: list[_Unit] = []
        assemble: list[tuple[Tensor, np.ndarray | None, Tensor | None, Tensor]] = []
        for p, cands, out in work:
            if not len(cands):
                continue
            for position, gindex, inverse, n_rows, batches in self.plan(p, cands):
                buf = out
                if gindex is not None or inverse is not None:
                    buf = out.new_empty(n_rows, out.shape[1])
                    assemble.append((out, gindex, inverse, buf))
                for index, bank_rows, pos in batches:
                    if pos is None:
                        _write(buf, index, self._clean_rows())
                    else:
                        msg = self.messages(position, bank_rows, pos)
                        unit = _Unit(buf, index, msg, p, self._needs(p))
                        units.append(self._start(p, position, bank_rows, unit))
        if self.dense or not batched:  # one frontier path: each chunk through the whole path
            for u in units:
                nrows = (
                    self._dense_rows(u.rest, u.position, u.msg.pos)
                    if self.dense
                    else self._rows(u.rest, u.msg.pos)
                )
                parts = [
                    self.message_batch(u.rest, ch)
                    for ch in u.msg.chunk(self._chunk_size(u.rest, nrows))
                ]
                _write(u.buf, u.index, parts[0] if len(parts) == 1 else torch.cat(parts))
        else:
            self._run(units)
        for out, index, inverse, buf in assemble:
            _write(out, index, buf if inverse is None else buf[inverse])

    def plan(self, path: Path, candidates: Sequence[Node], distinct: bool = True) -> list[_Planned]:
        """Per write-position group of ``candidates`` extending ``path``: ``(position, indices in
        the candidate list (None: all), inverse of the repeated bank rows dropped (None: none),
        rows planned, batches (:meth:`_batch_plan`))``. Index work only, memoised on the first
        node, the input rows the path reads there and the candidate list: frontier paths sharing
        their first node plan once (the candidates were validated the first time). Repeated bank
        rows are planned once only when ``distinct`` (attribution keeps them: its matrix-vector
        scores of fewer rows would differ in the last float32 bits)."""
        key = (path[0], self._needs(path)[0][0], tuple(candidates), self.dense, distinct)
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        hit = []
        dev = self.cache.device
        for planned in plan_extension(self.cache, path[0], candidates):
            rows, inverse = planned.rows, None
            if distinct and not self.dense:
                uniq, inv = np.unique(rows, return_inverse=True)
                if len(uniq) < len(rows):
                    rows, inverse = uniq, torch.from_numpy(inv.reshape(-1)).to(dev)
            batches = self._batch_plan(path, planned.position, rows)
            hit.append((planned.position, planned.index, inverse, len(rows), batches))
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = hit
        return hit

    def _start(self, path: Path, position: int | None, bank_rows: np.ndarray, unit: _Unit) -> _Unit:
        """``unit`` (a batch of start messages) with its lineage, past the path's first node when
        that output is (or is kept) in the step cache: frontier paths sharing their first node
        share it across calls."""
        msg = unit.msg
        unit.position = position
        unit.lineage = (position, bank_rows.tobytes(), msg.pos)
        nbytes = msg.rows.numel() * msg.rows.element_size()
        if self.dense or not self.share_steps or len(path) < 3 or not self.steps.fits(nbytes):
            return unit
        need, want = unit.needs[0]
        msg = msg.restrict(need)
        if not msg.pos:
            return unit
        key = StepCache.key(path[0], position, bank_rows, msg.pos, want)
        first = self.steps.get(key)
        if first is None:
            size = self._chunk_size(path[:1], max(len(msg.pos), len(want)))
            first = concat([step(path[0], ch, self.cache, want) for ch in msg.chunk(size)])
            self.steps.put(key, first)
        lineage = (unit.lineage, path[0], want)
        return _Unit(unit.buf, unit.index, first, path[1:], unit.needs[1:], position, lineage)

    def _run(self, units: list[_Unit]) -> None:
        """Push message batches through the rest of their paths, node by node in the model's
        order: batches with the same lineage (same candidates, same nodes so far: frontier paths
        sharing a prefix) carry the same messages, so each step is computed once for them. Each
        batch goes in chunks whose size depends only on the node and its rows, never on the
        other batches, so a path scores the same bits whatever else is in the level (a resumed
        search gives the uninterrupted result)."""
        pending: dict[
            tuple[tuple[int, int], Node, tuple[int, ...], tuple[int, ...]], list[_Unit]
        ] = {}
        lineages = itertools.count()  # a child batch's lineage: one id per (batch group, chunk)

        def add(u: _Unit) -> None:
            need, want = u.needs[0]
            u.msg = u.msg.restrict(need)
            if not u.msg.pos:  # zero on every row the rest reads: the clean score
                _write(u.buf, u.index, self._clean_rows())
            else:
                n = u.rest[0]
                pending.setdefault((_order(n), n, want, u.msg.pos), []).append(u)

        for u in units:
            add(u)
        while pending:
            key = min(pending, key=lambda k: k[0])
            _, node, want, pos = key
            same: dict[Hashable, list[_Unit]] = {}
            for u in pending.pop(key):
                same.setdefault(u.lineage, []).append(u)
            size = self._chunk_size((node,), max(len(pos), len(want)))
            final = node.kind is NodeKind.FINAL
            for us in same.values():
                n_msg = us[0].msg.n
                for a, rows in zip(range(0, n_msg, size), us[0].msg.rows.split(size), strict=True):
                    k = rows.shape[0]
                    if final:  # the metric on the root row
                        res = self.metric(
                            self._clean_row - Msg(rows, pos).gather((self.root_row,))[:, :, 0]
                        )
                        for u in us:
                            _write(u.buf, _sub_index(u.index, a, k, n_msg), res)
                        continue
                    stepped = step(node, Msg(rows, pos), self.cache, want)
                    lineage = next(lineages)  # the same messages for every batch of ``us``
                    for u in us:
                        index = _sub_index(u.index, a, k, n_msg)
                        add(
                            _Unit(
                                u.buf, index, stepped, u.rest[1:], u.needs[1:], u.position, lineage
                            )
                        )

    def messages(self, position: int | None, bank_rows: np.ndarray, pos: tuple[int, ...]) -> Msg:
        """Start messages of bank rows ``bank_rows`` carrying residual rows ``pos``."""
        if position is not None or len(pos) == self.cache.seq_len:
            return Group(position, None, bank_rows).messages(self.cache)
        return row_messages(self.cache, bank_rows, pos)

    def _batch_plan(
        self, path: Path, position: int | None, bank_rows: np.ndarray
    ) -> list[tuple[np.ndarray | None, np.ndarray, tuple[int, ...] | None]]:
        """``(indices into bank_rows (None: all), their bank rows, rows their start messages carry,
        or None where they are zero on every row ``path`` reads)``: one batch, or for a
        non-positional group one per set of non-zero rows among those read, each message carrying
        only those rows (:mod:`search.sparse_rows`); rows the path never reads are dropped (exact)."""
        cache = self.cache
        every = (position,) if position is not None else tuple(range(cache.seq_len))
        if self.dense:
            return [(None, bank_rows, every)]
        if position is None:
            ids, sets = row_sets(cache)
            read = np.zeros(cache.seq_len, dtype=bool)
            read[list(self._needs(path)[0][0])] = True
            sets = sets & read
            live: np.ndarray = np.asarray(sets.any(axis=1))[ids[bank_rows]]
        else:
            live = cache.bank(position).nonzero[bank_rows]  # host mask, read once per bank
        out: list[tuple[np.ndarray | None, np.ndarray, tuple[int, ...] | None]] = []
        idx: np.ndarray | None = None
        if not live.all():
            out.append((np.flatnonzero(~live), bank_rows[~live], None))
            idx = np.flatnonzero(live)
            bank_rows = bank_rows[idx]
            if not len(idx):
                return out
        if position is not None:
            out.append((idx, bank_rows, every))
            return out
        parts = split_by_rows(ids[bank_rows], sets)
        for i, pos in parts:
            sub = None if len(parts) == 1 and idx is None else (i if idx is None else idx[i])
            rows = bank_rows if len(parts) == 1 else bank_rows[i]
            out.append((sub, rows, pos))
        return out

    def score_paths(self, paths: Sequence[Sequence[Node]]) -> Scores:
        """Exact scores of paths, batched by shared tail ``path[1:]``."""
        return score_by_tail(self, paths, self._clean_scores)

    def _clean_rows(self) -> Tensor:
        """Per-prompt metric of the clean run ``[B]`` on the cache's device (computed once)."""
        if self._clean is None:
            with torch.inference_mode(False), torch.no_grad():
                self._clean = self.metric(self._clean_row).detach()
        return self._clean

    def _clean_scores(self, n: int) -> Tensor:
        """``n`` copies of the clean per-prompt scores on the host, ``[n, B]``."""
        return self._clean_rows().cpu().expand(n, -1).clone()

    def _check_root(self, path: Path) -> None:
        if path[-1] != self.root:
            raise GraphError(
                f"path ends at {path[-1].label} but this evaluator's root is {self.root.label}"
            )

    def gradient_rows(self, node: Node) -> tuple[int, ...]:
        """Input rows of ``node`` (support of gradients / messages entering it)."""
        return read_rows(node, self.cache.seq_len)


def score_by_tail(
    ev: Any, paths: Sequence[Sequence[Node]], clean_scores: Callable[[int], Tensor]
) -> Scores:
    """Score paths by grouping them on their tail and calling ``ev.expand(tail, heads)`` once per tail."""
    tuples = [tuple(p) for p in paths]
    B = ev.cache.batch
    out = torch.empty(len(tuples), B)
    methods = [""] * len(tuples)
    groups: dict[Path, list[int]] = {}
    bare: list[int] = []
    for i, p in enumerate(tuples):
        if len(p) == 0:
            raise GraphError("cannot score an empty path")
        if len(p) == 1:
            bare.append(i)
        else:
            groups.setdefault(p[1:], []).append(i)
    for i in bare:
        ev.cache.shape.validate_path(tuples[i])
        ev._check_root(tuples[i])
        out[i] = clean_scores(1)[0]
        methods[i] = EXACT
    for tail, idx in groups.items():
        s = ev.expand(tail, [tuples[i][0] for i in idx])
        out = out.to(s.per_prompt.dtype)
        out[torch.tensor(idx)] = s.per_prompt
        for j, i in enumerate(idx):
            methods[i] = s.methods[j]
    return Scores(list(tuples), out, methods)
