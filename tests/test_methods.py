"""Attribution methods (search/methods) against independent computations written here with
TransformerLens hooks: EAP, edge patching, EAP-IG, AtP* (QK fix, GradDrop) and learned masks."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.export.eap import eap_spec
from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts
from search.methods.atp_star import atp_star
from search.methods.eap import eap
from search.methods.eap_ig import eap_ig
from search.methods.edge_patching import edge_patching
from search.methods.learned_mask import learned_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def model() -> Any:
    """toy-ioi-2l in float64, so independent implementations agree far below 1e-5."""
    return load("toy-ioi-2l", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def prompts(model: Any) -> PromptSet:
    return load_prompts("toy-ioi-small", model).select([0, 1, 2, 3])


@pytest.fixture(scope="module")
def ev(model: Any, prompts: PromptSet) -> MaskedEvaluator:
    return MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")


# ------------------------------------------------------------------ independent pieces
def _ld(model: Any, prompts: PromptSet, logits: Tensor) -> Tensor:
    """Per-prompt logit difference at the last position."""
    idx = torch.arange(len(prompts))
    last = logits[:, -1]
    return last[idx, prompts.target_ids] - last[idx, prompts.cf_target_ids]


def _senders(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    """Sender outputs by EAP-IG name (``input``, ``a{l}.h{h}`` = z @ W_O, ``m{l}``), ``[b, n, D]``."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    out = {"input": cache["hook_embed"]}
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for h in range(model.cfg.n_heads):
            out[f"a{layer}.h{h}"] = z[:, :, h] @ model.blocks[layer].attn.W_O[h]
        out[f"m{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def _receiver_hook(model: Any, dst: str) -> tuple[str, int | None]:
    """The TransformerLens hook (and head index) of an EAP-IG receiver name."""
    if dst == "logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    if dst.startswith("m"):
        return f"blocks.{int(dst[1:])}.hook_mlp_in", None
    layer, rest = dst[1:].split(".h")
    head, site = rest.rstrip(">").split("<")
    return f"blocks.{int(layer)}.hook_{site}_input", int(head)


def _run(model: Any, tokens: Tensor, hooks: list[tuple[str, Callable[..., Any]]]) -> Tensor:
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        return model.run_with_hooks(tokens, fwd_hooks=hooks)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)


def _edge_removed(model: Any, prompts: PromptSet, edge: str) -> float:
    """Mean metric drop ``ld(clean) - ld(patched)`` with only ``edge`` given its counterfactual message."""
    src, dst = edge.split("->")
    diff = _senders(model, prompts.clean_tokens)[src] - _senders(model, prompts.cf_tokens)[src]
    name, head = _receiver_hook(model, dst)

    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        if head is None:
            act -= diff
        else:
            act[:, :, head] -= diff
        return act

    with torch.no_grad():
        clean = _ld(model, prompts, model(prompts.clean_tokens))
        patched = _ld(model, prompts, _run(model, prompts.clean_tokens, [(name, hook)]))
    return float((clean - patched).mean())


def _reference_eap(model: Any, prompts: PromptSet) -> np.ndarray:
    """EAP by its definition: ``(corrupt_f - clean_f) . d metric / d input_b`` from one clean
    forward with gradient-retaining hooks at every receiver and one backward."""
    spec = eap_spec(model.cfg.n_layers, model.cfg.n_heads)
    clean, cf = _senders(model, prompts.clean_tokens), _senders(model, prompts.cf_tokens)
    seen: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> Tensor:
        act.retain_grad()
        seen[hook.name] = act
        return act

    def leaf(act: Tensor, hook: Any) -> Tensor:
        return act.detach().requires_grad_(True)

    names = {_receiver_hook(model, dst)[0] for dst in spec.backward}
    hook_list = [("hook_embed", leaf)] + [(name, keep) for name in names]
    with torch.enable_grad():
        logits = _run(model, prompts.clean_tokens, hook_list)
        metric = -_ld(model, prompts, logits)  # ld(clean) - ld(x): its gradient is -d ld
        metric.sum().backward()
    scores = np.zeros((len(spec.forward), len(spec.backward)))
    for edge, f, b in spec.edges:
        src, dst = edge.split("->")
        name, head = _receiver_hook(model, dst)
        g = seen[name].grad
        grad = g if head is None else g[:, :, head]
        value = ((cf[src] - clean[src]) * grad).sum() / len(prompts)
        scores[f, b] = float(value.detach())
    return scores


# ------------------------------------------------------------------ EAP and edge patching
def test_eap_equals_forward_backward_hooks(
    model: Any, prompts: PromptSet, ev: MaskedEvaluator
) -> None:
    ours = eap(ev).scores
    ref = _reference_eap(model, prompts)
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_edge_patching_of_one_edge_equals_masked_forward(
    model: Any, prompts: PromptSet, ev: MaskedEvaluator
) -> None:
    scores = edge_patching(ev).scores
    index = ev.graph.spec.edge_index
    for edge in ("a0.h1->a1.h2<k>", "input->m0", "a1.h0->logits", "m0->a1.h0<v>"):
        assert scores[index[edge]] == pytest.approx(_edge_removed(model, prompts, edge), abs=1e-9)


def test_eap_and_edge_patching_agree_as_corruption_shrinks(model: Any, prompts: PromptSet) -> None:
    errors = []
    ref: np.ndarray | None = None
    for eps in (0.3, 0.03, 0.003):
        small = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
        for g in small.groups:  # corrupted = clean + eps * (counterfactual - clean)
            clean = small._senders(g.tokens)[0]
            g.corrupted = clean + eps * (g.corrupted - clean)
        lin = eap(small).scores / eps
        exact = edge_patching(small).scores / eps
        ref = lin if ref is None else ref
        np.testing.assert_allclose(lin, ref, atol=1e-8)  # eap is linear in the corruption
        errors.append(np.abs(lin - exact).max() / np.abs(lin).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


# ------------------------------------------------------------------ EAP-IG
def test_eap_ig_one_step_is_eap_and_more_steps_converge(ev: MaskedEvaluator) -> None:
    base = eap(ev).scores
    np.testing.assert_allclose(eap_ig(ev, 1).scores, base, atol=1e-9)
    ref = eap_ig(ev, 24).scores
    errors = [np.abs(eap_ig(ev, s).scores - ref).max() for s in (1, 2, 4, 8)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.25 * errors[0]
    with pytest.raises(ValueError, match="ig-steps"):
        eap_ig(ev, 0)


# ------------------------------------------------------------------ AtP*
def _key_patched(model: Any, prompts: PromptSet, layer: int, head: int) -> float:
    """Activation patching of one head's whole key input to its counterfactual value."""
    model.set_use_split_qkv_input(True)
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.cf_tokens)
    model.set_use_split_qkv_input(False)
    cf = cache[f"blocks.{layer}.hook_k_input"][:, :, head]

    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        act[:, :, head] = cf
        return act

    with torch.no_grad():
        clean = _ld(model, prompts, model(prompts.clean_tokens))
        patched = _ld(
            model,
            prompts,
            _run(model, prompts.clean_tokens, [(f"blocks.{layer}.hook_k_input", hook)]),
        )
    return float((clean - patched).mean())


def test_atp_star_qk_fix_recovers_saturated_key(model: Any, prompts: PromptSet) -> None:
    saturated = copy.deepcopy(model)
    attn = saturated.blocks[1].attn
    with torch.no_grad():  # sharpen every layer-1 query: the softmax saturates
        attn.W_Q.mul_(20)
        attn.b_Q.mul_(20)
    ev = MaskedEvaluator(saturated, prompts, "logit_difference", "counterfactual")
    plain = atp_star(ev, qk_fix=False, grad_drop=False).node_scores
    fixed = atp_star(ev, qk_fix=True, grad_drop=False).node_scores
    assert plain is not None and fixed is not None
    # head 1: the key effect is invisible to the gradient and recovered exactly by the recomputation
    true1 = _key_patched(saturated, prompts, 1, 1)
    assert abs(plain["a1.h1<k>"]) < 1e-6 * abs(true1)
    assert fixed["a1.h1<k>"] == pytest.approx(true1, rel=1e-3)
    # head 2: a large effect plain AtP puts near zero; the QK fix finds a large share of it
    true2 = _key_patched(saturated, prompts, 1, 2)
    assert true2 > 1.0 and abs(plain["a1.h2<k>"]) < 0.01 * true2
    assert fixed["a1.h2<k>"] > 0.2 * true2
    # edge level: the q/k edges change, the others stay AtP's linear estimates
    e_plain = atp_star(ev, qk_fix=False, grad_drop=False).scores
    e_fixed = atp_star(ev, qk_fix=True, grad_drop=False).scores
    idx = ev.graph.spec.edge_index
    assert e_plain[idx["m0->a1.h2<v>"]] == pytest.approx(e_fixed[idx["m0->a1.h2<v>"]])
    assert abs(e_fixed[idx["m0->a1.h2<k>"]] - e_plain[idx["m0->a1.h2<k>"]]) > 1e-3
    np.testing.assert_allclose(e_plain, eap(ev).scores, atol=1e-9)  # plain AtP on edges is EAP


def _grad_drop_reference(model: Any, prompts: PromptSet) -> dict[str, float]:
    """GradDrop node scores by the paper's definition: for each layer l, AtP with the gradient
    through block l's outputs zeroed, |.| per prompt, summed over l / (L - 1), mean over prompts."""
    n_layers = model.cfg.n_layers
    clean, cf = _senders(model, prompts.clean_tokens), _senders(model, prompts.cf_tokens)
    with torch.no_grad():
        z_clean = model.run_with_cache(prompts.clean_tokens)[1]
        z_cf = model.run_with_cache(prompts.cf_tokens)[1]
    totals: dict[str, Tensor] = {}
    for drop in range(n_layers):
        acts: dict[str, Tensor] = {}

        def grab(name: str, acts: dict[str, Tensor] = acts) -> Callable[..., Tensor]:
            def hook(act: Tensor, hook: Any) -> Tensor:
                act = act.detach().requires_grad_(True) if name == "hook_embed" else act
                act.retain_grad()
                acts[name] = act
                return act

            return hook

        hooks = [("hook_embed", grab("hook_embed"))]
        for layer in range(n_layers):
            hooks += [(f"blocks.{layer}.attn.hook_z", grab(f"z{layer}")),
                      (f"blocks.{layer}.hook_mlp_out", grab(f"m{layer}"))]  # fmt: skip
        hooks += [(f"blocks.{drop}.hook_attn_out", lambda a, hook: a.detach()),
                  (f"blocks.{drop}.hook_mlp_out", lambda a, hook: a.detach())]  # fmt: skip
        with torch.enable_grad():
            logits = model.run_with_hooks(prompts.clean_tokens, fwd_hooks=hooks)
            (-_ld(model, prompts, logits)).sum().backward()

        def grad(name: str, acts: dict[str, Tensor] = acts) -> Tensor:
            g = acts[name].grad
            return torch.zeros_like(acts[name]) if g is None else g

        per = {"input": ((cf["input"] - clean["input"]) * grad("hook_embed")).sum((1, 2))}
        for layer in range(n_layers):
            gz = grad(f"z{layer}")  # head output = z @ W_O, so (dz) . dM/dz = (d out) . dM/d out
            dz = z_cf[f"blocks.{layer}.attn.hook_z"] - z_clean[f"blocks.{layer}.attn.hook_z"]
            for h in range(model.cfg.n_heads):
                per[f"a{layer}.h{h}"] = (dz[:, :, h] * gz[:, :, h]).sum((1, 2))
            per[f"m{layer}"] = ((cf[f"m{layer}"] - clean[f"m{layer}"]) * grad(f"m{layer}")).sum(
                (1, 2)
            )
        for k, v in per.items():
            totals[k] = totals.get(k, torch.zeros(())) + v.abs().detach() / (n_layers - 1)
    return {k: float(v.mean()) for k, v in totals.items()}


def test_atp_star_grad_drop_follows_the_paper(
    model: Any, prompts: PromptSet, ev: MaskedEvaluator
) -> None:
    dropped = atp_star(ev, qk_fix=False, grad_drop=True)
    plain = atp_star(ev, qk_fix=False, grad_drop=False)
    assert dropped.node_scores is not None and plain.node_scores is not None
    ref = _grad_drop_reference(model, prompts)
    for name, value in ref.items():
        assert dropped.node_scores[name] == pytest.approx(value, abs=1e-8), name
    assert all(v >= 0 for v in dropped.scores.ravel())
    changed = [n for n in ref if abs(dropped.node_scores[n] - abs(plain.node_scores[n])) > 1e-3]
    assert changed  # GradDrop is not |AtP|: cancellations through later layers are undone


# ------------------------------------------------------------------ learned masks
def test_learned_mask_penalty_sparsity_and_seed(ev: MaskedEvaluator) -> None:
    real = ev.graph.real()
    m_full, m_empty = ev.metric_values(np.stack([real, ~real]))
    full = learned_mask(ev, penalty=0.0, steps=8, lr=0.3)
    assert full.in_graph is not None and full.in_graph.sum() == real.sum()
    faith = (ev.metric_values(full.in_graph)[0] - m_empty) / (m_full - m_empty)
    assert faith == pytest.approx(1.0, abs=1e-9)
    kept = []
    for pen in (0.5, 4.0):
        res = learned_mask(ev, penalty=pen, steps=15, lr=0.3)
        assert res.in_graph is not None
        kept.append(int(res.in_graph.sum()))
    assert int(real.sum()) > kept[0] > kept[1]
    again = learned_mask(ev, penalty=0.5, steps=15, lr=0.3)
    other = learned_mask(ev, penalty=0.5, steps=15, lr=0.3, seed=1)
    first = learned_mask(ev, penalty=0.5, steps=15, lr=0.3)
    np.testing.assert_array_equal(again.scores, first.scores)
    assert not np.array_equal(other.scores, first.scores)
