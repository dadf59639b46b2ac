"""Independent slow reference for path message patching on any supported architecture, with TL hooks.

Extends :mod:`tests.reference_hooks` (GPT-2 only) to rotary positions, RMSNorm, gated MLPs,
grouped-/multi-query attention, parallel blocks, soft-caps, local attention and Gemma-2's norms
after the sublayers. Every step re-runs the *whole model* with hooks that overwrite the receiver's
input with ``clean - message`` on the patched rows only: ``hook_mlp_in`` for an MLP (so parallel
blocks patch only what the MLP reads), ``hook_q_input`` of one query head, or ``hook_k_input`` /
``hook_v_input`` of the head's **key/value group** (grouped-query models keep one input per kv
head). TransformerLens itself computes rotary, GQA, caps, masks and norms; the node's output is read
from its hooks (``hook_z``, ``hook_pattern``, ``hook_v``, ``hook_mlp_out``). For a model with a
post-attention norm a head's output is ``ln1_post(S) - ln1_post(S - c + c')`` (docs/semantics.md),
with ``S`` rebuilt from the clean ``hook_z``. Nothing here shares code with the engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformer_lens.utilities.activation_functions import apply_softcap

from pathdb.graph import Node, NodeKind, Site
from tests import reference_hooks as gpt2
from tests.reference_hooks import (
    Cache,
    Reference,
    attn_patched,
    keep_rows,
    mlp_step,
    node_rows,
)


def full_cache(model: Any, tokens: Tensor) -> Cache:
    """All hook activations of one run, as a plain dict (``hook_mlp_in`` on: MLP steps patch it)."""
    model.set_use_hook_mlp_in(True)
    return gpt2.full_cache(model, tokens)


def _group(model: Any, h: int) -> int:
    """The key/value head query head ``h`` reads."""
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    return h // (model.cfg.n_heads // n_kv)


def _heads(model: Any, node: Node) -> list[int]:
    return list(range(model.cfg.n_heads)) if node.head is None else [node.head]


def _contribution(model: Any, c: Cache, node: Node) -> Tensor:
    """Pre-norm attention contribution of a head node (or whole layer, with ``b_O``) ``[B, T, D]``:
    ``z @ W_O``, or ``A[:, k] v[k] @ W_O`` for a kv node with a source ``k``."""
    L = node.layer
    attn = model.blocks[L].attn
    out = torch.zeros_like(c["hook_embed"])
    for h in _heads(model, node):
        if node.is_kv and node.kv_position is not None:
            k = node.kv_position
            a = c[f"blocks.{L}.attn.hook_pattern"][:, h, :, k]  # [B, T]
            v = c[f"blocks.{L}.attn.hook_v"][
                :, k, _group(model, h)
            ]  # [B, dh] (unexpanded kv heads)
            out = out + a[..., None] * (v @ attn.W_O[h])[:, None]
        else:
            out = out + c[f"blocks.{L}.attn.hook_z"][:, :, h] @ attn.W_O[h]
    if node.head is None:
        out = out + attn.b_O
    return out


def _attn_sum(model: Any, c: Cache, layer: int) -> Tensor:
    """The clean pre-norm attention output of a layer (all heads + ``b_O``) from ``hook_z``."""
    return (
        torch.einsum(
            "bthk,hkd->btd", c[f"blocks.{layer}.attn.hook_z"], model.blocks[layer].attn.W_O
        )
        + model.blocks[layer].attn.b_O
    )


def _residual_change(model: Any, clean: Cache, node: Node, delta: Tensor) -> Tensor:
    """What a head node's pre-norm change ``delta`` changes in the residual (post-norm rule)."""
    if not model.cfg.use_normalization_before_and_after:
        return delta
    S = _attn_sum(model, clean, node.layer)
    post = model.blocks[node.layer].ln1_post
    return post(S) - post(S - delta)


def start_message(
    model: Any, clean: Cache, cf: Cache | None, patch_type: str, node: Node
) -> Tensor:
    """``m_0`` of a sender: ``out_clean - out_ref`` (ref 0 / counterfactual run / batch mean); for
    heads the residual change of replacing the clean contribution by the reference one."""
    T = clean["hook_embed"].shape[1]
    rows = node_rows(node, T)

    def out(c: Cache) -> Tensor:
        if node.kind is NodeKind.EMBED:
            return c["hook_embed"]
        if node.kind is NodeKind.MLP:
            return c[f"blocks.{node.layer}.hook_mlp_out"]
        return _contribution(model, c, node)

    o = out(clean)
    if patch_type == "zero":
        d = o
    elif patch_type == "counterfactual":
        assert cf is not None
        d = o - out(cf)
    else:
        d = o - o.mean(0, keepdim=True)
    if node.kind is NodeKind.ATTN:
        d = _residual_change(model, clean, node, d)
    return keep_rows(d, rows)


def step(model: Any, tokens: Tensor, clean: Cache, node: Node, msg: Tensor) -> Tensor:
    """``f(x) - f(x - msg)`` for one receiver, by re-running the model with input-overwrite hooks."""
    T = tokens.shape[1]
    L = node.layer
    if node.kind is NodeKind.FINAL:
        return msg
    if node.kind is NodeKind.MLP:
        model.set_use_hook_mlp_in(True)
        return mlp_step(model, tokens, clean, node, msg, "hook_mlp_in")
    heads = _heads(model, node)
    # a query input per query head; key/value inputs per key/value group
    idx = heads if node.site is Site.Q else sorted({_group(model, h) for h in heads})
    patched = attn_patched(model, tokens, clean, node, msg, idx)
    head_only = Node.attn(L, node.head, node.site or Site.Q, node.position, node.kv_position)
    delta = _contribution(model, clean, head_only) - _contribution(model, patched, head_only)
    return keep_rows(_residual_change(model, clean, node, delta), node_rows(node, T))


def logit_difference(model: Any, resid_row: Tensor, target: Tensor, cf_target: Tensor) -> Tensor:
    """Target minus counterfactual-target logit through ``ln_final``, the unembedding and TL's
    final-logit soft-cap."""
    logits = apply_softcap(
        model.unembed(model.ln_final(resid_row[:, None]))[:, 0], model.cfg.output_logits_soft_cap
    )
    b = torch.arange(len(target))
    return logits[b, target] - logits[b, cf_target]


_ARCH = Reference(start_message, step, logit_difference)
path_message = _ARCH.path_message
score_logit_difference = _ARCH.score_logit_difference
