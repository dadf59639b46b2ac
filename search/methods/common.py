"""What every attribution method shares: the edge graph's receivers, sender differences and the
gradients of the metric at every receiving input (captured with tensor hooks in one backward).

Works on every architecture :class:`MaskedEvaluator` does (grouped-query attention runs ungrouped,
so the k/v receivers are per query head; parallel blocks have no same-layer head -> MLP edges).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pathdb.evaluate.masked import MaskedEvaluator, _Group, _split_inputs


@dataclass
class EdgeScores:
    """A method's result: ``scores[F, Bk]`` (0 off the real edges), optional node scores, the
    learned circuit (learned-mask only) and method-specific facts for the run's params."""

    method: str
    scores: np.ndarray
    node_scores: dict[str, float] | None = None
    in_graph: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def receiver_slots(n_layers: int, n_heads: int) -> list[tuple[str, int, slice]]:
    """``(hook name, layer, backward-index slice)`` of every receiving input, in graph order."""
    slots: list[tuple[str, int, slice]] = []
    for layer in range(n_layers):
        col0 = layer * (3 * n_heads + 1)
        for i, site in enumerate("qkv"):
            cols = slice(col0 + i * n_heads, col0 + (i + 1) * n_heads)
            slots.append((f"blocks.{layer}.hook_{site}_input", layer, cols))
        slots.append(
            (
                f"blocks.{layer}.hook_mlp_in",
                layer,
                slice(col0 + 3 * n_heads, col0 + 3 * n_heads + 1),
            )
        )
    last = n_layers * (3 * n_heads + 1)
    slots.append((f"blocks.{n_layers - 1}.hook_resid_post", n_layers - 1, slice(last, last + 1)))
    return slots


def groups(ev: MaskedEvaluator) -> Iterator[tuple[_Group, Tensor]]:
    """Each length group of the evaluator with its sender differences ``clean - corrupted``
    ``[b, n, F, D]`` (what removing an edge subtracts from its receiver; post-norm heads through
    their layer's linearised norm, :meth:`MaskedEvaluator.messages`)."""
    for g in ev.groups:
        with torch.no_grad():
            clean, _ = ev._senders(g.tokens)
        yield g, ev.messages(clean, g.corrupted)


@dataclass
class Grads:
    """Receiver inputs and metric gradients of one group's forward/backward."""

    inputs: Tensor  # [b, n, Bk, D] clean receiver inputs
    grads: Tensor  # [b, n, Bk, D] d(sum of per-prompt metrics) / d(receiver input)
    patterns: list[Tensor]  # per layer [b, H, n, n] attention probabilities
    pattern_grads: list[Tensor]  # per layer, their gradients
    metric: Tensor  # [b] per-prompt metric


def receiver_grads(
    ev: MaskedEvaluator,
    g: _Group,
    *,
    embed: Callable[[Tensor], Tensor] | None = None,
    drop_layer: int | None = None,
) -> Grads:
    """One forward + backward on the group's clean tokens: every receiving input and its gradient.

    ``embed`` replaces the token embedding (EAP-IG interpolates it); ``drop_layer`` detaches that
    block's attention and MLP outputs, so no gradient flows through them (AtP*'s GradDrop).
    """
    model = ev.model
    cfg = model.cfg
    b, n = g.tokens.shape
    n_bk = ev.graph.shape[1]
    inputs = torch.zeros((b, n, n_bk, cfg.d_model), dtype=cfg.dtype, device=g.tokens.device)
    grads = torch.zeros_like(inputs)
    patterns: list[Tensor] = [torch.empty(0)] * cfg.n_layers
    pattern_grads: list[Tensor] = [torch.empty(0)] * cfg.n_layers

    def capture(cols: slice) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            inputs[:, :, cols] = act.detach().reshape(b, n, -1, cfg.d_model)

            def on_grad(grad: Tensor) -> None:
                grads[:, :, cols] += grad.detach().reshape(b, n, -1, cfg.d_model)

            act.register_hook(on_grad)
            return act

        return hook

    def pattern(layer: int) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            patterns[layer] = act.detach()

            def on_grad(grad: Tensor) -> None:
                pattern_grads[layer] = grad.detach()

            act.register_hook(on_grad)
            return act

        return hook

    roots: list[Tensor] = []

    def root(act: Tensor, hook: Any) -> Tensor:
        """The graph's root: the (replaced) embedding as a leaf, so no weight gets a gradient."""
        leaf = (act if embed is None else embed(act)).detach().requires_grad_(True)
        roots.append(leaf)
        return leaf

    hooks: list[tuple[str, Callable[..., Any]]] = [("hook_embed", root)]
    hooks += [(name, capture(cols)) for name, _, cols in receiver_slots(cfg.n_layers, cfg.n_heads)]
    hooks += [
        (f"blocks.{layer}.attn.hook_pattern", pattern(layer)) for layer in range(cfg.n_layers)
    ]
    if drop_layer is not None:
        hooks += [
            (f"blocks.{drop_layer}.{h}", lambda act, hook: act.detach())
            for h in ("hook_attn_out", "hook_mlp_out")
        ]
    with torch.enable_grad(), _split_inputs(model):
        resid = model.run_with_hooks(g.tokens, fwd_hooks=hooks, stop_at_layer=cfg.n_layers)
        metric = g.metric(resid[:, -1][None])[0]
        torch.autograd.grad(metric.sum(), roots, allow_unused=True)
    for layer in range(cfg.n_layers):  # a layer whose pattern got no gradient (GradDrop)
        if pattern_grads[layer].numel() == 0:
            pattern_grads[layer] = torch.zeros_like(patterns[layer])
    return Grads(inputs, grads, patterns, pattern_grads, metric.detach())


def edge_products(delta: Tensor, grads: Tensor) -> Tensor:
    """Per-prompt linear edge estimates ``-sum_pos delta_f . grad_b``: ``[b, F, Bk]``."""
    return -torch.einsum("bnfd,bnkd->bfk", delta, grads)


def finish(per_prompt: Tensor, ev: MaskedEvaluator) -> np.ndarray:
    """Summed per-prompt scores ``[F, Bk]`` -> the mean over the prompt set, off-graph cells 0."""
    mean = per_prompt.double().cpu().numpy() / ev.n_prompts
    return np.where(ev.graph.real(), mean, 0.0)
