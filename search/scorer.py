"""Binds the engine's evaluators to one prompt batch and one root, for the search strategies.

A :class:`PromptScorer` owns the activation cache of its prompts, an exact evaluator and (lazily)
an attribution evaluator, and answers the :class:`search.strategies.Scorer` protocol with batch-mean
scores as NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pathdb.graph import GraphError, ModelShape, Node, Path
from pathdb.metrics import Metric, get_metric
from pathdb.prompts import PromptSet

from .activations import ActivationCache
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
            cache, metric_name(metric) if isinstance(metric, str) else metric, root, target, cf_target
        )
        self.exact = ExactEvaluator(cache, self._metric, root)
        self._attribution: AttributionEvaluator | None = None

    @property
    def attribution(self) -> AttributionEvaluator:
        """The attribution evaluator (built on first use; it shares the exact evaluator's cache).

        It returns estimates only: the strategies score complete candidates with the exact
        evaluator themselves and record which method produced each score."""
        if self._attribution is None:
            self._attribution = AttributionEvaluator(self.cache, self._metric, self.root, exact_complete=False)
        return self._attribution

    def baseline(self) -> float:
        """Clean metric value (0 for the built-in, clean-relative metrics)."""
        return self.exact.baseline()

    def expand_exact(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Exact batch-mean scores of ``(c, *path)``."""
        if not candidates:
            return np.zeros(0)
        return self.exact.expand(path, candidates).mean.double().numpy()

    def expand_attribution(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """First-order batch-mean estimates of ``(c, *path)`` (never exact-rescored here)."""
        if not candidates:
            return np.zeros(0)
        return self.attribution.expand(path, candidates).mean.double().numpy()

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
            first.shape.n_layers, first.shape.n_heads, max(g.shape.n_positions for g in self.groups)
        )

    def baseline(self) -> float:
        """Prompt-weighted mean of the groups' clean metric values."""
        return float(sum(w * g.baseline() for g, w in zip(self.groups, self.weights, strict=True)))

    def expand_exact(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """Exact mean scores of ``(c, *path)`` over all prompts."""
        return self._combine([g.expand_exact(path, candidates) for g in self.groups], len(candidates))

    def expand_attribution(self, path: Path, candidates: Sequence[Node]) -> np.ndarray:
        """First-order mean estimates of ``(c, *path)`` over all prompts."""
        return self._combine([g.expand_attribution(path, candidates) for g in self.groups], len(candidates))

    def release(self, path: Path) -> None:
        """Drop every group's attribution gradient of ``path``."""
        for g in self.groups:
            g.release(path)

    def _combine(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        out = np.zeros(n)
        for w, part in zip(self.weights, parts, strict=True):
            out += w * part
        return out


AnyScorer = PromptScorer | LengthGroupedScorer


def build_scorer(
    model: Any,
    prompts: PromptSet,
    *,
    metric: str | Callable[..., Metric] = "logit_difference",
    patch_type: str = "counterfactual",
    positional: bool = True,
    root_position: int | None = None,
) -> AnyScorer:
    """Cache the prompts' activations and bind evaluators to the search root.

    Prompts of different token lengths are scored per length group (:class:`LengthGroupedScorer`);
    that needs a position-free search, and mean patching (a mean over prompts at each position) is
    refused for them because their positions do not align.
    """
    if not prompts.equal_length:
        lengths = sorted({int(n) for n in prompts.lengths})
        if positional:
            raise ValueError(
                f"the prompts have different token lengths ({', '.join(map(str, lengths))}), so "
                "positions do not align; search position-free (--no-positional), or one prompt "
                "at a time (--prompt-mode per-prompt)"
            )
        if patch_type == "mean":
            raise ValueError(
                "mean patching averages the prompts position by position, which prompts of "
                f"different token lengths ({', '.join(map(str, lengths))}) do not share; use "
                "--patch counterfactual or zero"
            )
        return LengthGroupedScorer(
            [
                (_prompt_scorer(model, group, metric, patch_type, False, None), len(ix))
                for ix, group in prompts.by_length()
            ]
        )
    return _prompt_scorer(model, prompts, metric, patch_type, positional, root_position)


def _prompt_scorer(
    model: Any,
    prompts: PromptSet,
    metric: str | Callable[..., Metric],
    patch_type: str,
    positional: bool,
    root_position: int | None,
) -> PromptScorer:
    """A :class:`PromptScorer` on one equal-length batch."""
    cf = prompts.cf_tokens if patch_type == "counterfactual" else None
    cache = ActivationCache.build(model, prompts.clean_tokens, cf, patch_type)
    root = root_node(cache.shape, positional=positional, root_position=root_position)
    return PromptScorer(cache, metric, root, prompts.target_ids, prompts.cf_target_ids)
