"""Binds the engine's evaluators to one prompt batch and one root, for the search strategies.

A :class:`PromptScorer` owns the activation cache of its prompts, an exact evaluator and (lazily)
an attribution evaluator, and answers the :class:`search.strategies.Scorer` protocol with batch-mean
scores as NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from pathdb.graph import GraphError, ModelShape, Node, NodeKind, Path
from pathdb.metrics import Metric, get_metric
from pathdb.positions import PositionAxis, RoleError, token_names
from pathdb.prompts import PromptSet

from .activations import ActivationCache, RoleMean, RunCache
from .attribution import AttributionEvaluator
from .exact import ExactEvaluator, build_metric

METRIC_ALIASES = {
    "logit-diff": "logit_difference",
    "logit-difference": "logit_difference",
    "target-logit": "target_logit_percentage",
    "target-logit-pct": "target_logit_percentage",
    "target-prob": "target_probability_percentage",
    "target-prob-pct": "target_probability_percentage",
    "kl": "kl_divergence",
    "kl-divergence": "kl_divergence",
    "indirect-effect": "indirect_effect",
    "ie": "indirect_effect",
}


def metric_name(name: str) -> str:
    """Canonical registry name of a metric given a CLI spelling (``logit-diff`` -> ``logit_difference``)."""
    canonical = METRIC_ALIASES.get(name, name.replace("-", "_"))
    get_metric(canonical)  # raises MetricError listing the choices
    return canonical


class PromptScorer:
    """Exact and attribution scoring of path extensions on one prompt batch, for one root."""

    def __init__(
        self,
        cache: ActivationCache,
        metric: str | Callable[..., Metric],
        root: Node,
        target: Any,
        cf_target: Any,
    ) -> None:
        self.cache = cache
        self.shape: ModelShape = cache.shape
        self.root = root
        self._metric = build_metric(
            cache,
            metric_name(metric) if isinstance(metric, str) else metric,
            root,
            target,
            cf_target,
        )
        self.exact = ExactEvaluator(cache, self._metric, root)
        self._attribution: AttributionEvaluator | None = None

    @property
    def attribution(self) -> AttributionEvaluator:
        """The attribution evaluator (built on first use; it shares the exact evaluator's cache).

        It returns estimates only: the strategies score complete candidates with the exact
        evaluator themselves and record which method produced each score."""
        if self._attribution is None:
            self._attribution = AttributionEvaluator(
                self.cache, self._metric, self.root, exact_complete=False
            )
        return self._attribution

    def baseline(self) -> float:
        """Clean metric value (0 for the built-in, clean-relative metrics)."""
        return self.exact.baseline()

    def expand_exact(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Exact batch-mean scores of ``(c, *path)``."""
        if not candidates:
            return np.zeros(0)
        return self.exact.expand(path, candidates).mean.double().numpy()

    def prefetch_exact(self, items: Sequence[tuple[Path, Sequence[Node]]]) -> None:
        """Score several frontier paths' exact extensions in shared passes; the matching
        :meth:`expand_exact` calls read the results (:meth:`ExactEvaluator.prefetch`)."""
        self.exact.prefetch(items)

    def expand_attribution(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """First-order batch-mean estimates of ``(c, *path)`` (never exact-rescored here)."""
        if not candidates:
            return np.zeros(0)
        return self.attribution.expand(path, candidates).mean.double().numpy()

    def expand_exact_per_prompt(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Exact per-prompt scores ``[n, B]`` of ``(c, *path)`` (float64)."""
        return self.exact.expand(path, candidates).per_prompt.double().numpy()

    def expand_attribution_per_prompt(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """First-order per-prompt estimates ``[n, B]`` of ``(c, *path)`` (float64)."""
        return self.attribution.expand(path, candidates).per_prompt.double().numpy()

    def release(self, path: Path) -> None:
        """Drop the attribution gradient cached for ``path``."""
        if self._attribution is not None:
            self._attribution.release(path)


def root_node(shape: ModelShape, *, positional: bool, root_position: int | None) -> Node:
    """The FINAL node a search starts from (last position unless told otherwise)."""
    if not positional:
        return Node.final(shape.n_layers, None)
    pos = shape.n_positions - 1 if root_position is None else root_position
    if not 0 <= pos < shape.n_positions:
        raise GraphError(
            f"root position {pos} is out of range: the prompts have {shape.n_positions} tokens "
            f"(positions 0..{shape.n_positions - 1})"
        )
    return Node.final(shape.n_layers, pos)


class LengthGroupedScorer:
    """Batch-mean scores over prompts of different token lengths (position-free searches).

    One :class:`PromptScorer` per token length, each batched over its prompts; a path's score is
    the prompt-weighted mean of the groups' batch means, i.e. the mean of its per-prompt scores over
    the whole set (IPE's batch semantics). Position-free nodes mean the same thing in every group,
    and each group's root reads its own last token.
    """

    def __init__(self, groups: Sequence[tuple[PromptScorer, int]]) -> None:
        self.groups = [g for g, _ in groups]
        total = sum(n for _, n in groups)
        self.weights = np.array([n / total for _, n in groups])
        first = self.groups[0]
        self.root = first.root
        self.shape = ModelShape(
            first.shape.n_layers,
            first.shape.n_heads,
            max(g.shape.n_positions for g in self.groups),
            parallel=first.shape.parallel,
        )

    def baseline(self) -> float:
        """Prompt-weighted mean of the groups' clean metric values."""
        return float(sum(w * g.baseline() for g, w in zip(self.groups, self.weights, strict=True)))

    def expand_exact(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Exact mean scores of ``(c, *path)`` over all prompts."""
        return self._combine(
            [g.expand_exact(path, candidates) for g in self.groups], len(candidates)
        )

    def prefetch_exact(self, items: Sequence[tuple[Path, Sequence[Node]]]) -> None:
        """Hand a search level's exact extensions to every group at once (position-free nodes
        mean the same in each), so the matching :meth:`expand_exact` calls read shared passes."""
        for g in self.groups:
            g.prefetch_exact(items)

    def expand_attribution(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """First-order mean estimates of ``(c, *path)`` over all prompts."""
        return self._combine(
            [g.expand_attribution(path, candidates) for g in self.groups], len(candidates)
        )

    def release(self, path: Path) -> None:
        """Drop every group's attribution gradient of ``path``."""
        for g in self.groups:
            g.release(path)

    def _combine(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        out = np.zeros(n)
        for w, part in zip(self.weights, parts, strict=True):
            out += w * part
        return out


_UNSEEN = Node(NodeKind.EMBED, -2)  # a node no layout translates: marks a memo miss


@dataclass(frozen=True)
class _Layout:
    """One role layout inside an equal-length group: its rows in the group's batch, its axis
    position -> token index map, and a scorer batched over its own prompts only."""

    rows: np.ndarray
    tokens: dict[int, int]
    scorer: PromptScorer
    moved: dict[Node, Node | None] = field(default_factory=dict)  # memo of translations

    def translate(self, node: Node) -> Node | None:
        """``node`` at this layout's token indices, or None where its prompts lack the position
        (memoised: the same candidates recur for every frontier path)."""
        moved = self.moved.get(node, _UNSEEN)  # one dict lookup on a hit
        if moved is _UNSEEN:
            moved = self.moved[node] = _translate(node, self.tokens)
        return moved


def _translate(node: Node, tokens: dict[int, int]) -> Node | None:
    """``node`` (axis positions) at token indices ``tokens[position]``; None where a position is
    missing or a key/value source comes after its query."""
    if node.position is None:
        return node
    pos = tokens.get(node.position)
    if pos is None:
        return None
    kv = node.kv_position
    if kv is not None:
        kv = tokens.get(kv)
        if kv is None or kv > pos:
            return None
    return Node(node.kind, node.layer, node.head, node.site, pos, kv)


@dataclass(frozen=True)
class _Pick:
    """One layout's part of a call: which candidates it has (``idx``), their translations
    (``nodes``) and where those sit in the call's candidate list (``sel``)."""

    layout: _Layout
    idx: np.ndarray
    nodes: list[Node]
    sel: np.ndarray


# the candidates one call scores for some layouts, and each layout's part of the result
_Plan = tuple[list[Node], list[_Pick]]


_MAX_PLANS = 4096  # candidate lists whose translation plans a RoleAlignedScorer keeps
_RECENT_PATHS = 64  # paths whose translations it keeps


class RoleAlignedScorer:
    """Batch-mean scores of paths on a role-aligned position axis (:mod:`pathdb.positions`).

    Prompts of one token length (and one root index) form a group with one batched
    :class:`PromptScorer`; each role layout inside it is a set of rows with a scorer of its own.
    A path on the axis is translated to each layout's token indices. Exact scoring costs rows: when
    every layout of a group translates the path alike (positions the layouts share, e.g. S2 and
    END in IOI), one call over the group's batch scores it, each layout keeping its own rows of the
    per-prompt scores; otherwise each layout is scored on its own batch, so no call computes rows it
    discards. Attribution costs calls (one backward pass per path and batch), so it always scores
    each distinct translation once over the group's batch. This keeps a cache per group and layout
    (a layout's cut from its group's, one model run per group); which candidates each layout has
    and their translations are worked out once per candidate list (:meth:`_plans_for`). A threshold
    search hands over a level's exact extensions at once (:meth:`prefetch_exact`): each batch scores
    its part of the level in one call, whose results its ``expand_exact`` calls then read.
    A path through a position a prompt lacks (or a key/value source after its query there) scores 0
    on it; the batch score is the mean of per-prompt scores over all prompts (IPE's batch semantics).
    """

    def __init__(
        self,
        axis: PositionAxis,
        groups: Sequence[
            tuple[PromptScorer, Sequence[tuple[Sequence[int], tuple[int, ...], PromptScorer]]]
        ],
        root: int,
    ) -> None:
        self.axis = axis
        self.groups = [g for g, _ in groups]
        self.layouts = [
            [
                _Layout(np.asarray(rows, dtype=np.int64), {s: t for t, s in enumerate(lay)}, own)
                for rows, lay, own in layouts
            ]
            for _, layouts in groups
        ]
        self.n_prompts = sum(len(rows) for _, layouts in groups for rows, _, _ in layouts)
        first = self.groups[0].shape
        self.shape = ModelShape(
            first.n_layers, first.n_heads, len(axis), axis.kv_sources(), first.parallel
        )
        self.root = Node.final(first.n_layers, root)
        self._plans: dict[tuple[Node, ...], dict[tuple[int, tuple[int, ...]], _Plan]] = {}
        own = [lay.scorer for lays in self.layouts for lay in lays]
        self._scorers = list({id(s): s for s in (*self.groups, *own)}.values())  # distinct
        self._recent: dict[Path, list[dict[Path, tuple[int, ...]]]] = {}

    @property
    def position_names(self) -> tuple[str, ...]:
        """Axis position -> name (node labels use these)."""
        return self.axis.names

    def baseline(self) -> float:
        """Mean clean metric value over all prompts."""
        return float(sum(g.baseline() * g.cache.batch for g in self.groups) / self.n_prompts)

    @staticmethod
    def _group_path(path: Path, lay: _Layout) -> Path | None:
        out = [lay.translate(n) for n in path]
        return None if any(n is None for n in out) else tuple(n for n in out if n is not None)

    def _by_translation(self, g: int, path: Path) -> dict[Path, tuple[int, ...]]:
        """The layouts of group ``g`` (indices) keyed by their translation of ``path`` (absent: no such path)."""
        out: dict[Path, list[int]] = {}
        for i, lay in enumerate(self.layouts[g]):
            gpath = self._group_path(path, lay)
            if gpath is not None:
                out.setdefault(gpath, []).append(i)
        return {gpath: tuple(members) for gpath, members in out.items()}

    def _translations(self, path: Path) -> list[dict[Path, tuple[int, ...]]]:
        """:meth:`_by_translation` of ``path`` for every group, memoised for the last
        ``_RECENT_PATHS`` paths: a frontier path is translated for its attribution call, its exact
        call and its release."""
        hit = self._recent.get(path)
        if hit is None:
            if len(self._recent) >= _RECENT_PATHS:
                del self._recent[next(iter(self._recent))]
            hit = self._recent[path] = [
                self._by_translation(g, path) for g in range(len(self.groups))
            ]
        return hit

    def _plan(self, g: int, members: tuple[int, ...], candidates: Sequence[Node]) -> _Plan:
        """The distinct translations of ``candidates`` in layouts ``members`` of group ``g`` (in
        order of first appearance) and each layout's part of them (layouts with none left out)."""
        uniq: dict[Node, int] = {}
        picks: list[_Pick] = []
        for i in members:
            lay = self.layouts[g][i]
            maybe = [lay.translate(c) for c in candidates]
            idx = [k for k, c in enumerate(maybe) if c is not None]
            moved = [m for m in maybe if m is not None]
            for m in moved:
                uniq.setdefault(m, len(uniq))
            if idx:
                sel = np.array([uniq[m] for m in moved], dtype=np.int64)
                picks.append(_Pick(lay, np.array(idx, dtype=np.int64), moved, sel))
        return list(uniq), picks

    def _plans_for(self, candidates: Sequence[Node]) -> dict[tuple[int, tuple[int, ...]], _Plan]:
        """The plans of one candidate list by (group, layouts), memoised: frontier paths that
        start alike share their candidate lists, so their translation bookkeeping is done once
        (at most ``_MAX_PLANS`` lists are kept, the oldest dropped first)."""
        key = tuple(candidates)
        plans = self._plans.get(key)
        if plans is None:
            if len(self._plans) >= _MAX_PLANS:
                del self._plans[next(iter(self._plans))]
            plans = self._plans[key] = {}
        return plans

    def _calls(
        self, path: Path, candidates: Sequence[Node], *, rows_matter: bool
    ) -> Iterator[tuple[PromptScorer, Path, list[Node], Sequence[_Pick], bool]]:
        """The scorer calls that score ``(c, *path)``, in the order :meth:`_expand` sums them:
        ``(scorer, translated path, translated candidates, the layouts' picks, shared)``; a shared
        call runs on its group's batch (each pick keeps its layout's rows of it), any other on
        one layout's own batch (:class:`RoleAlignedScorer` says which)."""
        plans = self._plans_for(candidates)
        for g, (scorer, translations) in enumerate(
            zip(self.groups, self._translations(path), strict=True)
        ):
            shared = not rows_matter or (
                len(translations) == 1
                and len(next(iter(translations.values()))) == len(self.layouts[g])
            )
            for gpath, members in translations.items():
                plan = plans.get((g, members))
                if plan is None:
                    plan = plans[g, members] = self._plan(g, members, candidates)
                uniq, picks = plan
                if not uniq:
                    continue
                if shared:
                    yield scorer, gpath, uniq, picks, True
                    continue
                for pick in picks:
                    yield pick.layout.scorer, gpath, pick.nodes, (pick,), False

    def _expand(
        self, which: str, path: Path, candidates: Sequence[Node], *, rows_matter: bool
    ) -> np.ndarray:
        out = np.zeros(len(candidates))
        for scorer, gpath, nodes, picks, shared in self._calls(
            path, candidates, rows_matter=rows_matter
        ):
            per = getattr(scorer, which)(gpath, nodes)  # [len(nodes), the call's batch]
            for pick in picks:
                out[pick.idx] += (per[pick.sel][:, pick.layout.rows] if shared else per).sum(axis=1)
        return out / self.n_prompts

    def prefetch_exact(self, items: Sequence[tuple[Path, Sequence[Node]]]) -> None:
        """Hand each batch's part of a search level's exact extensions to its scorer at once
        (:meth:`PromptScorer.prefetch_exact`: one shared pass per group or layout instead of one
        call per frontier path and batch); the matching :meth:`expand_exact` calls read the
        results, which do not depend on the rest of the level."""
        todo: dict[int, dict[tuple[Path, tuple[Node, ...]], None]] = {
            id(s): {} for s in self._scorers
        }
        for path, candidates in items:
            for scorer, gpath, nodes, _, _ in self._calls(path, candidates, rows_matter=True):
                todo[id(scorer)][gpath, tuple(nodes)] = None
        for s in self._scorers:  # every scorer, so each drops what the last level left unread
            s.prefetch_exact(list(todo[id(s)]))

    def expand_exact(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Exact mean scores of ``(c, *path)`` over all prompts."""
        return self._expand("expand_exact_per_prompt", path, candidates, rows_matter=True)

    def expand_attribution(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """First-order mean estimates of ``(c, *path)`` over all prompts."""
        return self._expand("expand_attribution_per_prompt", path, candidates, rows_matter=False)

    def release(self, path: Path) -> None:
        """Drop every group's and layout's attribution gradients of ``path``'s translations."""
        for g, (scorer, translations) in enumerate(
            zip(self.groups, self._translations(path), strict=True)
        ):
            for gpath, members in translations.items():
                scorer.release(gpath)
                for i in members:
                    self.layouts[g][i].scorer.release(gpath)


AnyScorer = PromptScorer | LengthGroupedScorer | RoleAlignedScorer


def position_names(scorer: AnyScorer) -> tuple[str, ...] | None:
    """The role position names a scorer's nodes use, or None for integer positions."""
    return scorer.position_names if isinstance(scorer, RoleAlignedScorer) else None


def build_scorer(
    model: Any,
    prompts: PromptSet,
    *,
    metric: str | Callable[..., Metric] = "logit_difference",
    patch_type: str = "counterfactual",
    positional: bool = True,
    root_position: int | str | None = None,
) -> AnyScorer:
    """Cache the prompts' activations and bind evaluators to the search root.

    Prompts of different token lengths are scored per group: per length for a position-free
    search (:class:`LengthGroupedScorer`), per role layout for a positional one, whose positions
    are then role positions (:class:`RoleAlignedScorer`; it needs role labels). Mean patching's
    reference is then one whole-set mean per role position (:class:`RoleMean`), shared by every
    group; prompts without roles are aligned by offset from their last token (position-free only).
    """
    if not prompts.equal_length:
        lengths = sorted({int(n) for n in prompts.lengths})
        if positional and not prompts.has_roles:
            raise ValueError(
                f"the prompts have different token lengths ({', '.join(map(str, lengths))}) and no "
                'role labels, so positions do not align; add "roles" to every prompt (one label '
                "per token, e.g. IO, S1, S2, END, '-' for others) to align positions by role, search "
                "position-free (--no-positional), or one prompt at a time (--prompt-mode per-prompt)"
            )
        mean = _role_mean(prompts) if patch_type == "mean" else None
        if positional:
            return _role_scorer(model, prompts, metric, patch_type, root_position, mean)
        return LengthGroupedScorer(
            [
                (
                    _prompt_scorer(model, group, metric, patch_type, False, None, _share(mean, ix)),
                    len(ix),
                )
                for ix, group in prompts.by_length()
            ]
        )
    return _prompt_scorer(model, prompts, metric, patch_type, positional, root_position)


_SharedMean = (
    tuple[RoleMean, np.ndarray, bool] | None
)  # whole-set mean, [B, T] axis positions, contributes


def _role_mean(prompts: PromptSet) -> tuple[RoleMean, PositionAxis]:
    """The whole-set mean reference of a mixed-length prompt set and the axis it averages on: the
    role positions, or without roles each token's offset from the prompt's last token."""
    axis = (
        prompts.position_axis()
        if prompts.has_roles
        else PositionAxis.right_aligned(prompts.lengths.tolist())
    )
    return RoleMean(len(axis)), axis


def _share(
    mean: tuple[RoleMean, PositionAxis] | None, ix: Sequence[int], contributes: bool = True
) -> _SharedMean:
    """The whole-set mean for the batch of prompts ``ix`` (None: the batch's own mean)."""
    if mean is None:
        return None
    shared, axis = mean
    return shared, np.array([axis.layouts[i] for i in ix], dtype=np.int64), contributes


def _role_scorer(
    model: Any,
    prompts: PromptSet,
    metric: str | Callable[..., Metric],
    patch_type: str,
    root_position: int | str | None,
    mean: tuple[RoleMean, PositionAxis] | None = None,
) -> RoleAlignedScorer:
    """A :class:`RoleAlignedScorer`: one batched scorer per token length and root index, whose
    rows are split by role layout (every batch reads the whole-set ``mean`` under mean patching)."""
    axis = prompts.position_axis()
    root = axis.resolve(root_position) if root_position is not None else axis.last()
    by_key: dict[tuple[int, int], list[tuple[list[int], tuple[int, ...]]]] = {}
    for ix, layout in axis.groups():
        if root not in layout:
            raise RoleError(
                f"root position {axis.names[root]!r} is missing in {len(ix)} prompt(s) (e.g. prompt "
                f"{ix[0]}); choose a root role every prompt has with --root-position"
            )
        by_key.setdefault((len(layout), layout.index(root)), []).append((ix, layout))
    groups = []
    for (_, root_token), members in sorted(by_key.items()):
        ix = [i for m, _ in members for i in m]
        scorer = _prompt_scorer(
            model, prompts.select(ix), metric, patch_type, True, root_token, _share(mean, ix)
        )
        rows, start = [], 0
        for m, layout in members:
            own = (
                scorer
                if len(members) == 1
                else _rows_scorer(
                    scorer,
                    slice(start, start + len(m)),
                    prompts.select(m),
                    metric,
                    _share(mean, m, False),
                )
            )
            rows.append((list(range(start, start + len(m))), layout, own))
            start += len(m)
        groups.append((scorer, rows))
    return RoleAlignedScorer(axis, groups, root)


def _rows_scorer(
    group: PromptScorer,
    rows: slice,
    prompts: PromptSet,
    metric: str | Callable[..., Metric],
    mean: _SharedMean,
) -> PromptScorer:
    """A :class:`PromptScorer` on the prompts ``rows`` of ``group``'s batch (``prompts``), its
    cache cut from the group's activations instead of running the model again (a role layout's
    own batch: building it cost as much as the group's own cache)."""
    cache = group.cache
    clean = _run_rows(cache.clean, rows)
    ref = None if cache.ref is None else _run_rows(cache.ref, rows)
    own = ActivationCache(
        cache.weights, cache.shape, clean, ref, cache.patch_type, cache.tokens[rows].clone()
    )
    if mean is not None:
        shared, layout, contributes = mean
        shared.add(own, layout, contributes=contributes)
    return PromptScorer(own, metric, group.root, prompts.target_ids, prompts.cf_target_ids)


def _run_rows(run: RunCache, rows: slice) -> RunCache:
    """The prompts ``rows`` of a run's activations (copies, so no tensor is shared between caches)."""
    changes: dict[str, Any] = {}
    for f in fields(run):
        value = getattr(run, f.name)
        changes[f.name] = (
            [t[rows].clone() for t in value] if isinstance(value, list) else value[rows].clone()
        )
    return replace(run, **changes)


def _root_index(prompts: PromptSet, spec: str) -> int:
    """The token index a ``--root-position`` names in equal-length prompts: digits, or a role
    that sits at the same index in every prompt."""
    if spec.isdigit():
        return int(spec)
    if not prompts.has_roles:
        raise RoleError(
            f"--root-position {spec!r} names a role, but the prompts have no role labels; give a token index"
        )
    names = [token_names(r.roles or []) for r in prompts.records]
    if any(spec not in n for n in names):
        raise RoleError(f"unknown role position {spec!r}: not every prompt has a token named so")
    index = {n.index(spec) for n in names}
    if len(index) > 1:
        raise RoleError(
            f"--root-position {spec!r} is at token indices {sorted(index)} in different prompts of one "
            "length; give a token index, or a role every prompt has at the same index"
        )
    return index.pop()


def _prompt_scorer(
    model: Any,
    prompts: PromptSet,
    metric: str | Callable[..., Metric],
    patch_type: str,
    positional: bool,
    root_position: int | str | None,
    mean: _SharedMean = None,
) -> PromptScorer:
    """A :class:`PromptScorer` on one equal-length batch (mean patching against ``mean`` when given)."""
    if isinstance(root_position, str):
        root_position = _root_index(prompts, root_position)
    cf = prompts.cf_tokens if patch_type == "counterfactual" else None
    cache = ActivationCache.build(model, prompts.clean_tokens, cf, patch_type)
    if mean is not None:
        shared, layout, contributes = mean
        shared.add(cache, layout, contributes=contributes)
    root = root_node(cache.shape, positional=positional, root_position=root_position)
    return PromptScorer(cache, metric, root, prompts.target_ids, prompts.cf_target_ids)
