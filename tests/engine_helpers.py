"""Shared helpers for the engine tests: small seeded random models, prompts and random paths."""

from __future__ import annotations

import random
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pathdb.graph import ModelShape, Node, NodeKind, Site, predecessors


def tiny_model(
    n_layers: int = 2,
    n_heads: int = 2,
    d_model: int = 16,
    d_head: int = 4,
    d_mlp: int = 32,
    d_vocab: int = 23,
    n_ctx: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> HookedTransformer:
    """A randomly initialised pre-LN GPT-2-style model (LN, gelu, standard positions)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        d_mlp=d_mlp,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=seed,
        dtype=dtype,
        init_weights=True,
        device="cpu",  # TransformerLens picks a GPU when it sees one; tests move models themselves
    )
    model = HookedTransformer(cfg)
    # Random biases and LN weights too, so no term vanishes by accident.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".b", ".w")) or ".b_" in name or name.endswith("b_U"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.mul_(4.0)
    model.eval()
    return model


def prompts(model: Any, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Clean tokens, counterfactual tokens, targets and counterfactual targets."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    tokens = torch.randint(0, V, (batch, seq), generator=g)
    cf = torch.randint(0, V, (batch, seq), generator=g)
    target = torch.randint(0, V, (batch,), generator=g)
    cf_target = (target + 1 + torch.randint(0, V - 1, (batch,), generator=g)) % V
    return tokens, cf, target, cf_target


def random_path(
    shape: ModelShape, length: int, rng: random.Random, *, positional: bool = True
) -> tuple[Node, ...]:
    """A random path of ``length`` nodes before FINAL (shorter if it reaches EMBED early)."""
    root = Node.final(shape.n_layers, shape.n_positions - 1 if positional else None)
    path: tuple[Node, ...] = (root,)
    for i in range(length):
        heads = rng.random() < 0.75
        kv_sites = (Site.KV,) if rng.random() < 0.6 else (Site.K, Site.V)
        preds = predecessors(path[0], shape, heads=heads, kv_sites=kv_sites)
        if i < length - 1:
            non_embed = [p for p in preds if p.kind is not NodeKind.EMBED]
            preds = non_embed or preds
        # Also exercise kv nodes without a source position (the batch_positions pre-screen).
        node = rng.choice(preds)
        if (
            node.kind is NodeKind.ATTN
            and node.is_kv
            and node.position is not None
            and rng.random() < 0.2
        ):
            node = Node.attn(node.layer, node.head, node.site or Site.KV, node.position, None)
        path = (node, *path)
        if node.kind is NodeKind.EMBED:
            break
    return path
