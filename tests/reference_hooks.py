"""Independent slow reference for path message patching, written with TransformerLens hooks.

Every step re-runs the *whole model* on the clean prompts with hooks that overwrite the
receiver's input (``hook_resid_mid`` for an MLP; ``hook_q_input`` / ``hook_k_input`` /
``hook_v_input`` for one head's query or key/value, via ``use_split_qkv_input``) with
``clean - message`` on the patched rows only, and reads the node's output from TL's own hooks
(``hook_mlp_out``, ``hook_z``, ``hook_pattern``, ``hook_v``). Nothing here shares code with the
engine; messages are dense ``[B, T, D]`` tensors and candidates are evaluated one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pathdb.graph import Node, NodeKind, Site

Cache = dict[str, Tensor]


def full_cache(model: Any, tokens: Tensor) -> Cache:
    """All hook activations of one run, as a plain dict."""
    model.set_use_split_qkv_input(True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return {k: v for k, v in cache.items()}


def node_rows(node: Node, T: int) -> list[int]:
    """The token rows a node works on: its position, or every row for a position-free node."""
    return list(range(T)) if node.position is None else [node.position]


def keep_rows(x: Tensor, rows: list[int]) -> Tensor:
    """``x`` on ``rows`` (dimension 1), zero elsewhere."""
    out = torch.zeros_like(x)
    out[:, rows] = x[:, rows]
    return out


def sender_output(model: Any, c: Cache, node: Node) -> Tensor:
    """Output of a sender in one run (dense ``[B, T, D]``, only the node's rows kept)."""
    T = c["hook_embed"].shape[1]
    rows = node_rows(node, T)
    if node.kind is NodeKind.EMBED:
        return keep_rows(c["hook_embed"], rows)
    if node.kind is NodeKind.MLP:
        return keep_rows(c[f"blocks.{node.layer}.hook_mlp_out"], rows)
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
    return keep_rows(out, rows)


def start_message(
    model: Any, clean: Cache, cf: Cache | None, patch_type: str, node: Node
) -> Tensor:
    """``out_clean - out_ref`` with ref 0 / counterfactual run / batch mean of the clean run."""
    out = sender_output(model, clean, node)
    if patch_type == "zero":
        return out
    if patch_type == "counterfactual":
        assert cf is not None
        return out - sender_output(model, cf, node)
    return out - keep_rows(out.mean(0, keepdim=True).expand_as(out), node_rows(node, out.shape[1]))


def run_patched(model: Any, tokens: Tensor, hooks: list[tuple[str, Any]]) -> Cache:
    """One forward pass with ``hooks``, saving every node output hook the references read."""
    store: Cache = {}

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


def _node_output(model: Any, c: Cache, node: Node) -> Tensor:
    """A receiver's output in a (possibly patched) run: single-source for kv nodes with a source."""
    if node.kind is NodeKind.ATTN:
        # b_O cancels in differences: use the head outputs only.
        tmp = Node.attn(node.layer, node.head, node.site or Site.Q, node.position, node.kv_position)
        out = sender_output(model, {**c, "hook_embed": c["hook_embed"]}, tmp)
        if node.head is None:
            out = out - keep_rows(
                model.blocks[node.layer].attn.b_O.expand_as(out).clone(),
                node_rows(node, out.shape[1]),
            )
        return out
    return sender_output(model, c, node)


def mlp_step(model: Any, tokens: Tensor, clean: Cache, node: Node, msg: Tensor, at: str) -> Tensor:
    """An MLP receiver's ``f(x) - f(x - msg)``: its input overwritten at hook ``blocks.L.<at>`` on
    the node's rows, its output read from ``hook_mlp_out``."""
    rows = node_rows(node, tokens.shape[1])

    def mlp_hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        x[:, rows] = x[:, rows] - msg[:, rows]
        return x

    patched = run_patched(model, tokens, [(f"blocks.{node.layer}.{at}", mlp_hook)])
    out = f"blocks.{node.layer}.hook_mlp_out"
    return keep_rows(clean[out] - patched[out], rows)


def attn_patched(
    model: Any, tokens: Tensor, clean: Cache, node: Node, msg: Tensor, idx: list[int]
) -> Cache:
    """The run with ``msg`` subtracted from an attention receiver's inputs (``hook_q_input`` on its
    query row(s), or ``hook_k_input`` / ``hook_v_input`` on its key/value source row(s)) of the
    input heads ``idx``; ``hook_embed`` as in ``clean``."""
    T = tokens.shape[1]
    if node.site is Site.Q:
        rows, names = node_rows(node, T), ["hook_q_input"]
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
        for i in idx:
            x[:, rows, i] = x[:, rows, i] - msg[:, rows]
        return x

    patched = run_patched(model, tokens, [(f"blocks.{node.layer}.{n}", attn_hook) for n in names])
    patched["hook_embed"] = clean["hook_embed"]
    return patched


def step(model: Any, tokens: Tensor, clean: Cache, node: Node, msg: Tensor) -> Tensor:
    """``f(x) - f(x - msg)`` for one receiver, by re-running the model with input-overwrite hooks."""
    if node.kind is NodeKind.FINAL:
        return msg
    if node.kind is NodeKind.MLP:
        return mlp_step(model, tokens, clean, node, msg, "hook_resid_mid")
    heads = list(range(model.cfg.n_heads)) if node.head is None else [node.head]
    patched = attn_patched(model, tokens, clean, node, msg, heads)
    return _node_output(model, clean, node) - _node_output(model, patched, node)


def logit_difference(model: Any, resid_row: Tensor, target: Tensor, cf_target: Tensor) -> Tensor:
    """Logit of target minus logit of cf target, straight through ``ln_final`` and ``unembed``."""
    logits = model.unembed(model.ln_final(resid_row[:, None]))[:, 0]
    b = torch.arange(len(target))
    return logits[b, target] - logits[b, cf_target]


@dataclass(frozen=True)
class Reference:
    """A reference's start message, receiver step and logit difference, and the path scores built
    from them (the same drivers for this GPT-2 reference and :mod:`tests.reference_hooks_arch`)."""

    start_message: Callable[[Any, Cache, Cache | None, str, Node], Tensor]
    step: Callable[[Any, Tensor, Cache, Node, Tensor], Tensor]
    logit_difference: Callable[[Any, Tensor, Tensor, Tensor], Tensor]

    def path_message(
        self,
        model: Any,
        tokens: Tensor,
        clean: Cache,
        cf: Cache | None,
        patch_type: str,
        path: Sequence[Node],
    ) -> Tensor:
        """The message arriving at the final residual for ``path`` (dense ``[B, T, D]``)."""
        m = self.start_message(model, clean, cf, patch_type, path[0])
        for n in path[1:]:
            m = self.step(model, tokens, clean, n, m)
        return m

    def score_logit_difference(
        self,
        model: Any,
        tokens: Tensor,
        clean: Cache,
        cf: Cache | None,
        patch_type: str,
        path: Sequence[Node],
        target: Tensor,
        cf_target: Tensor,
    ) -> Tensor:
        """Per-prompt exact score ``ld(clean) - ld(clean - m)`` at the root row."""
        T = tokens.shape[1]
        root = T - 1 if path[-1].position is None else path[-1].position
        final = clean[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, root]
        m = self.path_message(model, tokens, clean, cf, patch_type, path)[:, root]
        ld = self.logit_difference
        return ld(model, final, target, cf_target) - ld(model, final - m, target, cf_target)


_GPT2 = Reference(start_message, step, logit_difference)
path_message = _GPT2.path_message
score_logit_difference = _GPT2.score_logit_difference


def group_effect(model: Any, prompts: Any, receiver: str) -> float:
    """A receiver input's group effect by hand, ``ld(clean) - ld(receiver input from the
    counterfactual run)`` (every edge into it corrupted: it reads the counterfactual residual):
    a head's q/k/v input becomes the counterfactual ``resid_pre`` (grouped-query attention
    ungrouped, so a query head's key input is its own), an MLP's the counterfactual
    ``resid_mid``, the logits' the counterfactual final residual."""
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.set_ungroup_grouped_query_attention(True)
    try:
        with torch.no_grad():
            _, cf = model.run_with_cache(prompts.cf_tokens)
            if receiver == "logits":
                name, head = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
                value = cf[name]
            elif receiver.startswith("m"):
                layer = receiver[1:]
                name, head, value = (
                    f"blocks.{layer}.hook_mlp_in",
                    None,
                    cf[f"blocks.{layer}.hook_resid_mid"],
                )
            else:
                layer, rest = receiver[1:].split(".h")
                head = int(rest.split("<")[0])
                name = f"blocks.{layer}.hook_{rest[-2]}_input"
                value = cf[f"blocks.{layer}.hook_resid_pre"]

            def patch(act: torch.Tensor, hook: Any) -> torch.Tensor:
                if head is None:
                    return value.clone()
                act = act.clone()
                act[:, :, head] = value
                return act

            def ld(logits: torch.Tensor) -> torch.Tensor:
                last = logits[:, -1]
                assert prompts.cf_target_ids is not None
                return last.gather(1, prompts.target_ids[:, None]) - last.gather(
                    1, prompts.cf_target_ids[:, None]
                )

            clean = ld(model(prompts.clean_tokens))
            patched = ld(model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(name, patch)]))
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
        model.set_ungroup_grouped_query_attention(False)
    return float((clean - patched).mean())
