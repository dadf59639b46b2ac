"""Edge-masked evaluation and the attribution methods on the engine's other architectures
(grouped-query attention, parallel blocks, rotary positions, soft-caps, local attention), each
checked against an independent TransformerLens hooks computation written here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.prompts import PromptRecord, PromptSet
from search.methods.atp_star import atp_star
from search.methods.eap import eap
from tests.arch_models import family_model
from tests.cli_process import pathdb
from tests.test_methods import _reference_eap, _senders

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def random_prompts(model: Any, b: int = 3, n: int = 6, seed: int = 0) -> PromptSet:
    """``b`` random clean / counterfactual token rows of length ``n`` with random targets."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean, cf = torch.randint(vocab, (b, n), generator=g), torch.randint(vocab, (b, n), generator=g)
    target = torch.randint(vocab, (b,), generator=g)
    cf_target = (target + 1) % vocab
    records = [
        PromptRecord("c", "x", "t", "u", None, clean[i].tolist(), [], cf[i].tolist(),
                     int(target[i]), int(cf_target[i]), i + 1)
        for i in range(b)
    ]  # fmt: skip
    return PromptSet(records, clean, cf, target, cf_target, torch.full((b,), n), "random")


def _ld(prompts: PromptSet, logits: Tensor) -> Tensor:
    """Per-prompt logit difference at the last position."""
    idx = torch.arange(len(prompts))
    last = logits[:, -1]
    assert prompts.cf_target_ids is not None
    return last[idx, prompts.target_ids] - last[idx, prompts.cf_target_ids]


def hooked_effect(
    model: Any, prompts: PromptSet, hooks: list[tuple[str, Any]], *, ungroup: bool = True
) -> float:
    """Mean drop of the logit difference when ``hooks`` run on the clean prompts, with split q/k/v
    and MLP inputs (and, with ``ungroup``, one k / v input per query head) switched on."""
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    if ungroup:
        model.set_ungroup_grouped_query_attention(True)
    try:
        with torch.no_grad():
            clean = _ld(prompts, model(prompts.clean_tokens))
            patched = _ld(prompts, model.run_with_hooks(prompts.clean_tokens, fwd_hooks=hooks))
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
        if ungroup:
            model.set_ungroup_grouped_query_attention(False)
    return float((clean - patched).mean())


def _diff(model: Any, prompts: PromptSet, src: str) -> Tensor:
    """What removing sender ``src``'s edge subtracts from its receiver: ``clean - counterfactual``."""
    assert prompts.cf_tokens is not None
    return _senders(model, prompts.clean_tokens)[src] - _senders(model, prompts.cf_tokens)[src]


def _key_edge_hooks(
    model: Any, layer: int, head: int, diff: Tensor
) -> list[tuple[str, Callable[..., Any]]]:
    """Grouped model, by hand: only head ``head``'s key reads ``resid_pre - diff`` (its kv-group
    partner keeps the clean key): recompute that head's pattern from its rotated query and a key
    computed from the weights, TL's rotary tables and a causal softmax."""
    attn = model.blocks[layer].attn
    seen: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        seen[hook.name.split(".")[-1]] = act

    def pattern(act: Tensor, hook: Any) -> Tensor:
        x = model.blocks[layer].ln1(seen["hook_resid_pre"] - diff)
        k = x @ attn.W_K[head] + attn.b_K[head]  # [b, n, dh]
        k = attn.apply_rotary(k[:, :, None])[:, :, 0]
        q = seen["hook_rot_q"][:, :, head]
        scores = q @ k.transpose(-1, -2) / attn.attn_scale
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        act = act.clone()
        act[:, head] = scores.softmax(-1)
        return act

    return [
        (f"blocks.{layer}.hook_resid_pre", keep),
        (f"blocks.{layer}.attn.hook_rot_q", keep),
        (f"blocks.{layer}.attn.hook_pattern", pattern),
    ]


def hand_edge_metric(model: Any, prompts: PromptSet, edge: str) -> float:
    """Mean ``ld(clean) - ld(patched)`` with only ``edge`` given its counterfactual message, on the
    model as configured (grouped attention stays grouped)."""
    src, dst = edge.split("->")
    diff = _diff(model, prompts, src)
    cfg = model.cfg
    hooks: list[tuple[str, Callable[..., Any]]]
    if dst == "logits" or dst.startswith("m"):
        name = (
            f"blocks.{cfg.n_layers - 1}.hook_resid_post"
            if dst == "logits"
            else f"blocks.{int(dst[1:])}.hook_mlp_in"
        )
        hooks = [(name, lambda act, hook: act - diff)]
    else:
        layer_s, rest = dst[1:].split(".h")
        head_s, site = rest.rstrip(">").split("<")
        layer, head = int(layer_s), int(head_s)
        if site == "k":
            hooks = _key_edge_hooks(model, layer, head, diff)
        else:
            assert site == "q"

            def q_hook(act: Tensor, hook: Any) -> Tensor:
                act = act.clone()
                act[:, :, head] -= diff
                return act

            hooks = [(f"blocks.{layer}.hook_q_input", q_hook)]
    return hooked_effect(model, prompts, hooks, ungroup=False)


# One q-edge, one k-edge of head 1 (kv group {0, 1} of the 4 / 2 grouped model), edges into an
# MLP (parallel: from an earlier layer) and into the logits.
CASES = {
    "llama3": ["m0->logits", "a0.h2->a1.h3<q>", "a0.h1->a2.h1<k>", "input->a2.h0<k>"],
    "neox": ["a1.h2->logits", "input->a1.h2<q>", "a0.h3->m1", "m0->m2"],
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_masked_forward_matches_hooks(family: str) -> None:
    """Full circuit = clean, empty = corrupted, single edges = the hand computation (1e-5)."""
    model = family_model(family, seed=1)
    prompts = random_prompts(model)
    ev = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    full = ev.graph.real()
    assert prompts.cf_tokens is not None
    with torch.no_grad():
        clean = _ld(prompts, model(prompts.clean_tokens))
        corrupted = _ld(prompts, model(prompts.cf_tokens))
    edges = CASES[family]
    masks = [full, np.zeros_like(full)] + [full & ~ev.graph.mask([e]) for e in edges]
    got = ev.metric_values(np.stack(masks))
    assert abs(got[0]) < TOL
    assert abs(got[1] - float((clean - corrupted).mean())) < TOL
    want = [hand_edge_metric(model, prompts, e) for e in edges]
    assert max(abs(w) for w in want) > 1e-2  # the edges carry real messages
    np.testing.assert_allclose(got[2:], want, atol=TOL, rtol=0)
    if family == "neox":  # parallel blocks: a layer's heads do not feed its own MLP
        assert "a1.h0->m1" not in ev.graph.spec.edge_index
    else:  # kv-group partners are separate edges with different effects
        other = ev.metric_values(full & ~ev.graph.mask(["a0.h1->a2.h0<k>"]))[0]
        assert abs(other - got[4]) > 1e-4


def test_eap_on_grouped_query_attention_equals_forward_backward_hooks() -> None:
    """EAP on Llama-3 (GQA 4/2, rotary, RMSNorm, SwiGLU) = test_methods' definition computed on
    the model with key/value heads ungrouped (one k and v input per query head)."""
    model = family_model("llama3", seed=2)
    prompts = random_prompts(model, seed=3)
    ours = eap(MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")).scores
    model.set_ungroup_grouped_query_attention(True)
    try:
        ref = _reference_eap(model, prompts)
    finally:
        model.set_ungroup_grouped_query_attention(False)
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def _qk_fixed_reference(model: Any, prompts: PromptSet, edge: str) -> float:
    """AtP*'s QK-fixed estimate of a q/k edge by its definition, from TL's own attention:
    ``mean over prompts of sum (A' - A) * d(-ld) / dA`` at the receiving head, with ``A'`` the
    head's pattern when only that head's q (k) input loses the sender's message."""
    src, dst = edge.split("->")
    layer_s, rest = dst[1:].split(".h")
    head_s, site = rest.rstrip(">").split("<")
    layer, head = int(layer_s), int(head_s)
    diff = _diff(model, prompts, src)
    name = f"blocks.{layer}.attn.hook_pattern"
    seen: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> Tensor:
        act.retain_grad()
        seen["A"] = act
        return act

    def patch(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        act[:, :, head] -= diff
        return act

    def grab(act: Tensor, hook: Any) -> None:
        seen["A'"] = act.detach()

    model.set_use_split_qkv_input(True)
    model.set_ungroup_grouped_query_attention(True)  # one k input per query head
    try:
        with torch.enable_grad():
            loss = -_ld(
                prompts, model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(name, keep)])
            )
            loss.sum().backward()
        a, grad = seen["A"].detach(), seen["A"].grad
        assert grad is not None
        with torch.no_grad():
            model.run_with_hooks(
                prompts.clean_tokens,
                fwd_hooks=[(f"blocks.{layer}.hook_{site}_input", patch), (name, grab)],
            )
    finally:
        model.set_use_split_qkv_input(False)
        model.set_ungroup_grouped_query_attention(False)
    change = (seen["A'"] - a)[:, head] * grad[:, head]
    return float(change.sum() / len(prompts))


def test_atp_star_qk_fix_uses_the_models_attention() -> None:
    """Rotary positions, a score soft-cap, sliding windows and GQA (Mistral + cap): the QK-fixed
    q- and k-edge estimates equal the pattern change TL's own attention computes."""
    model = family_model("mistral", seed=4, attn_scores_soft_cap=3.0)
    prompts = random_prompts(model, n=7, seed=5)
    ev = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    scores = atp_star(ev, grad_drop=False).scores
    index = ev.graph.spec.edge_index
    edges = ["a0.h2->a1.h3<q>", "input->a2.h1<k>", "m0->a1.h0<k>"]
    got = [scores[index[e]] for e in edges]
    want = [_qk_fixed_reference(model, prompts, e) for e in edges]
    assert max(abs(w) for w in want) > 1e-3
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_cli_attribute_and_evaluate_on_toy_ioi_llama(tmp_path: Path) -> None:
    """``pathdb attribute --method eap`` then ``pathdb evaluate`` on the bundled GQA toy."""
    db = str(tmp_path / "s.duckdb")
    common = ["--db", db, "--device", "cpu"]
    r = pathdb("attribute", "-m", "toy-ioi-llama", "--method", "eap", "--prompts",
               "toy-ioi-small", "--run-name", "e", "-q", *common, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = pathdb("evaluate", "e", "-p", "toy-ioi-small", "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "CPR" in r.stdout and "of 479" in r.stdout


def test_parallel_model_edge_run_stores_and_evaluates_its_own_graph(tmp_path: Path) -> None:
    """An ``eap`` edge run of a GPT-NeoX checkpoint stores only real edges (no ``a{l}.h{i} ->
    m{l}``) and evaluates to full faithfulness with every edge kept."""
    from pathdb.evaluate.curves import evaluate_run
    from pathdb.evaluate.session import setup
    from pathdb.store.db import open_store
    from search.methods.run import AttributeRequest, attribute
    from tests.test_architectures import save_toy_dir

    ckpt = save_toy_dir(tmp_path / "neox", "neox")
    db = tmp_path / "s.duckdb"
    req = AttributeRequest(method="eap", model=str(ckpt), prompts="toy-ioi-small", device="cpu")
    attribute(req, db, run_name="e")
    with open_store(db) as store:
        names = [r[0] for r in store.con.execute("SELECT edge FROM edge_scores").fetchall()]
        s = setup(store.con, "e", prompts="toy-ioi-small", device="cpu")
        ev = evaluate_run(
            store.con, "e", s.evaluator, prompts=s.prompts, heldout=False, paths=False
        )
    assert len(names) == s.evaluator.graph.n_edges and "a1.h0->m1" not in names
    assert ev.n_edges_total == len(names)
    full = [p.faithfulness for p in ev.points if p.n_edges == ev.n_edges_total]
    assert full and all(abs(f - 1.0) < 1e-4 for f in full)  # float32 checkpoint
