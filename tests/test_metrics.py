"""Built-in metrics agree with a direct computation from the model's own logits.

The direct computation runs ``model(tokens)`` with a hook that replaces the final residual row at
the root (last) position by ``clean - m`` for a random message ``m``, and applies each metric's
textbook formula to the resulting logits; the metric objects see only the patched root row.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from pathdb.metrics import METRICS, FunctionMetric, MetricError, Readout, custom_metric, get_metric
from tests.engine_helpers import prompts, tiny_model

B, T, N = 3, 5, 4


@pytest.fixture(scope="module")
def setup() -> dict:
    model = tiny_model(n_layers=2, n_heads=2, seed=3)
    tokens, _, target, cf_target = prompts(model, B, T, seed=4)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == hook)
    clean = cache[hook][:, -1].detach()  # [B, D]
    g = torch.Generator().manual_seed(5)
    msgs = torch.randn(N, B, model.cfg.d_model, generator=g, dtype=clean.dtype)
    with torch.no_grad():
        clean_logits = model(tokens)[:, -1]
        patched_logits = torch.stack(
            [hooked_logits(model, tokens, hook, m) for m in msgs]
        )  # [N, B, V]
    return dict(
        model=model,
        tokens=tokens,
        target=target,
        cf_target=cf_target,
        clean=clean,
        msgs=msgs,
        clean_logits=clean_logits,
        patched_logits=patched_logits,
    )


def hooked_logits(model: HookedTransformer, tokens: Tensor, hook: str, m: Tensor) -> Tensor:
    """Last-position logits with the final residual's last row replaced by ``clean - m``."""

    def patch(resid: Tensor, hook: object) -> Tensor:
        resid = resid.clone()
        resid[:, -1] = resid[:, -1] - m
        return resid

    return model.run_with_hooks(tokens, fwd_hooks=[(hook, patch)])[:, -1]


def _pick(x: Tensor, tok: Tensor) -> Tensor:
    """``x[..., b, tok[b]]``."""
    return x.gather(
        -1, tok.reshape(*([1] * (x.dim() - 2)), -1, 1).expand(*x.shape[:-1], 1)
    ).squeeze(-1)


def direct(name: str, lc: Tensor, lp: Tensor, t: Tensor, u: Tensor) -> Tensor:
    """Each metric's formula on clean logits ``lc [B, V]`` and patched logits ``lp [N, B, V]``."""
    pc, pp = lc.softmax(-1), lp.softmax(-1)
    if name == "logit_difference":
        return (_pick(lc, t) - _pick(lc, u)) - (_pick(lp, t) - _pick(lp, u))
    if name == "target_logit_percentage":
        return 100 * (_pick(lc, t) - _pick(lp, t)) / _pick(lc, t).abs()
    if name == "target_probability_percentage":
        return 100 * (_pick(pc, t) - _pick(pp, t)) / _pick(pc, t)
    if name == "kl_divergence":
        return (pp * (pp.log() - pc.log())).sum(-1)
    if name == "indirect_effect":  # ipe's formula, with its 1e-8 guard in the denominators
        eps = 1e-8
        return -0.5 * (
            (_pick(pp, t) - _pick(pc, t)) / (_pick(pc, t) + eps)
            + (_pick(pc, u) - _pick(pp, u)) / (_pick(pp, u) + eps)
        )
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_builtin_metric_matches_model_logits(setup: dict, name: str) -> None:
    s = setup
    metric = get_metric(name)(Readout(s["model"]), s["clean"], s["target"], s["cf_target"])
    patched = s["clean"] - s["msgs"]  # [N, B, D]
    got = metric(patched)
    assert got.shape == (N, B)  # one score per candidate and prompt
    want = direct(name, s["clean_logits"], s["patched_logits"], s["target"], s["cf_target"])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got, want)
    assert float(want.abs().max()) > 1e-3  # the messages do change the metric
    # baseline: 0 on the clean residual, per prompt
    base = metric(s["clean"])
    assert base.shape == (B,)
    assert torch.allclose(base, torch.zeros(B, dtype=base.dtype), atol=1e-9)
    # a single prompt row scores the same as inside the batch (per-prompt, no batch coupling)
    one = metric(patched[1:2])
    assert torch.allclose(one[0], got[1], atol=1e-10)


def test_custom_metric_is_relative_to_clean(setup: dict) -> None:
    s = setup
    t = s["target"]

    def prob(resid: Tensor, readout: Readout) -> Tensor:
        return _pick(readout.logits(resid).softmax(-1), t)

    factory: Callable[..., FunctionMetric] = custom_metric(prob, name="p_target")
    metric = factory(Readout(s["model"]), s["clean"], t, None)
    got = metric(s["clean"] - s["msgs"])
    want = _pick(s["patched_logits"].softmax(-1), t) - _pick(s["clean_logits"].softmax(-1), t)
    assert metric.name == "p_target"
    assert torch.allclose(got, want, atol=1e-10)
    raw = custom_metric(prob, relative=False)(Readout(s["model"]), s["clean"])
    assert torch.allclose(raw(s["clean"]), _pick(s["clean_logits"].softmax(-1), t), atol=1e-10)


def test_unknown_metric_lists_the_choices() -> None:
    with pytest.raises(MetricError) as info:
        get_metric("logit_diff")
    msg = str(info.value)
    assert "logit_diff" in msg
    for name in METRICS:
        assert name in msg


def test_missing_or_misshaped_targets_are_refused(setup: dict) -> None:
    s = setup
    readout = Readout(s["model"])
    with pytest.raises(MetricError, match="needs target"):
        get_metric("logit_difference")(readout, s["clean"], None, s["cf_target"])
    with pytest.raises(MetricError, match="needs cf_target"):
        get_metric("indirect_effect")(readout, s["clean"], s["target"], None)
    with pytest.raises(MetricError, match="2 entries but the batch has 3"):
        get_metric("target_logit_percentage")(readout, s["clean"], [1, 2])
    get_metric("kl_divergence")(readout, s["clean"])  # needs no targets
