"""The tensor side of the model seam: one :class:`Arch` per loaded model.

Everything the node functions, the activation cache, the attribution VJP and the metric readout
compute differently per architecture lives here, recomputed from the model's own weights and
modules exactly as TransformerLens 3.9's ``HookedTransformer`` does:

- hook names of the residual stream the engine caches (the MLP reads ``hook_resid_mid``, or the
  block input ``hook_resid_pre`` in parallel blocks);
- per-layer attention weights per **query** head (grouped-query key/value weights expanded, as
  TL's ``W_K`` / ``W_V`` properties do), ``attn_scale``;
- normalisation (TL's own norm modules; a plain LayerNorm runs as one fused kernel);
- rotary positions from the attention module's own ``rotary_cos`` / ``rotary_sin`` tables (so every
  base / scaling variant TL implements is reproduced), full or partial rotary dimension, adjacent
  or half-split pairs;
- attention-score soft-capping, the causal mask and local (sliding-window) layers;
- MLP variants (the block's own MLP module: plain, gated, LN-activation) and Gemma-2's norms after
  the sublayers; the final-logit soft-cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pathdb.arch import check_supported, parallel_blocks


def apply_norm(module: Any, x: Tensor) -> Tensor:
    """``module(x)`` for a TransformerLens norm; a plain ``LayerNorm`` (weights ``w``, ``b``) in
    float32/64 runs as one fused ``F.layer_norm`` kernel (same formula, no hook calls)."""
    if type(module).__name__ == "LayerNorm" and x.dtype in (torch.float32, torch.float64):
        w, b = getattr(module, "w", None), getattr(module, "b", None)
        eps = getattr(module, "eps", None)
        if (
            isinstance(w, Tensor)
            and isinstance(b, Tensor)
            and eps is not None
            and w.dtype == x.dtype
        ):
            return F.layer_norm(x, (x.shape[-1],), w, b, float(eps))
    return module(x)


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """Gemma's ``cap * tanh(x / cap)``; ``x`` unchanged (the same tensor) when ``cap`` is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def _cap(value: Any) -> float | None:
    """A config soft-cap as a float, None when disabled (TL: only strictly positive caps apply)."""
    return float(value) if value is not None and value > 0 else None


def logit_cap(model: Any) -> float | None:
    """The model's final-logit soft-cap (Gemma-2), None when it has none."""
    return _cap(getattr(model.cfg, "output_logits_soft_cap", None))


@dataclass(frozen=True)
class AttnWeights:
    """One layer's attention weights per query head: ``W_Q/W_K/W_V [H, D, dh]``, ``W_O [H, dh, D]``."""

    W_Q: Tensor
    b_Q: Tensor
    W_K: Tensor
    b_K: Tensor
    W_V: Tensor
    b_V: Tensor
    W_O: Tensor
    b_O: Tensor


def causal_mask(t_q: int, t_k: int, device: torch.device, window: int | None = None) -> Tensor:
    """Boolean ``[t_q, t_k]`` mask on ``device``, True where a key is not attended: after the query,
    or (sliding window) ``window`` or more positions before it."""
    keys = torch.arange(t_k, device=device)[None, :]
    queries = torch.arange(t_q, device=device)[:, None]
    mask = keys > queries
    if window is not None:
        mask = mask | (keys <= queries - window)
    return mask


def engine_model(model: Any) -> Any:
    """The model as the engine reads it: a TransformerLens 4 ``TransformerBridge`` behind its
    HookedTransformer-surface adapter (:mod:`pathdb.models.bridge`), anything else unchanged."""
    if type(model).__name__ == "TransformerBridge":
        from pathdb.models.bridge import adapt

        return adapt(model)
    return model


class Arch:
    """Architecture facts and per-layer computations of one loaded ``HookedTransformer`` (TL 3.9)
    or TransformerLens 4 bridge (adapted by :func:`engine_model`)."""

    def __init__(self, model: Any) -> None:
        """Check support (one error naming every unsupported feature), then read the facts once."""
        model = engine_model(model)
        check_supported(model)
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        self.blocks = list(model.blocks)
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.parallel: bool = parallel_blocks(cfg)
        self.rotary: bool = cfg.positional_embedding_type == "rotary"
        self.rotary_dim: int = int(cfg.rotary_dim or cfg.d_head) if self.rotary else 0
        self.adjacent_pairs: bool = bool(cfg.rotary_adjacent_pairs)
        self.post_norm: bool = bool(cfg.use_normalization_before_and_after)
        self.score_cap: float | None = _cap(cfg.attn_scores_soft_cap)
        self.attn_scale: list[float] = [float(b.attn.attn_scale) for b in self.blocks]
        self.window: list[int | None] = [
            int(cfg.window_size) if getattr(b.attn, "attn_type", "global") == "local" else None
            for b in self.blocks
        ]
        self.device: torch.device = model.W_E.device  # every tensor the engine makes lives here
        self._attn: dict[int, AttnWeights] = {}

    # ---- hook names ----------------------------------------------------------------------
    embed_hook = "hook_embed"

    @staticmethod
    def resid_pre_hook(layer: int) -> str:
        """Block ``layer``'s input (what its attention reads)."""
        return f"blocks.{layer}.hook_resid_pre"

    def mlp_in_hook(self, layer: int) -> str:
        """What block ``layer``'s MLP reads: the block input in parallel blocks, else ``resid_mid``."""
        return self.resid_pre_hook(layer) if self.parallel else f"blocks.{layer}.hook_resid_mid"

    @property
    def final_hook(self) -> str:
        """The residual stream the metric reads (after the last block)."""
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    # ---- weights -------------------------------------------------------------------------
    def attn(self, layer: int) -> AttnWeights:
        """Layer ``layer``'s attention weights per query head (grouped key/value heads expanded once)."""
        hit = self._attn.get(layer)
        if hit is None:
            a = self.blocks[layer].attn
            if not hasattr(a, "_W_K"):  # plain attention: the parameters themselves
                hit = AttnWeights(a.W_Q, a.b_Q, a.W_K, a.b_K, a.W_V, a.b_V, a.W_O, a.b_O)
            else:  # grouped: TL's expanding properties, once, as plain tensors usable by autograd
                with torch.inference_mode(False), torch.no_grad():
                    kv = [t.detach().clone() for t in (a.W_K, a.b_K, a.W_V, a.b_V)]
                hit = AttnWeights(a.W_Q, a.b_Q, kv[0], kv[1], kv[2], kv[3], a.W_O, a.b_O)
            self._attn[layer] = hit
        return hit

    # ---- normalisation and MLPs ----------------------------------------------------------
    def ln1(self, layer: int, x: Tensor) -> Tensor:
        """Block ``layer``'s attention-input norm over the last axis."""
        return apply_norm(self.blocks[layer].ln1, x)

    def ln2(self, layer: int, x: Tensor) -> Tensor:
        """Block ``layer``'s MLP-input norm over the last axis."""
        return apply_norm(self.blocks[layer].ln2, x)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The MLP node's output for its residual input rows ``x``: ``MLP(LN2(x))``, followed by the
        post-MLP norm where the model has one (an MLP node's output includes its post-norm)."""
        plain = self.plain_mlp(layer)
        if plain is not None:  # TL's MLP.forward without its hook calls: the same kernels, bits
            ln = self.ln2(layer, x)
            pre = torch.addmm(plain.b_in, ln.reshape(-1, ln.shape[-1]), plain.W_in)
            out = torch.addmm(plain.b_out, plain.act_fn(pre), plain.W_out)
            return out.view(*ln.shape[:-1], out.shape[-1])
        out = self.blocks[layer].mlp(self.ln2(layer, x))
        if self.post_norm:
            out = apply_norm(self.blocks[layer].ln2_post, out)
        return out

    def plain_mlp(self, layer: int) -> Any | None:
        """The MLP module when it is TL's plain ``MLP`` (``act(x W_in + b_in) W_out + b_out``, no
        LN activation, no post-norm): its VJP can skip the forward pass. None otherwise."""
        mlp = self.blocks[layer].mlp
        if type(mlp).__name__ != "MLP" or self.cfg.is_layer_norm_activation() or self.post_norm:
            return None
        return mlp

    def attn_out(self, layer: int, clean_sum: Tensor, delta: Tensor) -> Tensor:
        """The residual change of an attention node whose pre-norm contribution changes by ``delta``:
        ``delta`` itself, or ``ln_post(S) - ln_post(S - delta)`` with ``S`` the clean pre-norm
        attention sum (all heads + ``b_O``) where the model normalises the attention output."""
        if not self.post_norm:
            return delta
        post = self.blocks[layer].ln1_post
        return apply_norm(post, clean_sum) - apply_norm(post, clean_sum - delta)

    # ---- attention -----------------------------------------------------------------------
    def rope(
        self, layer: int, x: Tensor, pos: int | slice | list[int], head_axis: bool = False
    ) -> Tensor:
        """Rotate queries/keys ``x [..., dh]`` at positions ``pos`` (the axis before the head axis
        when ``head_axis``, else the second-to-last; a single int for one position) with the layer's
        own rotary tables; ``x`` unchanged without rotary positions."""
        if not self.rotary:
            return x
        a = self.blocks[layer].attn
        cos, sin = a.rotary_cos[pos], a.rotary_sin[pos]
        if head_axis and not isinstance(pos, int):
            cos, sin = cos[:, None], sin[:, None]
        rd = self.rotary_dim
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        if self.adjacent_pairs:
            flip = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
        else:
            n = rd // 2
            flip = torch.cat((-x_rot[..., n:], x_rot[..., :n]), dim=-1)
        rotated = x_rot * cos.to(x.dtype) + flip * sin.to(x.dtype)
        return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)

    def cap_scores(self, scores: Tensor) -> Tensor:
        """Attention-score soft-cap (applied to the scaled scores, before masking)."""
        return soft_cap(scores, self.score_cap)

    def mask(self, layer: int, seq_len: int, device: torch.device) -> Tensor:
        """Boolean ``[T, T]`` mask of layer ``layer`` (causal, plus its sliding window if local)."""
        return causal_mask(seq_len, seq_len, device, self.window[layer])

    def run_attention(self, layer: int, resid_pre: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """One layer's clean attention from its input ``[B, T, D]``: queries/keys/values per query
        head (rotated), scores (scaled, capped, masked), pattern, per-head outputs ``z @ W_O``,
        per-source ``v @ W_O`` and the pre-norm attention sum (all heads + ``b_O``)."""
        w = self.attn(layer)
        T = resid_pre.shape[1]
        x = self.ln1(layer, resid_pre)
        q = torch.einsum("btd,hdk->bthk", x, w.W_Q) + w.b_Q
        k = torch.einsum("btd,hdk->bthk", x, w.W_K) + w.b_K
        v = torch.einsum("btd,hdk->bthk", x, w.W_V) + w.b_V
        q = self.rope(layer, q, slice(0, T), head_axis=True)
        k = self.rope(layer, k, slice(0, T), head_axis=True)
        s = self.cap_scores(torch.einsum("bqhk,bthk->bhqt", q, k) / self.attn_scale[layer])
        s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        z = torch.einsum("bhqt,bthk->bqhk", p, v)
        head_out = torch.einsum("bthk,hkd->bthd", z, w.W_O)
        return {
            "q": q, "k": k, "v": v, "scores": s, "pattern": p, "head_out": head_out,
            "vo": torch.einsum("bthk,hkd->bthd", v, w.W_O), "attn_sum": head_out.sum(2) + w.b_O,
        }  # fmt: skip
