"""Exact path message patching, batched over candidates.

``expand(path, candidates)`` stacks the start messages of all candidates (one bank slice per
output position), pushes the whole stack through the path's nodes with the node functions of
:mod:`search.node_functions` (candidates on the leading axis) and applies the metric to
``clean_final[root] - m``. Every tensor operation is independent along the candidate axis, so the
result equals scoring each candidate alone; the candidate axis is chunked to bound memory.
Non-positional messages carry only their non-zero rows, and the first node's output is shared by
frontier paths that start with the same node (:mod:`search.sparse_rows`); both are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pathdb.graph import GraphError, Node, NodeKind, Path, feeds
from pathdb.metrics import Metric, Readout, get_metric

from .activations import ActivationCache, take_rows
from .evaluator import EXACT, ExtensionPaths, Scores
from .node_functions import Msg, propagate, read_rows, root_row, step
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


def validate_extension(cache: ActivationCache, path: Sequence[Node], candidates: Sequence[Node]) -> Path:
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


def plan_extension(cache: ActivationCache, receiver: Node, candidates: Sequence[Node]) -> list[Group]:
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
    pos = np.array([_NONE if c.position is None else c.position for c in candidates], dtype=np.int64)
    kv = np.array([_NONE if c.kv_position is None else c.kv_position for c in candidates], dtype=np.int64)
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
            groups.append(Group(position, idx, bank.rows(kind[idx], layer[idx], head[idx], kv[idx])))
    return groups


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

    def _chunk_size(self, path: Path, group_pos: int | None, first_row: int = 0) -> int:
        """Candidates per chunk: the widest per-candidate intermediate of ``path`` (rows from
        ``first_row`` on, for a row-sparse group) times the chunk stays within ``chunk_bytes``
        (cache-sized: fused passes over a chunk stay in L2/L3) or within a quarter of the path's
        weight bytes when those are larger (each chunk re-reads the weights: wide MLPs want
        bigger chunks), and the whole working set within ``memory_budget``."""
        c = self.cache
        w = c.weights
        wide = group_pos is None or any(
            n.position is None or (n.kind is NodeKind.ATTN and n.is_kv and n.kv_position is None)
            for n in path
        )
        rows = c.seq_len - first_row if wide else 1
        cfg = w.cfg
        width = cfg.d_model
        if any(n.kind is NodeKind.MLP for n in path):
            width = max(width, cfg.d_mlp or 0)
        if any(n.kind is NodeKind.ATTN for n in path):
            width = max(width, w.n_heads * c.seq_len)
        per = c.batch * rows * width * c.clean.final.element_size()
        if c.device.type != "cpu":  # no CPU cache to fit: the largest pass the budget allows
            return max(1, self.memory_budget // (6 * per))
        target = self.chunk_bytes if self.dense else max(self.chunk_bytes, self._weight_bytes(path) // 4)
        return max(1, min(target // per, self.memory_budget // (6 * per)))

    def _weight_bytes(self, path: Path) -> int:
        """Bytes of the weight matrices the nodes of ``path`` multiply by (read once per chunk)."""
        cfg = self.cache.weights.cfg
        D = cfg.d_model
        total = 0
        for n in path:
            if n.kind is NodeKind.MLP:
                total += (3 if cfg.gated_mlp else 2) * D * (cfg.d_mlp or 0)
            elif n.kind is NodeKind.ATTN:
                total += 4 * D * cfg.d_head * (cfg.n_heads if n.head is None else 1)
        return total * self.cache.clean.final.element_size()

    def message_batch(self, path: Path, start: Msg) -> Tensor:
        """Per-prompt scores ``[N, B]`` of a start-message batch entering ``path[0]``."""
        out = propagate(start, path, self.cache)  # ends with FINAL: rows on the root row
        patched = self._clean_row - out.gather((self.root_row,))[:, :, 0]
        return self.metric(patched)

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
        """Exact scores of ``(c, *path)`` for every candidate ``c`` (one copy to the host)."""
        p = self.checked_path(path)
        scores = self.expand_on_device(p, candidates).cpu()
        return Scores(ExtensionPaths(candidates, p), scores, [EXACT] * len(candidates))

    def expand_on_device(self, path: Sequence[Node], candidates: Sequence[Node]) -> Tensor:
        """Per-prompt exact scores ``[n, B]`` of ``(c, *path)``, left on the cache's device: every
        group of candidates writes into one device buffer, nothing is read back inside the loop."""
        p = self.checked_path(path)
        n, B = len(candidates), self.cache.batch
        dev = self.cache.device
        out = torch.empty(n, B, dtype=self._clean_row.dtype, device=dev)
        if n:
            with torch.inference_mode():
                for planned in plan_extension(self.cache, p[0], candidates):
                    grp = self._skip_zero_messages(planned, n, out)
                    if grp is None:
                        continue
                    for index, bank_rows, msg in self._batches(grp):
                        res = self._scores(p, grp.position, bank_rows, msg)
                        if index is None:
                            out.copy_(res)
                        else:
                            out[torch.from_numpy(index).to(dev)] = res.to(out.dtype)
        return out

    def _batches(self, grp: Group) -> list[tuple[np.ndarray | None, np.ndarray, Msg]]:
        """``(indices into the candidate list, bank rows, start messages)`` of a group: one batch,
        or for a non-positional group one per set of non-zero rows, each message carrying only
        its rows (see :mod:`search.sparse_rows`)."""
        if self.dense or grp.position is not None:
            return [(grp.index, grp.rows, grp.messages(self.cache))]
        ids, sets = row_sets(self.cache)
        parts = split_by_rows(ids[grp.rows], sets)
        if len(parts) == 1:
            return [(grp.index, grp.rows, row_messages(self.cache, grp.rows, parts[0][1]))]
        index = np.arange(len(grp.rows)) if grp.index is None else grp.index
        return [(index[i], grp.rows[i], row_messages(self.cache, grp.rows[i], pos)) for i, pos in parts]

    def _scores(self, path: Path, position: int | None, bank_rows: np.ndarray, msg: Msg) -> Tensor:
        """Per-prompt scores ``[n, B]`` of one start-message batch, in chunks; the output of the
        path's first node is taken from (or kept in) the step cache when later nodes follow."""
        size = self._chunk_size(path, position, msg.pos[0] if position is None else 0)
        nbytes = msg.rows.numel() * msg.rows.element_size()
        if self.dense or not self.share_steps or len(path) < 3 or not self.steps.fits(nbytes):
            parts = [self.message_batch(path, ch) for ch in msg.chunk(size)]
        else:
            key = StepCache.key(path[0], position, bank_rows, msg.pos)
            first = self.steps.get(key)
            if first is None:
                first = concat([step(path[0], ch, self.cache) for ch in msg.chunk(size)])
                self.steps.put(key, first)
            parts = [self.message_batch(path[1:], ch) for ch in first.chunk(size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _skip_zero_messages(self, grp: Group, n: int, out: Tensor) -> Group | None:
        """Write the clean score for candidates whose start message is exactly zero (a zero
        message stays exactly zero through every node, so the metric reads the clean residual)
        and return the group of the others (None when nothing is left to propagate)."""
        nonzero = self.cache.bank(grp.position).nonzero[grp.rows]  # host mask, read once per bank
        if nonzero.all():
            return grp
        index = np.arange(n) if grp.index is None else grp.index
        zero = index[~nonzero]
        out[torch.from_numpy(zero).to(out.device)] = self._clean_rows().to(out.dtype)
        if not nonzero.any():
            return None
        return Group(grp.position, index[nonzero], grp.rows[nonzero])

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
