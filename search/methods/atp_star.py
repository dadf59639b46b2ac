"""AtP* (``003_*``): attribution patching with the QK fix and GradDrop, at node level (as in
the paper) and at edge level.

* **QK fix**: a head's query or key change acts only through its attention probabilities, which
  a saturated softmax makes nearly flat to first order; instead the probabilities are recomputed
  exactly with the corrupted queries (keys) and only their change is linearised:
  ``c = sum (softmax(S') - A) * d metric / d A``. Nodes ``a{l}.h{h}<q>`` / ``<k>`` patch the whole
  query (key) input; edges ``f -> a{l}.h{h}<q|k>`` patch only sender ``f``'s message into it.
* **GradDrop**: for each layer ``l`` the gradient through that block's attention and MLP outputs
  is dropped (so that layer's own nodes and out-edges estimate 0); the score is
  ``mean over prompts of sum_l |c_l| / (L - 1)`` (non-negative: it counters cancellation of
  positive and negative effects, so it ranks by magnitude).

The recomputation is the model's own attention (:mod:`pathdb.arch.compute`: rotary positions,
score soft-caps, sliding windows, grouped key weights per query head). Value inputs, MLPs, the logits and sender nodes (``input``, ``a{l}.h{h}``, ``m{l}``: the node's
output patched) keep AtP's linear estimate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pathdb.arch.compute import Arch
from pathdb.evaluate.masked import MaskedEvaluator
from search.methods.common import EdgeScores, Grads, edge_products, groups, receiver_grads


def _attn_change(
    arch: Arch, layer: int, q: Tensor, k: Tensor, pattern: Tensor, grad: Tensor
) -> Tensor:
    """``sum_{q,k} (A' - pattern) * grad`` over the last two axes, ``A'`` the layer's attention
    probabilities recomputed as the model does (rotary positions, scale, score soft-cap, causal
    and sliding-window mask) from unrotated ``q``/``k`` ``[..., n, dh]`` (broadcast against each
    other); ``pattern``/``grad`` ``[..., n, n]``."""
    n = q.shape[-2]
    q, k = arch.rope(layer, q, slice(0, n)), arch.rope(layer, k, slice(0, n))
    scores = arch.cap_scores(torch.einsum("...qe,...ke->...qk", q, k) / arch.attn_scale[layer])
    new = scores.masked_fill(arch.mask(layer, n, scores.device), float("-inf")).softmax(-1)
    return ((new - pattern) * grad).sum((-1, -2))


@torch.no_grad()
def _qk_fixed(ev: MaskedEvaluator, gr: Grads, delta: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """QK-fixed per-prompt edge estimates for every q/k receiver ``[b, F, Bk]`` (other columns 0)
    and the per-prompt ``<q>``/``<k>`` node estimates ``{name: [b]}``."""
    model = ev.model
    cfg = model.cfg
    arch = Arch(model)
    n_heads = cfg.n_heads
    b, _, n_fwd, _ = delta.shape
    out = torch.zeros((b, n_fwd, ev.graph.shape[1]), dtype=delta.dtype, device=delta.device)
    nodes: dict[str, Tensor] = {}
    real = torch.from_numpy(ev.graph.real()).to(delta.device)
    per_sender = delta.permute(0, 2, 1, 3)  # [b, F, n, D]
    for layer in range(cfg.n_layers):
        block = model.blocks[layer]
        w = arch.attn(layer)  # per query head (grouped key weights expanded)
        col0 = layer * (3 * n_heads + 1)
        pattern, pgrad = gr.patterns[layer], gr.pattern_grads[layer]
        senders = real[:, col0].to(delta.dtype)  # the same senders reach every q and k input
        removed = torch.einsum("bfnd,f->bnd", per_sender, senders)
        normed: dict[
            int, tuple[Tensor, Tensor, Tensor]
        ] = {}  # input column -> LNs, shared ones once

        def norms(
            col: int,
            ln: Any = block.ln1,
            normed: dict[int, tuple[Tensor, Tensor, Tensor]] = normed,
            removed: Tensor = removed,
        ) -> tuple[Tensor, Tensor, Tensor]:
            """LN of the clean input, of it minus each sender, of it minus all senders."""
            x = gr.inputs[:, :, col]  # [b, n, D]
            for seen, value in normed.items():  # every head reads the same residual in a clean run
                if torch.equal(gr.inputs[:, :, seen], x):
                    return value
            normed[col] = (ln(x), ln(x[:, None] - per_sender), ln(x - removed))
            return normed[col]

        for h in range(n_heads):
            qcol, kcol = col0 + h, col0 + n_heads + h
            (xq, xq_edges, xq_all), (xk, xk_edges, xk_all) = norms(qcol), norms(kcol)
            w_q, b_q, w_k, b_k = w.W_Q[h], w.b_Q[h], w.W_K[h], w.b_K[h]
            q, k = xq @ w_q + b_q, xk @ w_k + b_k  # [b, n, dh]
            p, gp = pattern[:, h], pgrad[:, h]  # [b, n, n]
            q_edges, k_edges = xq_edges @ w_q + b_q, xk_edges @ w_k + b_k  # [b, F, n, dh]
            out[:, :, qcol] = _attn_change(
                arch, layer, q_edges, k[:, None], p[:, None], gp[:, None]
            )
            out[:, :, kcol] = _attn_change(
                arch, layer, q[:, None], k_edges, p[:, None], gp[:, None]
            )
            q_all, k_all = xq_all @ w_q + b_q, xk_all @ w_k + b_k
            nodes[f"a{layer}.h{h}<q>"] = _attn_change(arch, layer, q_all, k, p, gp)
            nodes[f"a{layer}.h{h}<k>"] = _attn_change(arch, layer, q, k_all, p, gp)
    return out * real, nodes


def _estimates(
    ev: MaskedEvaluator, gr: Grads, delta: Tensor, qk_fix: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-prompt edge estimates ``[b, F, Bk]`` and node estimates ``{name: [b]}`` of one backward."""
    graph = ev.graph
    real = torch.from_numpy(graph.real()).to(delta.device, delta.dtype)
    linear = edge_products(delta, gr.grads) * real
    spec = graph.spec
    n_heads = spec.n_heads
    nodes: dict[str, Tensor] = {}
    for f, name in enumerate(spec.forward[: graph.shape[0]]):
        nodes[name] = linear[:, f].sum(-1)  # the node's output patched: all its out-edges
    for layer in range(spec.n_layers):
        col0 = layer * (3 * n_heads + 1)
        for i, site in enumerate("qkv"):
            for h in range(n_heads):
                nodes[f"a{layer}.h{h}<{site}>"] = linear[:, :, col0 + i * n_heads + h].sum(-1)
    if not qk_fix:
        return linear, nodes
    fixed, qk_nodes = _qk_fixed(ev, gr, delta)
    qk_cols = np.zeros(graph.shape[1], dtype=bool)
    for layer in range(spec.n_layers):
        col0 = layer * (3 * n_heads + 1)
        qk_cols[col0 : col0 + 2 * n_heads] = True
    cols = torch.from_numpy(qk_cols).to(delta.device)
    nodes.update(qk_nodes)
    return torch.where(cols, fixed, linear), nodes


def _layer_senders(ev: MaskedEvaluator, layer: int) -> slice:
    """Forward indices of one layer's heads and MLP."""
    first = 1 + layer * (ev.model.cfg.n_heads + 1)
    return slice(first, first + ev.model.cfg.n_heads + 1)


def atp_star(ev: MaskedEvaluator, *, qk_fix: bool = True, grad_drop: bool = True) -> EdgeScores:
    """AtP* edge and node scores (``qk_fix``/``grad_drop`` off give plain AtP's pieces)."""
    n_layers = ev.model.cfg.n_layers
    if grad_drop and n_layers < 2:
        raise ValueError(
            "GradDrop needs at least 2 layers (it averages over L - 1); use --no-grad-drop"
        )
    edges: Tensor | None = None
    nodes: dict[str, Tensor] = {}
    drops: list[int | None] = list(range(n_layers)) if grad_drop else [None]
    for g, delta in groups(ev):
        for drop in drops:
            gr = receiver_grads(ev, g, drop_layer=drop)
            e, nd = _estimates(ev, gr, delta, qk_fix)
            if drop is not None:  # a sender of the dropped layer acts only through its output
                own = _layer_senders(ev, drop)
                e[:, own.start : own.stop] = 0
                for name in ev.graph.spec.forward[own]:
                    nd[name] = torch.zeros_like(nd[name])
            if grad_drop:
                e, nd = (
                    e.abs() / (n_layers - 1),
                    {k: v.abs() / (n_layers - 1) for k, v in nd.items()},
                )
            edges = e.sum(0) if edges is None else edges + e.sum(0)
            for k, v in nd.items():
                nodes[k] = nodes.get(k, torch.zeros((), dtype=v.dtype)) + v.sum()
    assert edges is not None
    scores = edges.double().cpu().numpy() / ev.n_prompts
    node_scores = {k: float(v) / ev.n_prompts for k, v in nodes.items()}
    return EdgeScores(
        "atp*", scores, node_scores=node_scores, info={"qk_fix": qk_fix, "grad_drop": grad_drop}
    )
