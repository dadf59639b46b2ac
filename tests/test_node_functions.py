"""Node functions on clean inputs reproduce the model's own activations (TransformerLens cache)."""

from __future__ import annotations

import pytest
import torch

from pathdb.graph import GraphError, Node, Site, predecessors
from search.activations import ActivationCache
from search.exact import plan_extension
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
        assert torch.allclose(
            run.head_out[L].sum(2), tl[f"blocks.{L}.hook_attn_out"] - attn.b_O, atol=1e-10
        )
        assert torch.allclose(run.mlp_out[L], tl[f"blocks.{L}.hook_mlp_out"], atol=1e-10)
    assert torch.allclose(run.final, tl["blocks.1.hook_resid_post"])
    # start messages equal the reference sender outputs, per kind and site
    for node in [
        Node.embed(3),
        Node.mlp(1, 4),
        Node.attn(0, 2, Site.Q, 5),
        Node.attn(1, 1, Site.KV, 5, 2),
        Node.attn(1, None, Site.Q, 2),
        Node.attn(0, None, Site.K, 4, 4),
        Node.attn(1, 0, Site.KV, 5, None),
        Node.mlp(0, None),
        Node.attn(1, 1, Site.Q, None),
    ]:
        got = cache.start_messages([node])[0]
        want = ref.start_message(model, tl, ref.full_cache(model, cf), "counterfactual", node)
        want = want if node.position is None else want[:, node.position]
        assert torch.allclose(got, want, atol=1e-10), node.label


def test_zero_message_gives_zero_output() -> None:
    model = tiny_model(n_layers=2, n_heads=2, seed=7)
    tokens, _, _, _ = prompts(model, 2, 5, seed=8)
    cache = ActivationCache.build(model, tokens, patch_type="zero")
    for node in [
        Node.mlp(1, 3),
        Node.attn(1, 0, Site.Q, 4),
        Node.attn(1, 1, Site.KV, 4, 2),
        Node.attn(1, None, Site.V, 4, None),
        Node.attn(0, 0, Site.KV, None, None),
    ]:
        rows = tuple(range(5))
        out = step(node, Msg(torch.zeros(1, 2, 5, 16, dtype=torch.float64), rows), cache)
        assert float(out.rows.detach().abs().max()) <= 1e-12, node.label


def test_candidate_plan_gathers_the_reference_start_messages() -> None:
    """The vectorised candidate plan (validation + bank rows) picks each candidate's own start
    message, for every predecessor family; the default family is one zero-copy bank slice."""
    model = tiny_model(n_layers=2, n_heads=3, seed=9)
    tokens, cf, _, _ = prompts(model, 2, 6, seed=10)
    cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    tl, tl_cf = ref.full_cache(model, tokens), ref.full_cache(model, cf)
    shape = cache.shape
    receivers = [
        Node.final(2, 5),
        Node.mlp(1, 3),
        Node.attn(1, 2, Site.KV, 5, None),
        Node.final(2, None),
    ]
    for receiver in receivers:
        for heads, sites in [(True, (Site.KV,)), (False, (Site.KV,)), (True, (Site.K, Site.V))]:
            cands = predecessors(receiver, shape, heads=heads, kv_sites=sites)
            got = torch.zeros(len(cands), 2, 6, 16, dtype=torch.float64)
            for grp in plan_extension(cache, receiver, cands):
                msg = grp.messages(cache)
                idx = range(len(cands)) if grp.index is None else grp.index.tolist()
                got[list(idx)] = msg.dense(6)
            for i, c in enumerate(cands):
                want = ref.start_message(model, tl, tl_cf, "counterfactual", c)
                if c.position is not None:
                    dense = torch.zeros_like(want)
                    dense[:, c.position] = want[:, c.position]
                    want = dense
                assert torch.allclose(got[i], want, atol=1e-10), (receiver.label, c.label)
    cands = predecessors(Node.final(2, 5), shape)
    (grp,) = plan_extension(cache, Node.final(2, 5), cands)
    assert grp.rows.tolist() == list(range(len(cands)))
    assert grp.messages(cache).rows.data_ptr() == cache.bank(5).messages.data_ptr()


def test_candidate_plan_names_the_bad_candidate() -> None:
    model = tiny_model(n_layers=2, n_heads=2, seed=11)
    tokens, _, _, _ = prompts(model, 2, 5, seed=12)
    cache = ActivationCache.build(model, tokens, patch_type="zero")
    receiver = Node.mlp(1, 4)
    good = predecessors(receiver, cache.shape)
    assert len(good) > 8  # the vectorised path, not the small-list loop
    bad_cases = [
        (Node.mlp(1, 4), "does not feed"),
        (Node.attn(0, 0, Site.KV, 4, 5), "after the query"),
        (Node.attn(0, 7, Site.Q, 4), "head 7 out of range"),
        (Node.embed(3), "does not feed"),
        (Node.final(2, 4), "FINAL cannot be prepended"),
    ]
    for bad, fragment in bad_cases:
        with pytest.raises(GraphError, match=fragment):
            plan_extension(cache, receiver, [*good, bad])
        with pytest.raises(GraphError, match=fragment):
            plan_extension(cache, receiver, [bad])
