"""Path attribution patching is the first-order expansion of exact path message patching."""

from __future__ import annotations

import pytest
import torch

from pathdb.graph import Node, Site, predecessors
from search.activations import ActivationCache
from search.attribution import AttributionEvaluator
from search.exact import build_metric
from search.node_functions import Msg, propagate, start_msg
from tests.engine_helpers import prompts, tiny_model

B, T = 2, 5


@pytest.fixture(scope="module")
def ev() -> AttributionEvaluator:
    model = tiny_model(n_layers=3, n_heads=2, seed=3)
    tokens, cf, target, cf_target = prompts(model, B, T, seed=4)
    cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    root = Node.final(3, T - 1)
    return AttributionEvaluator(
        cache, build_metric(cache, "logit_difference", root, target, cf_target), root
    )


PATHS = [
    (Node.final(3, T - 1),),
    (Node.attn(2, 1, Site.Q, T - 1), Node.final(3, T - 1)),
    (Node.attn(1, 0, Site.KV, 3, 1), Node.attn(2, 1, Site.KV, T - 1, 3), Node.final(3, T - 1)),
    (Node.mlp(1, 2), Node.attn(2, None, Site.K, T - 1, None), Node.final(3, T - 1)),
    (
        Node.attn(1, 1, Site.V, 2, 0),
        Node.mlp(1, 2),
        Node.attn(2, 0, Site.KV, T - 1, 2),
        Node.mlp(2, T - 1),
        Node.final(3, T - 1),
    ),
]


@pytest.mark.parametrize("path", PATHS[:4], ids=lambda p: "-".join(n.label for n in p))
def test_attribution_converges_to_exact(ev: AttributionEvaluator, path: tuple[Node, ...]) -> None:
    """|exact(eps m) - attribution(eps m)| / eps -> 0 as eps -> 0 (float64)."""
    cands = [
        c
        for c in predecessors(path[0], ev.cache.shape)
        if c.position == predecessors(path[0], ev.cache.shape)[-1].position
    ]
    msg = start_msg(cands, ev.cache)
    g = ev.gradient(path)
    base = float(ev.baseline())
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        scaled = Msg(msg.rows * eps, msg.pos)
        exact = ev.exact.message_batch(path, scaled).detach()
        lin = base + eps * torch.einsum("nbrd,brd->nb", msg.gather(g.pos), g.rows[0])
        errs.append(float((exact - lin).abs().max()) / eps)
    assert errs[2] < errs[1] * 0.2 + 1e-10 and errs[1] < errs[0] * 0.2 + 1e-10, errs
    assert errs[2] < 1e-2 * max(
        1.0, float(torch.einsum("nbrd,brd->nb", msg.gather(g.pos), g.rows[0]).abs().max())
    )


@pytest.mark.parametrize("path", PATHS[1:], ids=lambda p: "-".join(n.label for n in p))
def test_gradient_equals_autograd_of_composed_path(
    ev: AttributionEvaluator, path: tuple[Node, ...]
) -> None:
    g = ev.gradient(path)
    m = torch.zeros(
        1, B, len(g.pos), ev.cache.clean.final.shape[-1], dtype=torch.float64, requires_grad=True
    )
    with torch.enable_grad():
        out = propagate(Msg(m, g.pos), path, ev.cache)
        score = ev.metric(ev.exact._clean_row - out.gather((ev.exact.root_row,))[:, :, 0]).sum()
        (want,) = torch.autograd.grad(score, m)
    assert torch.allclose(g.rows, want, atol=1e-10)


def test_expand_uses_one_gradient_and_records_methods(ev: AttributionEvaluator) -> None:
    path = PATHS[2]
    cands = predecessors(path[0], ev.cache.shape)
    s = ev.expand(path, cands)
    assert s.methods[0] == "exact" and set(s.methods[1:]) == {"attribution"}
    exact_embed = ev.exact.expand(path, [cands[0]]).per_prompt[0]
    assert torch.allclose(s.per_prompt[0], exact_embed)
    g = ev.gradient(path)
    m = start_msg(cands[1:], ev.cache)
    want = ev.baseline() + torch.einsum("nbrd,brd->nb", m.gather(g.pos), g.rows[0]).mean(1)
    assert torch.allclose(s.mean[1:], want)
    one = torch.stack([ev.expand(path, [c]).per_prompt[0] for c in cands[1:6]])
    assert torch.allclose(one, s.per_prompt[1:6], atol=1e-12)


def test_gradient_cache_is_bounded_and_released(ev: AttributionEvaluator) -> None:
    small = AttributionEvaluator(ev.cache, ev.metric, ev.root, max_cached=3)
    for p in PATHS:
        small.gradient(p)
    assert small.n_cached == 3
    assert PATHS[-1] in small._grads
    small.release(PATHS[-1])
    assert PATHS[-1] not in small._grads and small.n_cached == 2
