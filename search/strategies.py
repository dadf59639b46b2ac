"""Backward search strategies over a path scorer: threshold, best-first, level-width (+ hybrid).

Every strategy starts at ``[FINAL]`` and prepends one node at a time. Every evaluated path is
reported to a :class:`PathSink` (which writes it to the store) together with its score, the
method that produced the score, whether it is complete and whether the pruning rule kept it.

Semantics follow the IPE reference (``ipe.graph_search``) so results agree with it:

* threshold: an extension passes when ``score >= min_contribution`` or, with
  ``include_negative``, ``|score| >= min_contribution``; passing incomplete paths join the next
  frontier, passing complete ones (start = EMBED) are results. Order-independent, so resuming
  from any checkpoint gives the same result set.
* best-first: a priority queue on ``|score|`` (``score`` without negatives); pop the best, record
  it as kept; a complete path popped is a result; stop at ``top_n`` results, ``max_time`` or an
  empty queue. The queue is bounded (``max_queue``): the worst entries are dropped.
* threshold recall mode (``recall``): a partial below the threshold is pruned only after a
  look-ahead: its complete extensions (``input`` starts) whose Cauchy-Schwarz bound reaches
  ``partial_factor * min_contribution`` are scored exactly (batched over the pruned partials of a
  frontier path), and when the sign-split mass of its other extensions' attribution estimates
  reaches it too the partial is expanded after all (less the leaves whose ``input`` starts'
  bounds all stay below it), so complete paths above the threshold are
  not lost to cancellation in their partial prefixes (measured against exhaustive:
  BENCHMARKS.md, recall).
* exhaustive: the threshold loop with every extension kept, so every path is scored exactly
  (ground truth for small models); :func:`check_size` refuses it above ``max_paths``.
* level-width: expand the whole frontier; complete extensions are results (non-negative only
  without ``include_negative``); keep the ``max_width`` best incomplete extensions per depth.
* exact pre-screens (``batch_heads``, ``batch_positions``): score a whole attention layer (or all
  key/value sources of a head) first and split it into heads (sources) only when it passes.
  The pre-screen rows are recorded too (their node has ``head`` None or ``kv_position`` None);
  ``kept`` on such a row means the screen passed.
* attribution: the linear estimate ranks and prunes incomplete candidates; complete candidates
  (start = EMBED) are scored exactly (method ``exact``). ``confirm`` (hybrid) re-scores every
  incomplete candidate that passes the estimate exactly before keeping it (method ``confirmed``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from pathdb.graph import ModelShape, Node, NodeKind, Path, Site, count_paths, predecessors
from search.lookahead import StartLookahead
from search.memo import MAX_TUPLES, ByTuple

PREFETCH = 64  # frontier paths whose exact extensions a threshold search scores in shared passes


@dataclass(frozen=True)
class Split:
    """Candidates split into incomplete ones (scored by attribution) and ``input`` starts
    (complete paths, scored exactly)."""

    embed: np.ndarray  # bool per candidate: an ``input`` start
    inner: tuple[Node, ...]
    starts: tuple[Node, ...]


def split_starts(nodes: Sequence[Node]) -> Split:
    """:class:`Split` of ``nodes``."""
    embed = np.fromiter((n.kind is NodeKind.EMBED for n in nodes), dtype=bool, count=len(nodes))
    embed.flags.writeable = False  # shared by every use of a memoised split
    return Split(
        embed,
        tuple(n for n, e in zip(nodes, embed.tolist(), strict=True) if not e),
        tuple(n for n, e in zip(nodes, embed.tolist(), strict=True) if e),
    )


Strategy = Literal["threshold", "best-first", "level-width", "exhaustive"]
Method = Literal["exact", "attribution", "hybrid"]
STRATEGIES: tuple[str, ...] = ("threshold", "best-first", "level-width", "exhaustive")
METHODS: tuple[str, ...] = ("exact", "attribution", "hybrid")


class Scorer(Protocol):
    """What a strategy needs from the evaluation engine (see ``search.scorer`` for the adapter)."""

    shape: ModelShape

    def expand_exact(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Exact scores (batch mean) of ``(c, *path)`` for every candidate ``c``."""
        ...

    def expand_attribution(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Attribution estimates of ``(c, *path)`` for every candidate ``c``."""
        ...

    def release(self, path: Path) -> None:
        """Forget per-path state (attribution gradients) of a path that left the frontier."""
        ...


class PathSink(Protocol):
    """Receives every evaluated path; returns store path ids so children can point at parents."""

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
        """Record the paths ``(n, *parent)`` for each ``n`` in ``nodes``; return their ids."""
        ...

    def mark_kept(self, path_ids: Sequence[int]) -> None:
        """Best-first: these already-recorded paths were popped (kept)."""
        ...

    def checkpoint(self, frontier: Sequence[FrontierEntry], *, final: bool = False) -> None:
        """Durably commit everything recorded so far together with the frontier still to expand."""
        ...

    @property
    def wants_checkpoint(self) -> bool:
        """True when the sink's memory buffer is large: checkpoint at the next chance."""
        ...


@dataclass(frozen=True, slots=True)
class FrontierEntry:
    """A path waiting to be expanded, with its store id and score."""

    path_id: int
    path: Path
    score: float
    parent_id: int | None = None  # store id of ``path[1:]``; needed to split pre-screen nodes


@dataclass
class SearchParams:
    """Every knob of a search (also stored in the run's ``params`` for provenance and resume)."""

    strategy: Strategy = "threshold"
    method: Method = "exact"
    min_contribution: float = 0.05  # metric units; suits the default logit difference
    include_negative: bool = True
    top_n: int = 100
    max_time: float | None = None
    max_width: int = 100
    max_queue: int = 1_000_000
    batch_heads: bool = False
    batch_positions: bool = False
    split_kv: bool = False  # score key and value sides separately (MIB's k / v split)
    max_depth: int | None = None
    checkpoint_every: float = 5.0  # seconds between durable checkpoints
    max_paths: int = 2_000_000  # exhaustive: refuse a search that would evaluate more paths
    # threshold recall mode: a partial below min_contribution is pruned only when a look-ahead
    # (input-start bounds, exact where they reach partial_factor * min_contribution, and the
    # sign-split mass of its other extensions) agrees (docs/semantics.md)
    recall: bool = False
    partial_factor: float = 0.25

    @property
    def kv_sites(self) -> tuple[Site, ...]:
        """Key/value sites a head's candidates use: ``<k>`` and ``<v>`` apart, or one ``<kv>``."""
        return (Site.K, Site.V) if self.split_kv else (Site.KV,)

    def validate(self, *, positional: bool) -> None:
        """Refuse invalid combinations with a message that names the parameter and the fix."""
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.strategy == "best-first" and self.top_n <= 0:
            raise ValueError(f"top_n must be > 0 for best-first search (got {self.top_n})")
        if self.strategy == "level-width" and self.max_width <= 0:
            raise ValueError(f"max_width must be > 0 for level-width search (got {self.max_width})")
        for name, value in (
            ("min_contribution", self.min_contribution),
            ("checkpoint_every", self.checkpoint_every),
            ("max_time", self.max_time),
        ):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number (got {value})")
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be > 0 seconds (got {self.checkpoint_every})")
        if self.min_contribution < 0:
            raise ValueError(
                f"min_contribution must be >= 0 (got {self.min_contribution}); it is compared with |score|"
            )
        if self.strategy == "threshold" and self.min_contribution <= 0:
            raise ValueError(
                "min_contribution must be > 0 for threshold search (0 would expand the whole "
                f"exponential path space; got {self.min_contribution})"
            )
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"max_time must be > 0 seconds (got {self.max_time})")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (got {self.max_queue})")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1 (got {self.max_depth})")
        if self.strategy == "exhaustive" and (
            self.method != "exact" or self.batch_heads or self.batch_positions
        ):
            raise ValueError(
                "the exhaustive strategy scores every path exactly, the ground truth: use --method "
                "exact without --batch-heads / --batch-positions"
            )
        if self.recall and self.strategy != "threshold":
            raise ValueError(
                "recall mode refines the threshold strategy; use --strategy threshold with --recall"
            )
        if not (math.isfinite(self.partial_factor) and 0 < self.partial_factor <= 1):
            raise ValueError(f"partial_factor must be in (0, 1] (got {self.partial_factor})")
        if self.max_paths < 1:
            raise ValueError(f"max_paths must be >= 1 (got {self.max_paths})")
        if self.method == "hybrid" and self.strategy != "threshold":
            raise ValueError(
                "--method hybrid (attribution proposes, exact confirms) is defined for the "
                "threshold strategy, as IPE's confirm_relevance; use --strategy threshold, or "
                "--method exact / attribution with best-first and level-width"
            )
        if self.method != "exact" and (self.batch_heads or self.batch_positions):
            raise ValueError(
                "batch_heads / batch_positions are pre-screens of the exact method; attribution "
                "scores every candidate at once and does not need them (drop the flags or use "
                "--method exact)"
            )
        if self.batch_positions and not positional:
            raise ValueError(
                "batch_positions needs a positional root (a FINAL position); it has no key/value "
                "positions to split in a non-positional search"
            )


@dataclass
class SearchStats:
    """Counters a strategy keeps while it runs (shown by the progress display)."""

    evaluated: int = 0
    complete: int = 0
    kept_complete: int = 0
    expanded: int = 0
    depth: int = 0
    frontier: int = 0
    stop_reason: str = "completed"  # completed (nothing left to expand) | max_time | top_n
    pruned: int = 0  # incomplete paths the threshold rule did not extend
    pruned_mass: float = 0.0  # sum of their |score|: a rough size of what lies below them
    rescued: int = 0  # recall mode: partials below the threshold expanded by the look-ahead
    estimated: int = (
        0  # recall mode: first-order estimates and bounds the look-ahead computed (not stored)
    )
    started: float = field(default_factory=time.perf_counter)

    @property
    def rate(self) -> float:
        """Evaluations per second so far."""
        dt = time.perf_counter() - self.started
        return self.evaluated / dt if dt > 0 else 0.0


Progress = Callable[[SearchStats], None]


def _passes(score: np.ndarray, threshold: float, include_negative: bool) -> np.ndarray:
    if include_negative:
        return np.abs(score) >= threshold
    return score >= threshold


def _sign_split(shares: np.ndarray) -> tuple[float, float]:
    """Positive and negative mass of a partial's extensions: their cancellation, which the
    partial's own score hides, shows as one-signed mass far above ``|score|``."""
    return float(shares[shares > 0].sum()), float(-shares[shares < 0].sum())


def _priority(score: float, include_negative: bool) -> float:
    return abs(score) if include_negative else score


class SearchRun:
    """One backward search from a root path; call :meth:`run` (optionally with resumed state)."""

    def __init__(
        self,
        scorer: Scorer,
        sink: PathSink,
        params: SearchParams,
        *,
        progress: Progress | None = None,
    ) -> None:
        self.scorer = scorer
        self.sink = sink
        self.p = params
        self.progress = progress or (lambda s: None)
        self.stats = SearchStats()
        self._last_checkpoint = time.perf_counter()
        self._deadline = None if params.max_time is None else time.perf_counter() + params.max_time
        self._live: dict[Path, list[Node]] = {}  # recall: a rescued path's extensions (_live_of)
        self._candidates: dict[Node, tuple[Node, ...]] = {}  # start node -> candidates
        self._split_starts = ByTuple(split_starts)

    # ---- candidate generation -----------------------------------------------------------
    def candidates(self, path: Path) -> tuple[Node, ...]:
        """Predecessors of the path's start, collapsed for the pre-screens when enabled; one
        shared tuple per start node (:data:`~search.memo.MAX_TUPLES` kept), so the sink can reuse the node
        ids of a tuple it has seen (:class:`search.sinks.StoreSink`)."""
        start = path[0]
        hit = self._candidates.get(start)
        if hit is None:
            hit = self._candidates[start] = tuple(self._predecessors(start))
            if len(self._candidates) > MAX_TUPLES:
                self._candidates.pop(next(iter(self._candidates)))
        return hit

    def _predecessors(self, start: Node) -> list[Node]:
        """:meth:`candidates`, computed."""
        cands = predecessors(
            start, self.scorer.shape, heads=not self.p.batch_heads, kv_sites=self.p.kv_sites
        )
        if self.p.batch_positions:
            # one kv-side node over all sources per (layer, head, site) instead of one per source
            seen: set[Node] = set()
            out: list[Node] = []
            for c in cands:
                if c.kind is NodeKind.ATTN and c.is_kv:
                    c = Node.attn(c.layer, c.head, c.site or Site.KV, c.position, None)
                    if c in seen:
                        continue
                    seen.add(c)
                out.append(c)
            cands = out
        return cands

    def _split(self, node: Node) -> list[Node]:
        """Children of a pre-screen node: heads of a whole layer, or sources of a kv node."""
        if node.head is None:
            return [
                Node.attn(node.layer, h, node.site or Site.Q, node.position, node.kv_position)
                for h in range(self.scorer.shape.n_heads)
            ]
        assert node.is_kv and node.kv_position is None and node.position is not None
        return [
            Node.attn(node.layer, node.head, node.site or Site.KV, node.position, k)
            for k in range(node.position + 1)
        ]

    def _is_screen(self, node: Node) -> bool:
        if node.kind is not NodeKind.ATTN:
            return False
        if self.p.batch_heads and node.head is None:
            return True
        return (
            self.p.batch_positions
            and node.is_kv
            and node.kv_position is None
            and node.position is not None
        )

    # ---- scoring helpers -----------------------------------------------------------------
    def _score(self, path: Path, cands: Sequence[Node]) -> tuple[np.ndarray, list[str]]:
        """Score extensions: exact, or attribution for incomplete + exact for complete ones."""
        if self.p.method == "exact" or not cands:
            return self.scorer.expand_exact(path, cands), ["exact"] * len(cands)
        split = self._split_starts(cands)
        is_embed, inner, embeds = split.embed, split.inner, split.starts
        scores = np.empty(len(cands), dtype=np.float64)
        methods = ["attribution"] * len(cands)
        if inner:
            scores[~is_embed] = self.scorer.expand_attribution(path, inner)
        if embeds:
            scores[is_embed] = self.scorer.expand_exact(path, embeds)
            for i in np.flatnonzero(is_embed):
                methods[i] = "exact"
        return scores, methods

    def _confirm(
        self,
        path: Path,
        cands: Sequence[Node],
        scores: np.ndarray,
        methods: list[str],
        mask: np.ndarray,
    ) -> None:
        """Hybrid: replace the estimate of candidates in ``mask`` by their exact score, in place."""
        idx = [int(i) for i in np.flatnonzero(mask) if methods[int(i)] == "attribution"]
        if not idx:
            return
        exact = self.scorer.expand_exact(path, [cands[i] for i in idx])
        for j, i in enumerate(idx):
            scores[i] = exact[j]
            methods[i] = "confirmed"

    def _record(
        self,
        parent: FrontierEntry,
        nodes: Sequence[Node],
        scores: np.ndarray,
        methods: Sequence[str],
        kept: np.ndarray,
    ) -> np.ndarray:
        complete = self._split_starts(nodes).embed
        ids = self.sink.add(parent.path_id, parent.path, nodes, scores, methods, complete, kept)
        self.stats.evaluated += len(nodes)
        self.stats.complete += int(complete.sum())
        self.stats.kept_complete += int((complete & kept).sum())
        return ids

    def _time_up(self) -> bool:
        return self._deadline is not None and time.perf_counter() >= self._deadline

    def _maybe_checkpoint(self, frontier: Collection[FrontierEntry]) -> None:
        now = time.perf_counter()
        if now - self._last_checkpoint >= self.p.checkpoint_every or self.sink.wants_checkpoint:
            self.sink.checkpoint(list(frontier))
            self._last_checkpoint = now
        self.progress(self.stats)

    def _depth_ok(self, path: Path) -> bool:
        return self.p.max_depth is None or len(path) - 1 < self.p.max_depth

    # ---- threshold ------------------------------------------------------------------------
    def _threshold_expand(self, entry: FrontierEntry) -> list[FrontierEntry]:
        """Evaluate every extension of one frontier path; return the kept incomplete ones."""
        p = self.p
        path = entry.path
        out: list[FrontierEntry] = []
        pending: Sequence[Node] = self._first_candidates(entry)
        while pending:
            scores, methods = self._score(path, pending)
            incomplete = ~self._split_starts(pending).embed
            passed = self._keeps(scores)
            if p.method == "hybrid":
                self._confirm(path, pending, scores, methods, passed & incomplete)
                passed = self._keeps(scores)
            ids = self._record(entry, pending, scores, methods, passed)
            nxt: list[Node] = []
            for i in np.flatnonzero(incomplete & passed).tolist():
                node = pending[i]
                if self._is_screen(node):
                    nxt.extend(self._split(node))
                else:
                    out.append(
                        FrontierEntry(int(ids[i]), (node, *path), float(scores[i]), entry.path_id)
                    )
            lost = np.flatnonzero(incomplete & ~passed).tolist()
            self.stats.pruned += len(lost)
            self.stats.pruned_mass += sum(np.abs(scores[lost]).tolist())
            if p.recall and lost:
                pruned = [
                    FrontierEntry(int(ids[i]), (pending[i], *path), float(scores[i]), entry.path_id)
                    for i in lost
                ]
                out.extend(self._pruned(pruned))
            pending = nxt
        return out

    def _keeps(self, scores: np.ndarray) -> np.ndarray:
        """The threshold rule: everything (exhaustive), or |score| >= t (score >= t without negatives)."""
        p = self.p
        if p.strategy == "exhaustive":
            return np.ones(len(scores), dtype=bool)
        return _passes(scores, p.min_contribution, p.include_negative)

    def _pruned(self, pruned: list[FrontierEntry]) -> list[FrontierEntry]:
        """Recall mode: look one step ahead of pruned partials (extensions of one path, counted
        by the caller) and return those that must be expanded after all.

        A partial's score is (to first order) the sum of its extensions' shares, which can
        cancel; and under zero patching a complete path can be 10-60x its pruned parent (removing the
        embedding through a head's key changes its whole attention pattern, which the partial's
        own message does not). So recall mode looks below every pruned partial, cheapest first:
        (1) its ``input`` starts are bounded without scoring them (two node steps each, batched:
        :meth:`search.lookahead.StartLookahead.bounds`); (2) its other extensions are estimated
        to first order (attribution, one backward pass) and their sign-split mass taken: the larger of the
        positive and the negative mass is the most any set of them carries to first order; (3) when
        that mass reaches ``partial_factor * t`` the partial hid cancellation: it is kept and
        expanded exactly (:meth:`_rescued`) by the extensions below which a bound can reach
        ``partial_factor * t`` (:meth:`_live_of`); its ``input`` starts are scored exactly first,
        as are, for the other pruned partials, the starts whose bound reaches ``partial_factor * t``
        (recorded; a passing one is kept, with its parent, so every kept path's chain is). The
        exact starts of all the pruned partials are scored in one batched pass
        (:meth:`search.lookahead.StartLookahead.scores`, reusing the bounds' node steps); nothing
        else is an exact evaluation.
        """
        looked = [e for e in pruned if not self._is_screen(e.path[0]) and self._depth_ok(e.path)]
        if not looked:
            return []
        floor = self.p.min_contribution * self.p.partial_factor
        cands = [self.candidates(e.path) for e in looked]
        starts = [[c for c in cs if c.kind is NodeKind.EMBED] for cs in cands]
        rescue = [self._hides_mass(e, cs) for e, cs in zip(looked, cands, strict=True)]
        ahead = StartLookahead(self.scorer, looked[0].path[1:], [e.path[0] for e in looked], starts)
        bounds = ahead.bounds()
        if bounds is None:  # no bound for this scorer: every start is scored exactly
            picks = [np.arange(len(s)) for s in starts]
        else:
            self.stats.estimated += sum(len(s) for s in starts)
            picks = [
                np.arange(len(s)) if r else np.flatnonzero(b >= floor)
                for s, b, r in zip(starts, bounds, rescue, strict=True)
            ]
        exact = ahead.scores(picks)
        chosen = [[s[int(j)] for j in pk] for s, pk in zip(starts, picks, strict=True)]
        out: list[FrontierEntry] = []
        for e, nodes, scores, r in zip(looked, chosen, exact, rescue, strict=True):
            if nodes:
                passed = _passes(scores, self.p.min_contribution, self.p.include_negative)
                self._record(e, nodes, scores, ["exact"] * len(nodes), passed)
                if passed.any():
                    self.sink.mark_kept([e.path_id])
            if r:
                self.sink.mark_kept([e.path_id])
                self.stats.pruned -= 1
                self.stats.pruned_mass -= abs(e.score)
                self.stats.rescued += 1
                out.append(e)
        return out

    def _hides_mass(self, entry: FrontierEntry, cands: Sequence[Node]) -> bool:
        """True when the attribution estimates of a pruned partial's non-``input`` extensions have
        a one-signed mass (:func:`_sign_split`; positive only without ``include_negative``) of at
        least ``partial_factor * min_contribution``: the most any set of them carries to first order."""
        inner = [c for c in cands if c.kind is not NodeKind.EMBED]
        if not inner:
            return False
        estimates = self.scorer.expand_attribution(entry.path, inner)
        self.scorer.release(entry.path)
        self.stats.estimated += len(inner)
        positive, negative = _sign_split(estimates)
        mass = max(positive, negative) if self.p.include_negative else positive
        return mass >= self.p.min_contribution * self.p.partial_factor

    def _rescued(self, entry: FrontierEntry) -> bool:
        """True for a frontier path kept by the look-ahead (its own score fails the threshold),
        whose ``input`` starts are already scored; derived from the stored score, so a resumed
        run knows it too."""
        p = self.p
        return (
            p.recall
            and len(entry.path) > 1
            and not bool(
                _passes(np.array([entry.score]), p.min_contribution, p.include_negative)[0]
            )
        )

    def _first_candidates(self, entry: FrontierEntry) -> Sequence[Node]:
        """The candidates a threshold expansion of ``entry`` scores first."""
        pending: Sequence[Node] = self.candidates(entry.path)
        if self._rescued(entry):  # its input starts were scored by the look-ahead already
            pending = self._live_of(
                entry.path, [c for c in pending if c.kind is not NodeKind.EMBED]
            )
        return pending

    def _live_of(self, path: Path, inner: list[Node]) -> list[Node]:
        """The extensions a rescued ``path`` is expanded by: ``inner`` less the leaves (nodes whose
        only extensions are ``input`` starts) none of whose starts' bounds
        (:meth:`search.lookahead.StartLookahead.bounds`) reaches ``partial_factor * t``: below such
        a leaf nothing can pass, so its own score decides nothing. Deterministic, so a resumed run
        expands the same set; memoised for the prefetch and the expansion that follows it."""
        hit = self._live.get(path)
        if hit is not None:
            return hit
        leaves: list[Node] = []
        starts: list[Sequence[Node]] = []
        for c in inner:
            ext = (c, *path)
            below = self.candidates(ext)
            leaf = below and all(x.kind is NodeKind.EMBED for x in below)
            if leaf and not self._is_screen(c) and self._depth_ok(ext):
                leaves.append(c)
                starts.append(below)
        bounds = StartLookahead(self.scorer, path, leaves, starts).bounds() if leaves else None
        live = inner
        if bounds is not None:
            self.stats.estimated += sum(len(s) for s in starts)
            floor = self.p.min_contribution * self.p.partial_factor
            dead = {c for c, b in zip(leaves, bounds, strict=True) if not (b >= floor).any()}
            live = [c for c in inner if c not in dead]
        if len(self._live) >= 2 * PREFETCH:  # the prefetch looks at most PREFETCH paths ahead
            self._live.pop(next(iter(self._live)))
        self._live[path] = live
        return live

    def _prefetch(self, entry: FrontierEntry, queue: deque[FrontierEntry], done: set[Path]) -> None:
        """Hand the scorer the exactly scored extensions of ``entry`` and of the next frontier
        paths of its depth (up to :data:`PREFETCH`) at once, so they share tensor passes (issue
        22; the scorer keeps the results for their ``expand_exact`` calls): every first candidate
        under the exact method, the ``input`` starts under attribution and hybrid. Scorers
        without ``prefetch_exact`` are left alone."""
        prefetch = getattr(self.scorer, "prefetch_exact", None)
        if prefetch is None or entry.path in done:
            return
        depth = len(entry.path)
        same = itertools.takewhile(
            lambda e: len(e.path) == depth, itertools.islice(queue, PREFETCH - 1)
        )
        batch = [e for e in (entry, *same) if self._depth_ok(e.path)]
        done.clear()
        done.update(e.path for e in batch)
        items = [(e.path, self._exact_first(e)) for e in batch]
        items = [(p, c) for p, c in items if c]
        if items:
            prefetch(items)

    def _exact_first(self, entry: FrontierEntry) -> Sequence[Node]:
        """The candidates of ``entry`` that its threshold expansion scores exactly first."""
        first = self._first_candidates(entry)
        if self.p.method == "exact":
            return first
        return [c for c in first if c.kind is NodeKind.EMBED]

    def threshold(self, frontier: list[FrontierEntry]) -> None:
        """Breadth-first threshold search; ``frontier`` is the root (or the resumed frontier).

        The exhaustive strategy is this loop with every extension kept."""
        queue = deque(frontier)
        prefetched: set[Path] = set()
        while queue:
            if self._time_up():
                self.stats.stop_reason = "max_time"
                break
            entry = queue.popleft()
            self.stats.depth = len(entry.path)
            self._prefetch(entry, queue, prefetched)
            children = self._threshold_expand(entry) if self._depth_ok(entry.path) else []
            self.scorer.release(entry.path)
            queue.extend(children)
            self.stats.expanded += 1
            self.stats.frontier = len(queue)
            self._maybe_checkpoint(queue)
        self.sink.checkpoint(list(queue), final=not queue)

    # ---- best-first -------------------------------------------------------------------------
    def best_first(self, frontier: list[FrontierEntry], n_done: int = 0) -> None:
        """Best-first search with a bounded queue; ``n_done`` results already found (resume)."""
        p = self.p
        tie = 0
        heap: list[tuple[float, int, FrontierEntry]] = []
        for e in frontier:
            heap.append((-_priority(e.score, p.include_negative), tie, e))
            tie += 1
        heapq.heapify(heap)
        done = n_done
        popped: list[int] = []
        while heap and done < p.top_n and not self._time_up():
            _, _, entry = heapq.heappop(heap)
            popped.append(entry.path_id)
            self.sink.mark_kept([entry.path_id])
            head = entry.path[0]
            if head.kind is NodeKind.EMBED:
                if p.include_negative or entry.score > 0:
                    done += 1
                    self.stats.kept_complete = done
                continue
            if self._is_screen(head):
                # split lazily, as IPE does: the children replace the screen node in the queue
                parent = self._parent_entry(entry)
                kids = self._split(head)
                scores, methods = self._score(parent.path, kids)
                ids = self._record(parent, kids, scores, methods, np.zeros(len(kids), dtype=bool))
                for k, pid, s in zip(kids, ids, scores, strict=True):
                    heapq.heappush(
                        heap,
                        (
                            -_priority(float(s), p.include_negative),
                            tie,
                            FrontierEntry(int(pid), (k, *parent.path), float(s), parent.path_id),
                        ),
                    )
                    tie += 1
            elif self._depth_ok(entry.path):
                cands = self.candidates(entry.path)
                scores, methods = self._score(entry.path, cands)
                ids = self._record(entry, cands, scores, methods, np.zeros(len(cands), dtype=bool))
                for c, pid, s in zip(cands, ids, scores, strict=True):
                    heapq.heappush(
                        heap,
                        (
                            -_priority(float(s), p.include_negative),
                            tie,
                            FrontierEntry(int(pid), (c, *entry.path), float(s), entry.path_id),
                        ),
                    )
                    tie += 1
            self.scorer.release(entry.path)
            if len(heap) > p.max_queue:
                heap = heapq.nsmallest(p.max_queue, heap)
                heapq.heapify(heap)
            self.stats.expanded += 1
            self.stats.depth = len(entry.path)
            self.stats.frontier = len(heap)
            if (
                time.perf_counter() - self._last_checkpoint >= self.p.checkpoint_every
                or self.sink.wants_checkpoint
            ):
                self._maybe_checkpoint([e for _, _, e in heap])
            else:
                self.progress(self.stats)
        if done >= p.top_n:
            self.stats.stop_reason = "top_n"
        elif heap:  # the loop only leaves a non-empty queue behind when time is up
            self.stats.stop_reason = "max_time"
        rest = [e for _, _, e in heap] if done < p.top_n and not self._time_up() else []
        self.sink.checkpoint(rest, final=True)

    @staticmethod
    def _parent_entry(entry: FrontierEntry) -> FrontierEntry:
        """The path a frontier entry extends (needed to score the children of a screen node)."""
        assert entry.parent_id is not None, "a pre-screen entry always has a parent"
        return FrontierEntry(entry.parent_id, entry.path[1:], 0.0)

    # ---- level-width ------------------------------------------------------------------------
    def level_width(self, frontier: list[FrontierEntry]) -> None:
        """Beam search: per depth keep the ``max_width`` best incomplete extensions."""
        p = self.p
        level = list(frontier)
        while level and not self._time_up():
            self.stats.depth = len(level[0].path)
            cand_entries: list[tuple[float, int, FrontierEntry]] = []
            tie = 0
            for entry in level:
                if not self._depth_ok(entry.path):
                    continue
                cands = self.candidates(entry.path)
                scores, methods = self._score(entry.path, cands)
                complete = np.array([c.kind is NodeKind.EMBED for c in cands], dtype=bool)
                ok_sign = np.ones(len(cands), dtype=bool) if p.include_negative else scores >= 0
                ids = self._record(entry, cands, scores, methods, complete & ok_sign)
                for c, pid, s, comp, ok in zip(cands, ids, scores, complete, ok_sign, strict=True):
                    if comp or not ok:
                        continue
                    cand_entries.append(
                        (
                            _priority(float(s), p.include_negative),
                            tie,
                            FrontierEntry(int(pid), (c, *entry.path), float(s), entry.path_id),
                        )
                    )
                    tie += 1
                self.scorer.release(entry.path)
                self.stats.expanded += 1
                self.progress(self.stats)
            best = heapq.nlargest(p.max_width, cand_entries, key=lambda t: (t[0], -t[1]))
            if p.batch_heads or p.batch_positions:
                best = self._split_level(best)
            self.sink.mark_kept([e.path_id for _, _, e in best])
            level = [e for _, _, e in best]
            self.stats.frontier = len(level)
            # checkpoint only at level boundaries (resume restarts an uncommitted level), and only
            # every checkpoint_every seconds: a flush has a fixed cost that small levels would pay
            if level:
                self._maybe_checkpoint(level)
        if level:  # the loop only leaves a level behind when time is up
            self.stats.stop_reason = "max_time"
        self.sink.checkpoint(level, final=not level)

    def _split_level(
        self, best: list[tuple[float, int, FrontierEntry]]
    ) -> list[tuple[float, int, FrontierEntry]]:
        """Replace pre-screen nodes in a selected level by their children, then re-select."""
        p = self.p
        out: list[tuple[float, int, FrontierEntry]] = []
        tie = 0
        for _, _, entry in best:
            pending = [entry]
            while pending:
                e = pending.pop()
                if not self._is_screen(e.path[0]):
                    out.append((_priority(e.score, p.include_negative), tie, e))
                    tie += 1
                    continue
                parent = self._parent_entry(e)
                kids = self._split(e.path[0])
                scores, methods = self._score(parent.path, kids)
                ok = np.ones(len(kids), dtype=bool) if p.include_negative else scores >= 0
                ids = self._record(parent, kids, scores, methods, np.zeros(len(kids), dtype=bool))
                for k, pid, s, good in zip(kids, ids, scores, ok, strict=True):
                    if good:
                        pending.append(
                            FrontierEntry(int(pid), (k, *parent.path), float(s), parent.path_id)
                        )
        return heapq.nlargest(p.max_width, out, key=lambda t: (t[0], -t[1]))

    # ---- entry point ------------------------------------------------------------------------
    def run(self, frontier: list[FrontierEntry], *, n_done: int = 0) -> SearchStats:
        """Run the configured strategy from ``frontier`` (the root entry for a fresh search)."""
        if self.p.strategy in ("threshold", "exhaustive"):
            self.threshold(frontier)
        elif self.p.strategy == "best-first":
            self.best_first(frontier, n_done)
        else:
            self.level_width(frontier)
        return self.stats


def check_size(params: SearchParams, root: Node, shape: ModelShape) -> None:
    """Refuse an exhaustive search that would evaluate more than ``max_paths`` paths (counted, not run)."""
    if params.strategy != "exhaustive":
        return
    total, complete = count_paths(root, shape, kv_sites=params.kv_sites, max_depth=params.max_depth)
    if total > params.max_paths:
        raise ValueError(
            f"an exhaustive search from {root.label} would evaluate {total:,} paths ({complete:,} "
            f"complete), above --max-paths {params.max_paths:,}; limit --max-depth, use "
            "--no-positional, raise --max-paths, or use a threshold search"
        )
