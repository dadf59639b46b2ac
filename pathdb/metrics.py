"""Path metrics: functions of the patched final residual (root row) -> per-prompt scores.

Every metric here is a callable ``metric(patched) -> Tensor`` where ``patched`` is the root-position
row of the final residual stream with the path message removed, shape ``[..., B, D]`` (any leading
candidate axes), and the result is ``[..., B]``: one score per prompt. Built-in metrics are already
*relative to the clean run* (they score 0 on the clean residual), so a path's score is directly its
contribution; ``metric(clean)`` is the baseline. Conventions follow the ``ipe`` package (noising:
a path whose removal lowers the target's logit scores positive):

- ``logit_difference``: ``(l[t] - l[t']) (clean) - (l[t] - l[t']) (patched)``.
- ``target_logit_percentage``: ``100 * (l_clean[t] - l_patched[t]) / |l_clean[t]|``.
- ``target_probability_percentage``: ``100 * (p_clean[t] - p_patched[t]) / p_clean[t]``
  (per prompt; ``ipe`` averages over all prompt x target pairs when the batch has several prompts).
- ``kl_divergence``: ``KL(p_patched || p_clean)`` over the vocabulary (``ipe``'s ``F.kl_div`` order).
- ``indirect_effect``: ``-0.5 * [(p*(t) - p(t)) / p(t) + (p(t') - p*(t')) / p*(t')]`` with ``p`` clean,
  ``p*`` patched, ``t`` the target and ``t'`` the counterfactual target (``ipe``'s IE, noising sign).

User-defined metrics: wrap any function of the patched root row (or of the logits, through
:class:`Readout`) with :func:`custom_metric`; it is made relative to the clean value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from pathdb.arch.compute import apply_norm, logit_cap, soft_cap

__all__ = [
    "METRICS",
    "FunctionMetric",
    "IndirectEffect",
    "KLDivergence",
    "LogitDifference",
    "Metric",
    "MetricError",
    "Readout",
    "TargetLogitPercentage",
    "TargetProbabilityPercentage",
    "custom_metric",
    "get_metric",
]


class MetricError(ValueError):
    """A metric that cannot be built from the given inputs (unknown name, missing targets)."""


@runtime_checkable
class Metric(Protocol):
    """A per-prompt score of the patched final residual root row ``[..., B, D] -> [..., B]``."""

    name: str

    def __call__(self, patched: Tensor) -> Tensor:
        """Score of the patched residual per prompt (0 on the clean residual for built-ins)."""
        ...


class Readout:
    """The model's ``ln_final`` + unembedding (+ final-logit soft-cap), applied to residual rows of
    any leading shape; the architecture specifics come from the model seam (:mod:`pathdb.arch`)."""

    def __init__(self, model: Any) -> None:
        """Keep references to ``model.ln_final`` and the unembedding weights (no copies)."""
        self.ln_final = model.ln_final
        self.W_U: Tensor = model.W_U
        self.b_U: Tensor = model.b_U
        self.logit_cap: float | None = logit_cap(model)

    def normed(self, resid: Tensor) -> Tensor:
        """``ln_final(resid)`` over the last axis (a plain LayerNorm runs as one fused kernel)."""
        return apply_norm(self.ln_final, resid)

    def capped(self, logits: Tensor) -> Tensor:
        """The model's final-logit soft-cap (Gemma-2) applied to logits; unchanged without one."""
        return soft_cap(logits, self.logit_cap)

    def logits(self, resid: Tensor) -> Tensor:
        """Full-vocabulary logits ``[..., V]`` of residual rows ``[..., D]``."""
        return self.capped(self.normed(resid) @ self.W_U + self.b_U)

    def token_logits(self, resid: Tensor, tokens: Tensor) -> Tensor:
        """Logit of ``tokens[b]`` for each prompt: ``resid [..., B, D]``, ``tokens [B]`` -> ``[..., B]``.

        Only the needed unembedding columns are used (cheap for large vocabularies).
        """
        cols = self.W_U[:, tokens]  # [D, B]
        return self.capped(
            torch.einsum("...bd,db->...b", self.normed(resid), cols) + self.b_U[tokens]
        )


def _as_tokens(tokens: Tensor | list[int] | None, what: str, batch: int) -> Tensor:
    if tokens is None:
        raise MetricError(f"this metric needs {what}: pass {what}=[one token id per prompt]")
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if t.numel() != batch:
        raise MetricError(f"{what} has {t.numel()} entries but the batch has {batch} prompts")
    return t


class _Base:
    """Shared constructor: readout, clean root row ``[B, D]`` and target tokens."""

    name = "base"
    needs_target = False
    needs_cf_target = False

    def __init__(
        self,
        readout: Readout,
        clean: Tensor,
        target: Tensor | list[int] | None = None,
        cf_target: Tensor | list[int] | None = None,
    ) -> None:
        """``clean`` is the clean final residual at the root position, ``[B, D]``."""
        self.readout = readout
        self.clean = clean
        batch = clean.shape[0]
        self.target = (
            _as_tokens(target, "target", batch).to(clean.device) if self.needs_target else None
        )
        self.cf_target = (
            _as_tokens(cf_target, "cf_target", batch).to(clean.device)
            if self.needs_cf_target
            else None
        )

    def __call__(self, patched: Tensor) -> Tensor:
        """Per-prompt score of the patched root row (implemented by subclasses)."""
        raise NotImplementedError

    def baseline(self) -> Tensor:
        """The metric on the clean residual, per prompt (zero for built-ins)."""
        return self(self.clean)


class LogitDifference(_Base):
    """Drop of the target-vs-counterfactual logit difference when the path is removed."""

    name = "logit_difference"
    needs_target = True
    needs_cf_target = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """See :class:`_Base`; also precomputes the clean logit difference."""
        super().__init__(*args, **kwargs)
        assert self.target is not None and self.cf_target is not None
        r = self.readout
        # one LN, one contraction per call: the difference of the two unembedding columns, [B, D]
        self._cols = (r.W_U[:, self.target] - r.W_U[:, self.cf_target]).T.contiguous()
        self._bias = r.b_U[self.target] - r.b_U[self.cf_target]
        self._clean_ld = self._ld(self.clean)

    def _ld(self, resid: Tensor) -> Tensor:
        r = self.readout
        if r.logit_cap is not None:  # capped logits do not subtract column-wise
            assert self.target is not None and self.cf_target is not None
            return r.token_logits(resid, self.target) - r.token_logits(resid, self.cf_target)
        return (r.normed(resid) * self._cols).sum(-1) + self._bias

    def __call__(self, patched: Tensor) -> Tensor:
        """``ld(clean) - ld(patched)`` per prompt."""
        return self._clean_ld - self._ld(patched)


class TargetLogitPercentage(_Base):
    """``100 * (l_clean[t] - l_patched[t]) / |l_clean[t]|`` per prompt."""

    name = "target_logit_percentage"
    needs_target = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """See :class:`_Base`; also precomputes the clean target logit."""
        super().__init__(*args, **kwargs)
        assert self.target is not None
        r = self.readout
        self._cols = r.W_U[:, self.target].T.contiguous()  # [B, D], gathered once
        self._bias = r.b_U[self.target]
        self._clean_logit = self._logit(self.clean)
        self._scale = 100 / self._clean_logit.abs()

    def _logit(self, resid: Tensor) -> Tensor:
        return self.readout.capped((self.readout.normed(resid) * self._cols).sum(-1) + self._bias)

    def __call__(self, patched: Tensor) -> Tensor:
        """Percentage drop of the target logit."""
        return (self._clean_logit - self._logit(patched)) * self._scale


class TargetProbabilityPercentage(_Base):
    """``100 * (p_clean[t] - p_patched[t]) / p_clean[t]`` per prompt."""

    name = "target_probability_percentage"
    needs_target = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """See :class:`_Base`; also precomputes the clean target probability."""
        super().__init__(*args, **kwargs)
        self._clean_p = self._prob(self.clean)

    def _prob(self, resid: Tensor) -> Tensor:
        assert self.target is not None
        logp = torch.log_softmax(self.readout.logits(resid), dim=-1)
        idx = self.target.reshape(*([1] * (logp.dim() - 2)), -1, 1).expand(*logp.shape[:-1], 1)
        return logp.gather(-1, idx).squeeze(-1).exp()

    def __call__(self, patched: Tensor) -> Tensor:
        """Percentage drop of the target probability."""
        return 100 * (self._clean_p - self._prob(patched)) / self._clean_p


class KLDivergence(_Base):
    """``KL(p_patched || p_clean)`` per prompt (no targets needed)."""

    name = "kl_divergence"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """See :class:`_Base`; also precomputes the clean log-probabilities."""
        super().__init__(*args, **kwargs)
        self._clean_logp = torch.log_softmax(self.readout.logits(self.clean), dim=-1)

    def __call__(self, patched: Tensor) -> Tensor:
        """Sum over the vocabulary of ``p* (log p* - log p)``."""
        logq = torch.log_softmax(self.readout.logits(patched), dim=-1)
        return (logq.exp() * (logq - self._clean_logp)).sum(-1)


class IndirectEffect(_Base):
    """``ipe``'s indirect effect (noising sign): positive when removing the path hurts the target."""

    name = "indirect_effect"
    needs_target = True
    needs_cf_target = True
    eps = 1e-8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """See :class:`_Base`; also precomputes clean target / cf-target probabilities."""
        super().__init__(*args, **kwargs)
        self._p_t, self._p_cf = self._probs(self.clean)

    def _probs(self, resid: Tensor) -> tuple[Tensor, Tensor]:
        assert self.target is not None and self.cf_target is not None
        logp = torch.log_softmax(self.readout.logits(resid), dim=-1)
        shape = (*logp.shape[:-1], 1)
        lead = [1] * (logp.dim() - 2)
        t = logp.gather(-1, self.target.reshape(*lead, -1, 1).expand(shape)).squeeze(-1).exp()
        c = logp.gather(-1, self.cf_target.reshape(*lead, -1, 1).expand(shape)).squeeze(-1).exp()
        return t, c

    def __call__(self, patched: Tensor) -> Tensor:
        """``-0.5 * (term1 + term2)`` per prompt."""
        q_t, q_cf = self._probs(patched)
        term1 = (q_t - self._p_t) / (self._p_t + self.eps)
        term2 = (self._p_cf - q_cf) / (q_cf + self.eps)
        return -0.5 * (term1 + term2)


class FunctionMetric(_Base):
    """A user-defined metric ``fn(patched_root_row [..., B, D], readout) -> [..., B]``, made relative.

    The score is ``fn(patched) - fn(clean)`` when ``relative`` (the default), so 0 means no effect.
    """

    def __init__(
        self,
        fn: Callable[[Tensor, Readout], Tensor],
        readout: Readout,
        clean: Tensor,
        *,
        name: str = "custom",
        relative: bool = True,
    ) -> None:
        """Wrap ``fn``; ``clean`` is the clean root row ``[B, D]``."""
        super().__init__(readout, clean)
        self.fn = fn
        self.name = name
        self.relative = relative
        self._clean_value = fn(clean, readout) if relative else None

    def __call__(self, patched: Tensor) -> Tensor:
        """``fn(patched) - fn(clean)`` (or the raw value when not relative)."""
        value = self.fn(patched, self.readout)
        return value if self._clean_value is None else value - self._clean_value


def custom_metric(
    fn: Callable[[Tensor, Readout], Tensor], *, name: str = "custom", relative: bool = True
) -> Callable[..., FunctionMetric]:
    """Factory with the same call signature as the registry entries, for a user function."""

    def build(
        readout: Readout,
        clean: Tensor,
        target: Tensor | list[int] | None = None,
        cf_target: Tensor | list[int] | None = None,
    ) -> FunctionMetric:
        return FunctionMetric(fn, readout, clean, name=name, relative=relative)

    return build


METRICS: dict[str, type[_Base]] = {
    cls.name: cls
    for cls in (
        LogitDifference,
        TargetLogitPercentage,
        TargetProbabilityPercentage,
        KLDivergence,
        IndirectEffect,
    )
}


def get_metric(name: str) -> type[_Base]:
    """The metric class registered as ``name`` (constructor: ``(readout, clean, target, cf_target)``)."""
    try:
        return METRICS[name]
    except KeyError:
        raise MetricError(
            f"unknown metric {name!r}; choose one of {', '.join(sorted(METRICS))}"
        ) from None
