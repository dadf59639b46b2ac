"""Node functions on clean inputs reproduce the model's own activations (TransformerLens cache)."""

from __future__ import annotations

import torch

from pathdb.graph import Node, Site
from search.activations import ActivationCache
from search.node_functions import Msg, step
from tests import reference_hooks as ref
from tests.engine_helpers import prompts, tiny_model


def test_cached_activations_match_transformer_lens() -> None:
    model = tiny_model(n_layers=2, n_heads=3, seed=5)
    tokens, cf, _, _ = prompts(model, 2, 6, seed=6)
    cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    tl = ref.full_cache(model, tokens)
    run = cache.clean
    for L in range(2):
        attn = model.blocks[L].attn
        assert torch.allclose(run.q[L], tl[f"blocks.{L}.attn.hook_q"], atol=1e-10)
        assert torch.allclose(run.k[L], tl[f"blocks.{L}.attn.hook_k"], atol=1e-10)
        assert torch.allclose(run.v[L], tl[f"blocks.{L}.attn.hook_v"], atol=1e-10)
        assert torch.allclose(run.pattern[L], tl[f"blocks.{L}.attn.hook_pattern"], atol=1e-10)
        assert torch.allclose(run.head_out[L].sum(2), tl[f"blocks.{L}.hook_attn_out"] - attn.b_O, atol=1e-10)
        assert torch.allclose(run.mlp_out[L], tl[f"blocks.{L}.hook_mlp_out"], atol=1e-10)
    assert torch.allclose(run.final, tl["blocks.1.hook_resid_post"])
    # start messages equal the reference sender outputs, per kind and site
    for node in [Node.embed(3), Node.mlp(1, 4), Node.attn(0, 2, Site.Q, 5), Node.attn(1, 1, Site.KV, 5, 2),
                 Node.attn(1, None, Site.Q, 2), Node.attn(0, None, Site.K, 4, 4), Node.attn(1, 0, Site.KV, 5, None),
                 Node.mlp(0, None), Node.attn(1, 1, Site.Q, None)]:
        got = cache.start_messages([node])[0]
        want = ref.start_message(model, tl, ref.full_cache(model, cf), "counterfactual", node)
        want = want if node.position is None else want[:, node.position]
        assert torch.allclose(got, want, atol=1e-10), node.label


def test_zero_message_gives_zero_output() -> None:
    model = tiny_model(n_layers=2, n_heads=2, seed=7)
    tokens, _, _, _ = prompts(model, 2, 5, seed=8)
    cache = ActivationCache.build(model, tokens, patch_type="zero")
    for node in [Node.mlp(1, 3), Node.attn(1, 0, Site.Q, 4), Node.attn(1, 1, Site.KV, 4, 2),
                 Node.attn(1, None, Site.V, 4, None), Node.attn(0, 0, Site.KV, None, None)]:
        rows = tuple(range(5))
        out = step(node, Msg(torch.zeros(1, 2, 5, 16, dtype=torch.float64), rows), cache)
        assert float(out.rows.abs().max()) <= 1e-12, node.label
