"""Independent slow reference for path message patching, written with TransformerLens hooks.

Every step re-runs the *whole model* on the clean prompts with hooks that overwrite the
receiver's input (``hook_resid_mid`` for an MLP; ``hook_q_input`` / ``hook_k_input`` /
``hook_v_input`` for one head's query or key/value, via ``use_split_qkv_input``) with
``clean - message`` on the patched rows only, and reads the node's output from TL's own hooks
(``hook_mlp_out``, ``hook_z``, ``hook_pattern``, ``hook_v``). Nothing here shares code with the
engine; messages are dense ``[B, T, D]`` tensors and candidates are evaluated one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pathdb.graph import Node, NodeKind, Site


def full_cache(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    """All hook activations of one run, as a plain dict."""
    model.set_use_split_qkv_input(True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return {k: v for k, v in cache.items()}


def _rows(node: Node, T: int) -> list[int]:
    return list(range(T)) if node.position is None else [node.position]


def _keep_rows(x: Tensor, rows: list[int]) -> Tensor:
    out = torch.zeros_like(x)
    out[:, rows] = x[:, rows]
    return out


def sender_output(model: Any, c: dict[str, Tensor], node: Node) -> Tensor:
    """Output of a sender in one run (dense ``[B, T, D]``, only the node's rows kept)."""
    T = c["hook_embed"].shape[1]
    rows = _rows(node, T)
    if node.kind is NodeKind.EMBED:
        return _keep_rows(c["hook_embed"], rows)
    if node.kind is NodeKind.MLP:
        return _keep_rows(c[f"blocks.{node.layer}.hook_mlp_out"], rows)
    L = node.layer
    W_O = model.blocks[L].attn.W_O
    heads = range(model.cfg.n_heads) if node.head is None else [node.head]
    out = torch.zeros_like(c["hook_embed"])
    for h in heads:
        if node.is_kv and node.kv_position is not None:
            k = node.kv_position
            a = c[f"blocks.{L}.attn.hook_pattern"][:, h, :, k]  # [B, T]
            out = out + a[..., None] * (c[f"blocks.{L}.attn.hook_v"][:, k, h] @ W_O[h])[:, None]
        else:
            out = out + c[f"blocks.{L}.attn.hook_z"][:, :, h] @ W_O[h]
    if node.head is None:
        out = out + model.blocks[L].attn.b_O
    return _keep_rows(out, rows)


def start_message(
    model: Any, clean: dict[str, Tensor], cf: dict[str, Tensor] | None, patch_type: str, node: Node
) -> Tensor:
    """``out_clean - out_ref`` with ref 0 / counterfactual run / batch mean of the clean run."""
    out = sender_output(model, clean, node)
    if patch_type == "zero":
        return out
    if patch_type == "counterfactual":
        assert cf is not None
        return out - sender_output(model, cf, node)
    return out - _keep_rows(out.mean(0, keepdim=True).expand_as(out), _rows(node, out.shape[1]))


def _run_patched(model: Any, tokens: Tensor, hooks: list[tuple[str, Any]]) -> dict[str, Tensor]:
    store: dict[str, Tensor] = {}

    def saver(name: str) -> Any:
        def f(x: Tensor, hook: Any) -> None:
            store[name] = x.detach().clone()

        return f

    names = [
        f"blocks.{i}.{n}"
        for i in range(model.cfg.n_layers)
        for n in ("hook_mlp_out", "attn.hook_z", "attn.hook_pattern", "attn.hook_v")
    ]
    model.set_use_split_qkv_input(True)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks + [(n, saver(n)) for n in names])
    return store


def _node_output(model: Any, c: dict[str, Tensor], node: Node) -> Tensor:
    """A receiver's output in a (possibly patched) run: single-source for kv nodes with a source."""
    if node.kind is NodeKind.ATTN:
        # b_O cancels in differences: use the head outputs only.
        tmp = Node.attn(node.layer, node.head, node.site or Site.Q, node.position, node.kv_position)
        out = sender_output(model, {**c, "hook_embed": c["hook_embed"]}, tmp)
        if node.head is None:
            out = out - _keep_rows(
                model.blocks[node.layer].attn.b_O.expand_as(out).clone(), _rows(node, out.shape[1])
            )
        return out
    return sender_output(model, c, node)


def step(model: Any, tokens: Tensor, clean: dict[str, Tensor], node: Node, msg: Tensor) -> Tensor:
    """``f(x) - f(x - msg)`` for one receiver, by re-running the model with input-overwrite hooks."""
    T = tokens.shape[1]
    L = node.layer
    if node.kind is NodeKind.FINAL:
        return msg
    if node.kind is NodeKind.MLP:
        rows = _rows(node, T)

        def mlp_hook(x: Tensor, hook: Any) -> Tensor:
            x = x.clone()
            x[:, rows] = x[:, rows] - msg[:, rows]
            return x

        patched = _run_patched(model, tokens, [(f"blocks.{L}.hook_resid_mid", mlp_hook)])
        patched["hook_embed"] = clean["hook_embed"]
        return _keep_rows(
            clean[f"blocks.{L}.hook_mlp_out"] - patched[f"blocks.{L}.hook_mlp_out"], rows
        )
    heads = list(range(model.cfg.n_heads)) if node.head is None else [node.head]
    hooks: list[tuple[str, Any]] = []
    if node.site is Site.Q:
        rows = _rows(node, T)
        names = ["hook_q_input"]
    else:
        if node.kv_position is not None:
            rows = [node.kv_position]
        elif node.position is not None:
            rows = list(range(node.position + 1))
        else:
            rows = list(range(T))
        names = {
            Site.KV: ["hook_k_input", "hook_v_input"],
            Site.K: ["hook_k_input"],
            Site.V: ["hook_v_input"],
        }[
            node.site  # type: ignore[index]
        ]

    def attn_hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        for h in heads:
            x[:, rows, h] = x[:, rows, h] - msg[:, rows]
        return x

    for n in names:
        hooks.append((f"blocks.{L}.{n}", attn_hook))
    patched = _run_patched(model, tokens, hooks)
    patched["hook_embed"] = clean["hook_embed"]
    return _node_output(model, clean, node) - _node_output(model, patched, node)


def path_message(
    model: Any,
    tokens: Tensor,
    clean: dict[str, Tensor],
    cf: dict[str, Tensor] | None,
    patch_type: str,
    path: Sequence[Node],
) -> Tensor:
    """The message arriving at the final residual for ``path`` (dense ``[B, T, D]``)."""
    m = start_message(model, clean, cf, patch_type, path[0])
    for n in path[1:]:
        m = step(model, tokens, clean, n, m)
    return m


def logit_difference(model: Any, resid_row: Tensor, target: Tensor, cf_target: Tensor) -> Tensor:
    """Logit of target minus logit of cf target, straight through ``ln_final`` and ``unembed``."""
    logits = model.unembed(model.ln_final(resid_row[:, None]))[:, 0]
    b = torch.arange(len(target))
    return logits[b, target] - logits[b, cf_target]


def score_logit_difference(
    model: Any,
    tokens: Tensor,
    clean: dict[str, Tensor],
    cf: dict[str, Tensor] | None,
    patch_type: str,
    path: Sequence[Node],
    target: Tensor,
    cf_target: Tensor,
) -> Tensor:
    """Per-prompt exact score ``ld(clean) - ld(clean - m)`` at the root row."""
    T = tokens.shape[1]
    root = T - 1 if path[-1].position is None else path[-1].position
    final = clean[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, root]
    m = path_message(model, tokens, clean, cf, patch_type, path)[:, root]
    return logit_difference(model, final, target, cf_target) - logit_difference(
        model, final - m, target, cf_target
    )
