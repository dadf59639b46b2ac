"""Exact path message patching agrees with an independent TransformerLens-hooks reference."""

from __future__ import annotations

import random

import pytest
import torch

from pathdb.graph import GraphError, Node, NodeKind, Site, predecessors
from search.activations import ActivationCache
from search.exact import ExactEvaluator, build_metric
from tests import reference_hooks as ref
from tests.engine_helpers import prompts, random_path, tiny_model

B, T = 3, 5


@pytest.fixture(scope="module")
def setup() -> dict:
    model = tiny_model(n_layers=3, n_heads=2, seed=1)
    tokens, cf, target, cf_target = prompts(model, B, T, seed=2)
    clean = ref.full_cache(model, tokens)
    cfc = ref.full_cache(model, cf)
    return dict(
        model=model, tokens=tokens, cf=cf, target=target, cf_target=cf_target, clean=clean, cfc=cfc
    )


def evaluator(s: dict, patch_type: str, positional: bool = True) -> ExactEvaluator:
    cache = ActivationCache.build(s["model"], s["tokens"], s["cf"], patch_type)
    root = Node.final(cache.shape.n_layers, T - 1 if positional else None)
    metric = build_metric(cache, "logit_difference", root, s["target"], s["cf_target"])
    return ExactEvaluator(cache, metric, root)


def reference(s: dict, patch_type: str, path: tuple[Node, ...]) -> torch.Tensor:
    return ref.score_logit_difference(
        s["model"], s["tokens"], s["clean"], s["cfc"], patch_type, path, s["target"], s["cf_target"]
    )


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    got, want = got.detach(), want.detach()
    scale = max(float(want.abs().max()), 1e-9)
    err = float((got - want).abs().max()) / scale
    assert err <= tol, f"relative error {err:.2e}: got {got.tolist()} want {want.tolist()}"


@pytest.mark.parametrize("patch_type", ["zero", "counterfactual", "mean"])
@pytest.mark.parametrize("positional", [True, False])
def test_random_paths_match_hooks_reference(setup: dict, patch_type: str, positional: bool) -> None:
    ev = evaluator(setup, patch_type, positional)
    rng = random.Random(hash((patch_type, positional)) % 1000)
    paths = [
        random_path(ev.cache.shape, rng.randint(1, 5), rng, positional=positional)
        for _ in range(12)
    ]
    scores = ev.score_paths(paths)
    for i, path in enumerate(paths):
        assert_close(scores.per_prompt[i], reference(setup, patch_type, path))


def test_every_node_kind_and_site(setup: dict) -> None:
    """One path per receiver kind/site, each fed by the embedding of the read position."""
    ev = evaluator(setup, "counterfactual")
    n = ev.cache.shape.n_layers
    final = Node.final(n, T - 1)
    receivers = [
        Node.mlp(1, 3),
        Node.attn(1, 1, Site.Q, 3),
        Node.attn(1, 0, Site.KV, 3, 1),
        Node.attn(1, 0, Site.K, 3, 2),
        Node.attn(1, 1, Site.V, 3, 0),
        Node.attn(1, None, Site.Q, 3),
        Node.attn(1, None, Site.KV, 3, 1),
        Node.attn(1, 1, Site.KV, 3, None),
        Node.attn(1, None, Site.V, 3, None),
    ]
    for r in receivers:
        tail = (r, Node.attn(n - 1, 0, Site.KV, T - 1, 3), final)
        read = r.kv_position if (r.is_kv and r.kv_position is not None) else r.position
        if r.kind is NodeKind.ATTN and r.is_kv and r.kv_position is None:
            read = 2
        for start in (Node.embed(read), Node.mlp(0, read), Node.attn(0, 1, Site.KV, read, 0)):
            path = (start, *tail)
            ev.cache.shape.validate_path(path)
            got = ev.score_paths([path]).per_prompt[0]
            assert_close(got, reference(setup, "counterfactual", path))


def test_single_node_is_direct_effect(setup: dict) -> None:
    """n -> FINAL equals patching n's output into the final residual only (hook on resid_post)."""
    model = setup["model"]
    ev = evaluator(setup, "counterfactual")
    L = model.cfg.n_layers
    for node in [Node.mlp(1, T - 1), Node.attn(2, 0, Site.Q, T - 1), Node.embed(T - 1)]:
        m = ref.start_message(model, setup["clean"], setup["cfc"], "counterfactual", node)

        def hook(x: torch.Tensor, hook: object, m: torch.Tensor = m) -> torch.Tensor:
            return x - m

        with torch.no_grad():
            logits = model.run_with_hooks(
                setup["tokens"], fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", hook)]
            )
            clean_logits = model(setup["tokens"])
        b = torch.arange(B)
        ld = lambda lg: lg[b, -1, setup["target"]] - lg[b, -1, setup["cf_target"]]  # noqa: E731, B023
        want = ld(clean_logits) - ld(logits)
        got = ev.expand((Node.final(L, T - 1),), [node]).per_prompt[0]
        assert_close(got, want, 1e-8)


def test_batched_equals_one_at_a_time(setup: dict) -> None:
    ev = evaluator(setup, "counterfactual")
    shape = ev.cache.shape
    for path in [
        (Node.final(shape.n_layers, T - 1),),
        (Node.attn(2, 1, Site.Q, T - 1), Node.final(shape.n_layers, T - 1)),
        (Node.attn(2, 0, Site.KV, T - 1, None), Node.final(shape.n_layers, T - 1)),
        (Node.mlp(1, 2), Node.attn(2, 0, Site.KV, T - 1, 2), Node.final(shape.n_layers, T - 1)),
    ]:
        cands = predecessors(path[0], shape, kv_sites=(Site.KV, Site.K, Site.V))
        batched = ev.expand(path, cands).per_prompt
        single = torch.stack([ev.expand(path, [c]).per_prompt[0] for c in cands])
        assert torch.allclose(
            batched, single, rtol=0, atol=1e-6 * max(1.0, float(single.abs().max()))
        )
        small = ExactEvaluator(ev.cache, ev.metric, ev.root, memory_budget=1)  # chunks of one
        assert torch.allclose(small.expand(path, cands).per_prompt, batched, atol=1e-9)


def test_invalid_paths_raise_clear_errors(setup: dict) -> None:
    ev = evaluator(setup, "zero")
    n = ev.cache.shape.n_layers
    final = Node.final(n, T - 1)
    with pytest.raises(GraphError, match="out of range"):
        ev.score_paths([(Node.embed(T + 3), final)])
    with pytest.raises(GraphError, match="after the query"):
        ev.score_paths(
            [(Node.attn(0, 0, Site.KV, 1, 3), Node.attn(1, 0, Site.KV, T - 1, 1), final)]
        )
    with pytest.raises(GraphError, match="head 9 out of range"):
        ev.expand((final,), [Node.attn(0, 9, Site.Q, T - 1)])
    with pytest.raises(GraphError, match="does not feed"):
        ev.expand((Node.mlp(0, 1), final), [Node.mlp(1, 1)])
    with pytest.raises(GraphError, match="root"):
        ev.score_paths([(Node.embed(1), Node.final(n, 1))])


def test_unsupported_architecture_is_refused() -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from search.activations import check_supported

    cfg = HookedTransformerConfig(
        n_layers=1,
        n_heads=2,
        d_model=8,
        d_head=4,
        d_mlp=16,
        d_vocab=10,
        n_ctx=8,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="alibi",
    )
    with pytest.raises(ValueError, match="alibi"):
        check_supported(HookedTransformer(cfg))
