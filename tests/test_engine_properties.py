"""Property tests over random small model shapes: exact scores match the hooks reference."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pathdb.graph import Node
from search.activations import ActivationCache
from search.exact import ExactEvaluator, build_metric
from tests import reference_hooks as ref
from tests.engine_helpers import prompts, random_path, tiny_model


@settings(max_examples=6, deadline=None)
@given(
    n_layers=st.integers(1, 3),
    n_heads=st.integers(1, 3),
    d_head=st.sampled_from([2, 4]),
    seq=st.integers(2, 5),
    seed=st.integers(0, 1000),
    patch_type=st.sampled_from(["zero", "counterfactual", "mean"]),
)
def test_exact_matches_reference_on_random_shapes(
    n_layers: int, n_heads: int, d_head: int, seq: int, seed: int, patch_type: str
) -> None:
    model = tiny_model(
        n_layers=n_layers, n_heads=n_heads, d_model=n_heads * d_head + 2, d_head=d_head, seed=seed
    )
    tokens, cf, target, cf_target = prompts(model, 2, seq, seed=seed)
    cache = ActivationCache.build(model, tokens, cf, patch_type)
    root = Node.final(n_layers, seq - 1)
    ev = ExactEvaluator(
        cache, build_metric(cache, "logit_difference", root, target, cf_target), root
    )
    rng = random.Random(seed)
    path = random_path(cache.shape, rng.randint(1, 4), rng)
    got = ev.score_paths([path]).per_prompt[0]
    clean, cfc = ref.full_cache(model, tokens), ref.full_cache(model, cf)
    want = ref.score_logit_difference(
        model, tokens, clean, cfc, patch_type, path, target, cf_target
    ).detach()
    scale = max(float(want.abs().max()), 1e-9)
    assert float((got - want).abs().max()) / scale <= 1e-4
