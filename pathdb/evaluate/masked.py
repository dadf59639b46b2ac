"""Edge-masked forward passes (MIB / EAP-IG ``evaluate_graph``): run the model with a circuit's
edges clean and every other edge given the corrupted sender output.

Every receiving input (each head's q, k and v input, each MLP input, the logits) reads
``actual input - sum over out-of-circuit senders (sender output in this run - corrupted output)``,
so it gets the messages of in-circuit senders as they are in this (masked) run and the corrupted
messages of the others. Senders are the token embedding (``hook_embed``), each head's output
without ``b_O`` (``hook_z @ W_O``) and each MLP's output (``hook_mlp_out``); the positional
embedding and the biases stay clean. The full circuit reproduces the clean run and the empty
circuit the corrupted one. The graph is EAP-IG's position-free graph
(:func:`pathdb.export.eap.eap_spec`); a circuit is a boolean ``in_graph`` matrix
``[n_forward, n_backward]``.

Interventions (as MIB): ``counterfactual`` (corrupted = the counterfactual prompt's run),
``zero`` (corrupted = 0), ``mean`` (the sender's clean output averaged over every token of every
evaluation prompt) and ``mean-positional`` (averaged over prompts per position; pathdb's
``--patch mean``). Prompts of different token lengths are evaluated in length groups; the metric
reads the last position. Several circuits run at once, stacked along the batch axis.

Architectures: every family the path engine supports (:mod:`pathdb.arch`). Grouped-/multi-query
attention is masked per query head (the model runs ungrouped); in parallel blocks (GPT-NeoX, GPT-J)
the MLP of layer ``l`` reads the block input, so the graph has no ``a{l}.h{i} -> m{l}`` edges;
rotary positions, soft-caps and local attention are TransformerLens's own forward.

Post-sublayer norms (Gemma-2: ``ln1_post`` / ``ln2_post`` normalise a sublayer's output before the
residual add): an MLP sender is ``hook_mlp_out``, its post-norm included (the engine's node-output
rule). Heads mix before their layer's norm, so each receiver sees layer ``l``'s attention output
as ``ln1_post(S_l - sum over its out-of-circuit heads of l (c_h - c'_h))``, ``S_l`` the pre-norm
attention sum of this run (all heads + ``b_O``), ``c_h`` a head's output ``z @ W_O`` and ``c'_h``
the corrupted one: a receiver missing one head gets exactly the engine's message
``ln1_post(S) - ln1_post(S - c + c')`` subtracted, and the empty circuit is the corrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pathdb.arch import check_supported, parallel_blocks
from pathdb.arch.compute import apply_norm
from pathdb.evaluate.graph import EdgeGraph, EvaluationError
from pathdb.evaluate.results import INTERVENTIONS
from pathdb.export.eap import eap_spec
from pathdb.metrics import Readout, get_metric
from pathdb.prompts import PromptSet

#: a run's ``--patch`` -> the intervention that removes the same messages
PATCH_INTERVENTION = {"counterfactual": "counterfactual", "zero": "zero", "mean": "mean-positional"}
#: bytes of sender differences held at once (circuits are chunked to fit)
MEMORY_BUDGET = 512 * 2**20


@dataclass
class _Group:
    """The prompts of one token length: tokens, corrupted sender outputs and the metric."""

    tokens: Tensor  # [b, n]
    corrupted: Tensor  # sender outputs to patch in, broadcastable to [b, n, F, D]
    metric: Callable[[Tensor], Tensor]  # root rows [C, b, D] -> [C, b]


@contextmanager
def _split_inputs(model: Any) -> Any:
    """Turn on TransformerLens's per-head q/k/v input hooks and the MLP input hook, then restore.

    Grouped-/multi-query attention runs ungrouped (``ungroup_grouped_query_attention``: the same
    key/value weights repeated per query head), so every query head has its own k and v input to
    mask, as in MIB / EAP-IG's graph; the values are those of the grouped model."""
    cfg = model.cfg
    before = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before[0])
        model.set_use_hook_mlp_in(before[1])
        model.set_ungroup_grouped_query_attention(before[2])


class MaskedEvaluator:
    """Metric of the edge-masked model for many circuits, on one evaluation prompt set."""

    def __init__(self, model: Any, prompts: PromptSet, metric: str, intervention: str) -> None:
        """Run the clean (and corrupted) forwards once per length group and build the metrics."""
        if getattr(model, "is_bridge", False):  # pathdb.models.bridge.BridgeModel (TL 4)
            raise EvaluationError(
                "the edge-masked forward (pathdb evaluate, compare, attribute) runs HookedTransformer "
                "hooks, which TransformerLens 4 removed: use it in an environment with "
                "transformer-lens 3.9 (pathdb search and query work on both)"
            )
        if intervention not in INTERVENTIONS:
            raise EvaluationError(
                f"unknown intervention {intervention!r}; choose one of {', '.join(INTERVENTIONS)}"
            )
        if intervention == "counterfactual" and prompts.cf_tokens is None:
            raise EvaluationError(
                f"{prompts.source}: counterfactual patching needs a 'counterfactual' on every prompt; "
                "add them or use --intervention zero|mean"
            )
        cfg = model.cfg
        check_supported(model)
        self.model = model
        self.parallel = parallel_blocks(cfg)
        self.post_norm = bool(getattr(cfg, "use_normalization_before_and_after", False))
        self.graph = EdgeGraph(eap_spec(cfg.n_layers, cfg.n_heads, self.parallel))
        self.metric_name = metric
        self.intervention = intervention
        self.n_prompts = len(prompts)
        self._real = torch.from_numpy(self.graph.real())
        n_fwd, n_heads = self.graph.shape[0], cfg.n_heads
        not_head = torch.ones(n_fwd, dtype=cfg.dtype, device=cfg.device)
        for layer in range(cfg.n_layers):
            not_head[1 + layer * (n_heads + 1) : 1 + layer * (n_heads + 1) + n_heads] = 0
        self._not_head = not_head  # 1 for the embedding and MLP senders, 0 for heads
        readout = Readout(model)
        metric_cls = get_metric(metric)
        lengths = prompts.lengths.tolist()
        groups: list[_Group] = []
        with torch.no_grad():  # not inference_mode: masked_metric differentiates through these
            outs: list[Tensor] = []  # clean sender outputs per group (for the mean)
            for n in sorted(set(lengths)):
                rows = [i for i, length in enumerate(lengths) if length == n]
                idx = torch.tensor(rows, device=prompts.clean_tokens.device)
                tokens = prompts.clean_tokens[idx, :n]
                clean_out, clean_resid = self._senders(tokens)
                outs.append(clean_out)
                target = prompts.target_ids[idx]
                cf = None if prompts.cf_target_ids is None else prompts.cf_target_ids[idx]
                m = metric_cls(readout, clean_resid[:, -1], target, cf)
                if intervention == "counterfactual":
                    assert prompts.cf_tokens is not None
                    corrupted = self._senders(prompts.cf_tokens[idx, :n])[0]
                elif intervention == "zero":
                    corrupted = torch.zeros_like(clean_out[0, 0])
                elif intervention == "mean-positional":
                    corrupted = clean_out.mean(0)
                else:
                    corrupted = torch.empty(0)  # filled below: the mean over every group
                groups.append(_Group(tokens, corrupted, m))
            if intervention == "mean":
                every = torch.cat([o.flatten(0, 1) for o in outs])  # [tokens, F, D]
                mean = every.mean(0)
                for g in groups:
                    g.corrupted = mean
        self.groups = groups

    # ---------------------------------------------------------------- forwards
    def _sender_hooks(
        self, store: Callable[[int, Tensor], None], sums: dict[int, Tensor] | None = None
    ) -> list[tuple[str, Callable[..., Any]]]:
        """Hooks that hand every sender's output (forward index, ``[batch, pos, D]``) to ``store``
        (and, into ``sums``, each layer's pre-norm attention sum: all heads + ``b_O``)."""
        cfg = self.model.cfg
        n_heads = cfg.n_heads
        hooks: list[tuple[str, Callable[..., Any]]] = [
            ("hook_embed", lambda act, hook: store(0, act))
        ]
        for layer in range(cfg.n_layers):
            base = 1 + layer * (n_heads + 1)
            w_o = self.model.blocks[layer].attn.W_O  # [H, d_head, D]

            def heads(
                act: Tensor, hook: Any, base: int = base, w_o: Tensor = w_o, layer: int = layer
            ) -> None:
                out = torch.einsum("bphe,hed->bphd", act, w_o)
                for h in range(out.shape[2]):
                    store(base + h, out[:, :, h])
                if sums is not None:
                    sums[layer] = out.sum(2) + self.model.blocks[layer].attn.b_O

            hooks.append((f"blocks.{layer}.attn.hook_z", heads))
            hooks.append(
                (f"blocks.{layer}.hook_mlp_out", lambda act, hook, f=base + n_heads: store(f, act))
            )
        return hooks

    def _senders(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Plain forward: every sender's output ``[b, n, F, D]`` and the final residual ``[b, n, D]``."""
        n_fwd = self.graph.shape[0]
        out = torch.zeros(
            (*tokens.shape, n_fwd, self.model.cfg.d_model),
            dtype=self.model.cfg.dtype,
            device=tokens.device,
        )

        def store(f: int, act: Tensor) -> None:
            out[:, :, f] = act

        resid = self.model.run_with_hooks(
            tokens, fwd_hooks=self._sender_hooks(store), stop_at_layer=self.model.cfg.n_layers
        )
        return out, resid

    @torch.no_grad()
    def messages(self, clean: Tensor, corrupted: Tensor) -> Tensor:
        """What removing each sender's edge subtracts from its receiver, to first order, for the
        attribution methods: ``clean - corrupted`` ``[b, n, F, D]``; with post-sublayer norms a
        head's difference goes through its layer's norm linearised at the clean attention sum (the
        derivative :meth:`masked_metric` takes, so EAP-IG with one step is EAP)."""
        delta = clean - corrupted
        if not self.post_norm:
            return delta
        n_heads = self.model.cfg.n_heads
        delta = delta.clone()
        for layer in range(self.model.cfg.n_layers):
            hs = slice(1 + layer * (n_heads + 1), 1 + layer * (n_heads + 1) + n_heads)
            block = self.model.blocks[layer]
            s = clean[:, :, hs].sum(2) + block.attn.b_O
            s = s[:, :, None].expand_as(delta[:, :, hs]).contiguous()
            out = torch.func.jvp(
                lambda x, post=block.ln1_post: apply_norm(post, x), (s,), (delta[:, :, hs],)
            )
            delta[:, :, hs] = out[1]
        return delta

    def _masked(
        self,
        group: _Group,
        out_of_circuit: Tensor,
        after: list[tuple[str, Callable[..., Any]]] | None = None,
    ) -> Tensor:
        """Metric per circuit and prompt ``[C, b]`` for out-of-circuit masks ``[C, F, Bk]`` (float);
        hooks ``after`` run after the masking ones (they see the masked receiver inputs)."""
        cfg = self.model.cfg
        n_circ = out_of_circuit.shape[0]
        b, n = group.tokens.shape
        n_heads = cfg.n_heads
        # [C, F, b, n, D]: one contiguous block per circuit and sender, so that the update of a
        # receiver input is a batched matmul over the senders (no transposed copies)
        diff = torch.zeros(
            (n_circ, self.graph.shape[0], b, n, cfg.d_model),
            dtype=cfg.dtype,
            device=group.tokens.device,
        )

        def store(f: int, act: Tensor) -> None:
            corr = group.corrupted[..., f, :]
            diff[:, f] = act.reshape(n_circ, b, n, -1) - corr

        sums: dict[int, Tensor] = {}  # post-norm models: each layer's pre-norm attention sum

        def combine(masks: Tensor, senders: slice) -> Tensor:
            """``sum_f masks[c, col, f] * diff[c, f]`` over ``senders``: ``[C, n_cols, b, n, D]``."""
            flat = diff[:, senders].reshape(n_circ, masks.shape[2], -1)
            if torch.is_grad_enabled():  # later senders are written into diff in place
                flat = flat.clone()
            return torch.bmm(masks, flat).reshape(n_circ, -1, b, n, cfg.d_model)

        def update(cols: slice, n_src: int) -> Tensor:
            """What the out-of-circuit senders before ``n_src`` remove from receivers ``cols``:
            ``sum_f out[c, f, col] * diff[c, f]`` (post-norm heads: through their layer's norm)."""
            masks = out_of_circuit[:, :n_src, cols].transpose(1, 2)  # [C, cols, F]
            if not self.post_norm:
                return combine(masks, slice(0, n_src))
            removed = combine(masks * self._not_head[:n_src], slice(0, n_src))
            for layer in range(cfg.n_layers):
                hs = slice(1 + layer * (n_heads + 1), 1 + layer * (n_heads + 1) + n_heads)
                if hs.stop > n_src:
                    break
                mixed = combine(masks[:, :, hs], hs)  # pre-norm change of this layer's attention
                post = self.model.blocks[layer].ln1_post
                s = sums[layer].reshape(n_circ, 1, b, n, cfg.d_model)
                removed = removed + apply_norm(post, s) - apply_norm(post, s - mixed)
            return removed

        def heads_in(act: Tensor, hook: Any, cols: slice, n_src: int) -> Tensor:
            upd = update(cols, n_src).permute(0, 2, 3, 1, 4)  # [C, b, n, H, D]
            return act - upd.reshape(act.shape)

        def resid_in(act: Tensor, hook: Any, col: int, n_src: int) -> Tensor:
            cols = slice(col, col + 1) if col >= 0 else slice(col, None)
            return act - update(cols, n_src).reshape(act.shape)

        hooks = self._sender_hooks(store, sums if self.post_norm else None)
        n_fwd = self.graph.shape[0]
        for layer in range(cfg.n_layers):
            first = 1 + layer * (n_heads + 1)  # senders before this layer's heads
            col0 = layer * (3 * n_heads + 1)
            for i, site in enumerate("qkv"):
                cols = slice(col0 + i * n_heads, col0 + (i + 1) * n_heads)
                hooks.append((f"blocks.{layer}.hook_{site}_input",
                              lambda a, hook, c=cols, s=first: heads_in(a, hook, c, s)))  # fmt: skip
            # parallel blocks: the MLP reads the block input, not this layer's heads
            mlp_src = first if self.parallel else first + n_heads
            hooks.append((f"blocks.{layer}.hook_mlp_in",
                          lambda a, hook, c=col0 + 3 * n_heads, s=mlp_src: resid_in(a, hook, c, s)))  # fmt: skip
        hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post",
                      lambda a, hook: resid_in(a, hook, -1, n_fwd)))  # fmt: skip
        resid = self.model.run_with_hooks(
            group.tokens.repeat(n_circ, 1),
            fwd_hooks=hooks + (after or []),
            stop_at_layer=cfg.n_layers,
        )
        return group.metric(resid[:, -1].reshape(n_circ, b, -1))

    def masked_metric(self, out_of_circuit: Tensor) -> Tensor:
        """Differentiable mean metric per circuit ``[C]`` for float edge weights ``[C, F, Bk]``:
        0 keeps an edge clean, 1 gives it the corrupted message, values between interpolate
        (gradients of attribution methods and learned masks flow through them)."""
        cfg = self.model.cfg
        weights = out_of_circuit.to(dtype=cfg.dtype, device=cfg.device)
        weights = weights * self._real.to(device=cfg.device, dtype=cfg.dtype)
        total = torch.zeros(weights.shape[0], dtype=cfg.dtype, device=cfg.device)
        with _split_inputs(self.model):
            for g in self.groups:
                total = total + self._masked(g, weights).sum(1)
        return total / self.n_prompts

    def metric_values(self, in_graph: np.ndarray) -> np.ndarray:
        """Mean metric over the prompts for each circuit: ``in_graph`` ``[C, F, Bk]`` (or one ``[F, Bk]``)."""
        masks = torch.from_numpy(np.asarray(in_graph, dtype=bool))
        if masks.dim() == 2:
            masks = masks[None]
        if tuple(masks.shape[1:]) != self.graph.shape:
            raise EvaluationError(
                f"circuit masks must be [C, {self.graph.shape[0]}, {self.graph.shape[1]}]"
            )
        cfg = self.model.cfg
        out_mask = (self._real & ~masks).to(dtype=cfg.dtype, device=cfg.device)
        totals = torch.zeros(masks.shape[0], dtype=torch.float64)
        with torch.inference_mode(), _split_inputs(self.model):
            for g in self.groups:
                b, n = g.tokens.shape
                per = b * n * self.graph.shape[0] * cfg.d_model * out_mask.element_size()
                step = max(1, MEMORY_BUDGET // per)
                for s in range(0, masks.shape[0], step):
                    values = self._masked(g, out_mask[s : s + step])
                    totals[s : s + step] += values.double().sum(1).cpu()
        return (totals / self.n_prompts).numpy()

    @torch.inference_mode()
    def group_values(self) -> tuple[float, np.ndarray]:
        """The full model's mean metric and, per receiver column ``[Bk]``, the mean metric with
        every edge into that receiver input corrupted (and all others clean) — as
        :meth:`metric_values` of those circuits, but fast.

        With all its edges corrupted a receiver input no longer depends on its senders' values in
        this run (it reads ``actual - sum (actual - corrupted)``, post-norm heads through their
        norm), so it equals its value in the empty circuit, while everything upstream of it stays
        clean: one empty-circuit masked forward per length group captures every receiver's
        input, and each layer's receivers then run as activation patches stacked on the batch
        axis, from that layer's clean residual stream (the logits' input is the empty circuit's
        final residual: no further forward)."""
        cfg = self.model.cfg
        n_layers, n_heads = cfg.n_layers, cfg.n_heads
        per_layer = 3 * n_heads + 1  # q, k, v of each head, then the MLP input
        totals = torch.zeros(self.graph.shape[1], dtype=torch.float64)
        full = 0.0
        empty = self._real.to(dtype=cfg.dtype, device=cfg.device)[None]  # every edge corrupted
        with _split_inputs(self.model):
            for g in self.groups:
                b, n = g.tokens.shape
                resid_pre: dict[int, Tensor] = {}
                inputs: dict[tuple[int, str], Tensor] = {}  # (layer, q|k|v|mlp) -> masked input

                def keep(into: dict[Any, Tensor], key: Any) -> Callable[..., None]:
                    return lambda act, hook: into.__setitem__(key, act.clone())

                clean = self.model.run_with_hooks(
                    g.tokens,
                    fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", keep(resid_pre, layer))
                               for layer in range(n_layers)],
                    stop_at_layer=n_layers,
                )  # fmt: skip
                full += float(g.metric(clean[None, :, -1]).double().sum())
                grab = [(f"blocks.{layer}.hook_{site}_input", keep(inputs, (layer, site)))
                        for layer in range(n_layers) for site in "qkv"]  # fmt: skip
                grab += [(f"blocks.{layer}.hook_mlp_in", keep(inputs, (layer, "mlp")))
                         for layer in range(n_layers)]  # fmt: skip
                totals[-1] += float(self._masked(g, empty, grab).double().sum())
                mask = self.model.input_to_embed(g.tokens)[3]  # left-padding tokenizers only
                elt = torch.finfo(cfg.dtype).bits // 8
                per = b * n * elt * (4 * n_heads * cfg.d_model + n_heads * n + 2 * (cfg.d_mlp or 0))
                step = max(1, min(per_layer, MEMORY_BUDGET // per))
                for layer in range(n_layers):
                    for s in range(0, per_layer, step):
                        js = list(range(s, min(s + step, per_layer)))
                        values = self._patched(g, layer, js, resid_pre[layer], inputs, mask)
                        col0 = layer * per_layer
                        totals[col0 + js[0] : col0 + js[-1] + 1] += values
        return full / self.n_prompts, (totals / self.n_prompts).numpy()

    def _patched(
        self,
        group: _Group,
        layer: int,
        js: list[int],
        resid_pre: Tensor,
        inputs: dict[tuple[int, str], Tensor],
        mask: Tensor | None,
    ) -> Tensor:
        """Summed metric ``[len(js)]`` of receivers ``js`` of ``layer`` (``j = site * H + head``,
        ``3 H`` the MLP) each given its ``inputs`` value, the rest clean: one forward from the
        layer's clean residual ``resid_pre``, the receivers stacked on the batch axis."""
        cfg = self.model.cfg
        n_heads, k = cfg.n_heads, len(js)
        b, n = group.tokens.shape

        def heads(act: Tensor, hook: Any, site: int) -> Tensor:
            rows = [(i, j % n_heads) for i, j in enumerate(js) if j // n_heads == site]
            if not rows:
                return act
            out = act.reshape(k, b, n, n_heads, -1).clone()  # q/k/v inputs are expanded views
            i, h = (torch.tensor(x, device=act.device) for x in zip(*rows, strict=True))
            out[i, :, :, h] = inputs[(layer, "qkv"[site])].permute(2, 0, 1, 3)[h]
            return out.reshape(act.shape)

        def mlp(act: Tensor, hook: Any) -> Tensor:
            out = act.reshape(k, b, n, -1).clone()
            out[-1] = inputs[(layer, "mlp")]
            return out.reshape(act.shape)

        hooks: list[tuple[str, Callable[..., Any]]] = [
            (f"blocks.{layer}.hook_{site}_input", lambda a, hook, s=i: heads(a, hook, s))
            for i, site in enumerate("qkv")
        ]
        if js[-1] == 3 * n_heads:
            hooks.append((f"blocks.{layer}.hook_mlp_in", mlp))
        resid = self.model.run_with_hooks(
            resid_pre.repeat(k, 1, 1),
            fwd_hooks=hooks,
            start_at_layer=layer,
            stop_at_layer=cfg.n_layers,
            attention_mask=None if mask is None else mask.repeat(k, 1),
        )
        return group.metric(resid[:, -1].reshape(k, b, -1)).double().sum(1).cpu()
