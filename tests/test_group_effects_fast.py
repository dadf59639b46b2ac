"""Group effects as activation patches (:meth:`MaskedEvaluator.group_values`): with every edge into
a receiver input corrupted the input reads its empty-circuit value and everything upstream stays
clean, so the effects are computed from each layer's clean residual stream, receivers stacked on
the batch axis, instead of one full edge-masked forward per receiver.

Checked against the edge-masked forwards themselves (every architecture family the masked forward
supports, every intervention, mixed prompt lengths, float64), against TransformerLens hooks written
here (the receiver input replaced by the counterfactual run's, grouped-query attention ungrouped),
and for the work it does (no layer below a receiver's is run again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import pathdb.evaluate.masked as masked
from pathdb.evaluate.groups import receiver_effects
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts
from tests.arch_models import FAMILIES, family_model
from tests.reference_hooks import group_effect
from tests.test_evaluate_arch import random_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

INTERVENTIONS = ("counterfactual", "zero", "mean", "mean-positional")


def mixed_prompts(model: Any) -> PromptSet:
    """Four random prompts of token lengths 6, 4, 6, 5 (three length groups)."""
    p = random_prompts(model, b=4, n=6, seed=3)
    lengths = torch.tensor([6, 4, 6, 5])
    return PromptSet(
        p.records, p.clean_tokens, p.cf_tokens, p.target_ids, p.cf_target_ids, lengths, "mixed"
    )


def masked_values(ev: MaskedEvaluator) -> tuple[float, np.ndarray]:
    """The full circuit's metric and, per receiver column, the metric with every edge into it
    corrupted: one edge-masked forward per circuit (the definition)."""
    real = ev.graph.real()
    masks = [real]
    for b in range(real.shape[1]):
        m = real.copy()
        m[:, b] = False
        masks.append(m)
    values = ev.metric_values(np.stack(masks))
    return float(values[0]), values[1:]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_group_values_are_the_masked_forwards(family: str) -> None:
    """GQA, parallel blocks, rotary, local attention, Gemma-2's post-norms: the same numbers as
    the edge-masked forwards for every intervention (float64, 1e-6 relative)."""
    model = family_model(family)
    prompts = mixed_prompts(model)
    for intervention in INTERVENTIONS:
        ev = MaskedEvaluator(model, prompts, "logit_difference", intervention)
        full, values = ev.group_values()
        want_full, want = masked_values(ev)
        assert full == pytest.approx(want_full, rel=1e-9, abs=1e-12)
        assert values == pytest.approx(want, rel=1e-6, abs=1e-9), intervention
        assert np.abs(values - full).max() > 1e-3  # the receivers' corruption does something


def test_memory_bound_splits_the_receivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a tiny memory budget each receiver runs alone: the same numbers."""
    model = family_model("llama3")
    ev = MaskedEvaluator(model, mixed_prompts(model), "logit_difference", "counterfactual")
    full, values = ev.group_values()
    monkeypatch.setattr(masked, "MEMORY_BUDGET", 1)
    assert ev.group_values()[1] == pytest.approx(values, rel=1e-12, abs=1e-12)
    assert ev.group_values()[0] == full


def test_toy_ioi_llama_effects_match_hooks() -> None:
    """The bundled grouped-query model: key and value inputs of query heads that share a
    key/value head are separate receivers."""
    model = load("toy-ioi-llama", device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    ev = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    effects = receiver_effects(ev)
    assert len(effects) == 4 * (3 * 4 + 1) + 1
    for receiver in ("a1.h2<k>", "a1.h3<k>", "a2.h0<q>", "a3.h1<v>", "m2", "logits"):
        want = group_effect(model, prompts, receiver)
        assert effects[receiver] == pytest.approx(want, abs=1e-4), receiver
    assert effects["a1.h2<k>"] != pytest.approx(effects["a1.h3<k>"], abs=1e-4)


def test_no_layer_below_a_receiver_runs_again() -> None:
    """Rows through each block: the clean and empty-circuit forwards, then the receivers of its
    own and the layers below it (``3 H + 1`` each) — nothing for receivers above it."""
    model = family_model("gpt2")
    prompts = random_prompts(model, b=3, n=6)
    ev = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    rows = dict.fromkeys(range(model.cfg.n_layers), 0)

    def count(act: torch.Tensor, hook: Any, layer: int) -> None:
        rows[layer] += act.shape[0]

    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
        (f"blocks.{layer}.hook_resid_pre", lambda a, hook, layer=layer: count(a, hook, layer))
        for layer in range(model.cfg.n_layers)
    ]
    with model.hooks(fwd_hooks=hooks):
        ev.group_values()
    per_layer = 3 * model.cfg.n_heads + 1
    assert rows == {layer: 3 * (2 + per_layer * (layer + 1)) for layer in rows}
