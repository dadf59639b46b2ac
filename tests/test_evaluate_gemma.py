"""Edge-masked evaluation and the attribution methods on Gemma-2 (norms after the sublayers),
checked against an independent TransformerLens hooks computation written here: a receiver that
loses heads of a layer reads ``ln1_post(S - sum of their (c - c'))`` for that layer's attention,
an MLP sender is its post-normed ``hook_mlp_out``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.prompts import PromptSet
from search.methods.atp_star import atp_star
from search.methods.eap import eap
from search.methods.eap_ig import eap_ig
from search.methods.edge_patching import edge_patching
from tests.arch_models import family_model
from tests.cli_process import pathdb
from tests.test_evaluate_arch import _ld, hooked_effect, random_prompts

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def gemma() -> Any:
    """Tiny random Gemma-2 (GQA 4/2, GeGLU, post-sublayer norms, soft-caps, local/global layers)."""
    return family_model("gemma2", seed=1)


def _cache(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    """Per-head outputs ``z @ W_O`` (``a{l}.h{h}``), ``input``, post-normed ``m{l}`` and each
    layer's pre-norm attention sum ``S{l}``, read back from ``ln1_post``'s own hooks
    (``normalized * scale``)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    out = {"input": cache["hook_embed"]}
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for h in range(model.cfg.n_heads):
            out[f"a{layer}.h{h}"] = z[:, :, h] @ model.blocks[layer].attn.W_O[h]
        out[f"m{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
        post = f"blocks.{layer}.ln1_post"
        out[f"S{layer}"] = cache[f"{post}.hook_normalized"] * cache[f"{post}.hook_scale"]
    return out


def _corrupted(model: Any, prompts: PromptSet, intervention: str) -> dict[str, Tensor]:
    """The sender values patched in: the counterfactual run's, or zeros."""
    clean = _cache(model, prompts.clean_tokens)
    if intervention == "zero":
        return {k: torch.zeros_like(v) for k, v in clean.items()}
    assert prompts.cf_tokens is not None
    return _cache(model, prompts.cf_tokens)


def hand_removed(model: Any, prompts: PromptSet, edges: list[str], intervention: str) -> float:
    """Mean ``ld(clean) - ld(patched)`` when ``edges`` (all into one receiver) lose their clean
    messages: embedding / MLP senders subtract ``clean - corrupted``, heads of one layer change
    that layer's residual contribution to ``ln1_post(S - sum (c - c'))``."""
    clean, corr = _cache(model, prompts.clean_tokens), _corrupted(model, prompts, intervention)
    dst = edges[0].split("->")[1]
    removed = torch.zeros_like(clean["input"])
    by_layer: dict[int, Tensor] = {}
    for e in edges:
        src, d = e.split("->")
        assert d == dst
        if src.startswith("a"):
            layer = int(src[1:].split(".")[0])
            change = clean[src] - corr[src]
            by_layer[layer] = by_layer.get(layer, torch.zeros_like(change)) + change
        else:
            removed = removed + clean[src] - corr[src]
    for layer, change in by_layer.items():
        post, s = model.blocks[layer].ln1_post, clean[f"S{layer}"]
        with torch.no_grad():
            removed = removed + post(s) - post(s - change)
    if dst == "logits":
        name, head = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    elif dst.startswith("m"):
        name, head = f"blocks.{int(dst[1:])}.hook_mlp_in", None
    else:
        layer_s, rest = dst[1:].split(".h")
        head_s, site = rest.rstrip(">").split("<")
        name, head = f"blocks.{int(layer_s)}.hook_{site}_input", int(head_s)

    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        if head is None:
            act -= removed
        else:
            act[:, :, head] -= removed
        return act

    hooks: list[tuple[str, Callable[..., Any]]] = [(name, hook)]
    return hooked_effect(model, prompts, hooks)


# single edges (a head's q, a k and a v edge, an MLP edge, the logits) and two heads of one
# layer removed from one receiver together (their changes mix inside ln1_post)
CIRCUITS = [
    ["a0.h1->a1.h2<q>"], ["a1.h3->a2.h0<k>"], ["input->a1.h1<v>"], ["m0->logits"],
    ["a0.h2->m1"], ["a0.h0->m1", "a0.h3->m1"], ["a1.h0->logits", "a1.h2->logits", "m0->logits"],
]  # fmt: skip


@pytest.mark.parametrize("intervention", ["counterfactual", "zero"])
def test_gemma2_masked_forward_matches_hooks(gemma: Any, intervention: str) -> None:
    """Full circuit = clean, empty = corrupted, hand-picked circuits = the hooks computation."""
    prompts = random_prompts(gemma)
    ev = MaskedEvaluator(gemma, prompts, "logit_difference", intervention)
    full = ev.graph.real()
    masks = [full, np.zeros_like(full)] + [full & ~ev.graph.mask(c) for c in CIRCUITS]
    got = ev.metric_values(np.stack(masks))
    assert abs(got[0]) < TOL
    if intervention == "counterfactual":
        assert prompts.cf_tokens is not None
        with torch.no_grad():
            clean = _ld(prompts, gemma(prompts.clean_tokens))
            corrupted = _ld(prompts, gemma(prompts.cf_tokens))
        assert abs(got[1] - float((clean - corrupted).mean())) < TOL
    want = [hand_removed(gemma, prompts, c, intervention) for c in CIRCUITS]
    assert min(abs(w) for w in want) > 1e-3  # every circuit carries real messages
    np.testing.assert_allclose(got[2:], want, atol=TOL, rtol=0)
    # the two heads' changes go through the norm together: not the sum of the single removals
    pair = [hand_removed(gemma, prompts, [e], intervention) for e in CIRCUITS[5]]
    assert abs(sum(pair) - got[2 + 5]) > 1e-4


def test_gemma2_eap_is_the_masked_forwards_derivative(gemma: Any) -> None:
    """EAP-IG with one step and plain AtP are EAP; EAP / eps and edge patching / eps agree as the
    corruption shrinks (clean + eps (counterfactual - clean)): EAP linearises the masked forward."""
    prompts = random_prompts(gemma, b=2, n=5, seed=2)
    ev = MaskedEvaluator(gemma, prompts, "logit_difference", "counterfactual")
    base = eap(ev).scores
    assert np.abs(base).max() > 0.1
    np.testing.assert_allclose(eap_ig(ev, 1).scores, base, atol=1e-9)
    plain_atp = atp_star(ev, qk_fix=False, grad_drop=False).scores  # AtP's linear estimate
    np.testing.assert_allclose(plain_atp, base, atol=1e-9)
    assert np.isfinite(atp_star(ev).scores).all()
    errors = []
    for eps in (0.01, 0.001):
        small = MaskedEvaluator(gemma, prompts, "logit_difference", "counterfactual")
        for g in small.groups:
            clean = small._senders(g.tokens)[0]
            g.corrupted = clean + eps * (g.corrupted - clean)
        lin, exact = eap(small).scores / eps, edge_patching(small).scores / eps
        errors.append(np.abs(lin - exact).max() / np.abs(lin).max())
    assert errors[1] < 0.2 * errors[0] and errors[1] < 1e-2


def test_cli_attribute_and_evaluate_on_a_gemma2_checkpoint(tmp_path: Path) -> None:
    """``pathdb attribute --method eap`` and ``pathdb evaluate`` (CLI), ``edge-patching`` (Python
    API) on a pathdb Gemma-2 toy directory (formerly refused): the full circuit is faithful."""
    from pathdb.store.db import open_store
    from search.methods.run import AttributeRequest, attribute
    from tests.test_architectures import save_toy_dir

    ckpt = str(save_toy_dir(tmp_path / "gemma2", "gemma2"))
    db = tmp_path / "s.duckdb"
    r = pathdb("attribute", "-m", ckpt, "--method", "eap", "--prompts", "toy-ioi-small",
               "--run-name", "eap", "-q", "--db", str(db), "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    req = AttributeRequest(
        method="edge-patching", model=ckpt, prompts="toy-ioi-small", device="cpu"
    )
    attribute(req, db, run_name="patch")
    r = pathdb("evaluate", "eap", "patch", "-p", "toy-ioi-small", "--no-paths", "--db", str(db),
               cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("CPR") == 2
    with open_store(db) as store:
        full = store.con.execute(
            "SELECT min(faithfulness), max(faithfulness), count(*) FROM evaluation_points p "
            "JOIN evaluations e USING (evaluation_id) WHERE p.n_edges = e.n_edges_total"
        ).fetchall()[0]
    assert full[2] >= 4 and full[0] == pytest.approx(1.0, abs=1e-4)
    assert full[1] == pytest.approx(1.0, abs=1e-4)
