"""Clean / counterfactual activation caches and start-message banks for the path engine.

One clean run (and one counterfactual run for counterfactual patching) through
``run_with_cache`` stores only the residual-stream inputs of every block. Everything the node
functions need is then recomputed once, *with the engine's own tensor code* (queries, keys,
values, attention scores and patterns, per-head outputs ``z @ W_O``, MLP outputs), so that a node
function evaluated on its clean input reproduces its cached clean output to rounding: a zero
message gives a zero output message (up to ~1e-15 in float64). ``use_attn_result`` is never needed.

Start messages ``m_0`` of all senders writing at one position are kept as one stacked tensor
(a *bank*, ``[n_senders, B, D]``; ``[n_senders, B, T, D]`` for non-positional senders), so the
candidates of a frontier path are a slice/gather of one tensor, never a Python loop of tensor ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pathdb.graph import ModelShape, Node, NodeKind

PatchType = Literal["zero", "counterfactual", "mean"]
PATCH_TYPES: tuple[str, ...] = ("zero", "counterfactual", "mean")


class UnsupportedModelError(ValueError):
    """The model uses an architecture feature the path engine does not implement."""


def check_supported(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming the feature if ``model`` is not a plain pre-LN
    decoder (standard positional embeddings, LayerNorm/RMSNorm, sequential attn -> MLP, plain MLP,
    one key/value head per query head)."""
    try:
        from pathdb.models import ensure_supported
    except ImportError:  # the models package is optional for the engine
        pass
    else:
        ensure_supported(model)
    cfg = model.cfg
    problems: list[str] = []
    pos = getattr(cfg, "positional_embedding_type", "standard")
    if pos != "standard":
        problems.append(f"positional_embedding_type={pos!r} (rotary/ALiBi/shortformer are not supported)")
    if getattr(cfg, "normalization_type", None) not in ("LN", "LNPre", "RMS", "RMSPre"):
        problems.append(
            f"normalization_type={cfg.normalization_type!r} (a LayerNorm or RMSNorm is required)"
        )
    checks = {
        "parallel_attn_mlp": "parallel attention/MLP blocks",
        "gated_mlp": "gated MLPs",
        "attn_only": "attention-only models (no MLP nodes)",
        "use_local_attn": "local attention",
        "use_qk_norm": "query/key normalisation",
        "use_normalization_before_and_after": "normalisation before and after sublayers",
    }
    for attr, what in checks.items():
        if getattr(cfg, attr, False):
            problems.append(f"{attr}=True ({what})")
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if n_kv is not None and n_kv != cfg.n_heads:
        problems.append(f"n_key_value_heads={n_kv} (grouped-query attention)")
    if getattr(cfg, "attn_scores_soft_cap", -1.0) > 0:
        problems.append("attn_scores_soft_cap (soft-capped attention scores)")
    if getattr(cfg, "output_logits_soft_cap", -1.0) > 0:
        problems.append("output_logits_soft_cap (soft-capped logits)")
    if problems:
        raise UnsupportedModelError(
            "the path engine supports pre-LN decoders only; unsupported: " + "; ".join(problems)
        )


@dataclass
class RunCache:
    """Activations of one run (clean or counterfactual) that the engine needs, per layer."""

    embed: Tensor  # hook_embed [B, T, D]
    resid_pre: list[Tensor]  # [B, T, D] per layer
    resid_mid: list[Tensor]
    q: list[Tensor]  # [B, T, H, dh]
    k: list[Tensor]
    v: list[Tensor]
    scores: list[Tensor]  # [B, H, T, T], scaled, causal entries -inf
    pattern: list[Tensor]  # [B, H, T, T]
    head_out: list[Tensor]  # z @ W_O per head, [B, T, H, D]
    vo: list[Tensor]  # v @ W_O per head and source, [B, T, H, D]
    mlp_out: list[Tensor]  # [B, T, D]
    final: Tensor  # blocks.{L-1}.hook_resid_post [B, T, D]


def apply_norm(module: Any, x: Tensor) -> Tensor:
    """``module(x)`` for a TransformerLens norm; a plain ``LayerNorm`` (weights ``w``, ``b``) in
    float32/64 runs as one fused ``F.layer_norm`` kernel (same formula, no hook calls)."""
    if type(module).__name__ == "LayerNorm" and x.dtype in (torch.float32, torch.float64):
        w, b = getattr(module, "w", None), getattr(module, "b", None)
        eps = getattr(module, "eps", None)
        if isinstance(w, Tensor) and isinstance(b, Tensor) and eps is not None and w.dtype == x.dtype:
            return F.layer_norm(x, (x.shape[-1],), w, b, float(eps))
    return module(x)


class ModelWeights:
    """Per-layer modules and attention weights used by the node functions."""

    def __init__(self, model: Any) -> None:
        """Keep references to the model's LayerNorms, MLPs and attention weights."""
        self.model = model
        self.cfg = model.cfg
        self.blocks = list(model.blocks)
        self.n_layers: int = model.cfg.n_layers
        self.n_heads: int = model.cfg.n_heads
        self.d_head: int = model.cfg.d_head
        self.attn_scale: list[float] = [float(b.attn.attn_scale) for b in self.blocks]
        self.device: torch.device = model.W_E.device  # every tensor the engine makes lives here

    def ln1(self, layer: int, x: Tensor) -> Tensor:
        """Block ``layer``'s attention-input norm over the last axis."""
        return apply_norm(self.blocks[layer].ln1, x)

    def ln2(self, layer: int, x: Tensor) -> Tensor:
        """Block ``layer``'s MLP-input norm over the last axis."""
        return apply_norm(self.blocks[layer].ln2, x)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """``MLP(LN2(x))`` of block ``layer`` for residual rows of any leading shape."""
        return self.blocks[layer].mlp(self.ln2(layer, x))

    def attn(self, layer: int) -> Any:
        """The attention module of block ``layer`` (``W_Q [H, D, dh]`` etc.)."""
        return self.blocks[layer].attn


def causal_mask(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """Boolean ``[t_q, t_k]`` mask on ``device``, True where key position > query position."""
    return torch.arange(t_k, device=device)[None, :] > torch.arange(t_q, device=device)[:, None]


def _run(weights: ModelWeights, model: Any, tokens: Tensor) -> RunCache:
    L = weights.n_layers
    tokens = tokens.to(weights.device)
    names = {"hook_embed", f"blocks.{L - 1}.hook_resid_post"}
    for layer in range(L):
        names.add(f"blocks.{layer}.hook_resid_pre")
        names.add(f"blocks.{layer}.hook_resid_mid")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        out: dict[str, list[Tensor]] = {k: [] for k in ("q", "k", "v", "s", "p", "ho", "vo", "mlp")}
        T = tokens.shape[1]
        mask = causal_mask(T, T, tokens.device)
        for layer in range(L):
            attn = weights.attn(layer)
            x = weights.ln1(layer, cache[f"blocks.{layer}.hook_resid_pre"])
            q = torch.einsum("btd,hdk->bthk", x, attn.W_Q) + attn.b_Q
            k = torch.einsum("btd,hdk->bthk", x, attn.W_K) + attn.b_K
            v = torch.einsum("btd,hdk->bthk", x, attn.W_V) + attn.b_V
            s = torch.einsum("bqhk,bthk->bhqt", q, k) / weights.attn_scale[layer]
            s = s.masked_fill(mask, float("-inf"))
            p = torch.softmax(s, dim=-1)
            z = torch.einsum("bhqt,bthk->bqhk", p, v)
            out["q"].append(q)
            out["k"].append(k)
            out["v"].append(v)
            out["s"].append(s)
            out["p"].append(p)
            out["ho"].append(torch.einsum("bthk,hkd->bthd", z, attn.W_O))
            out["vo"].append(torch.einsum("bthk,hkd->bthd", v, attn.W_O))
            out["mlp"].append(weights.mlp(layer, cache[f"blocks.{layer}.hook_resid_mid"]))
        return RunCache(
            embed=cache["hook_embed"],
            resid_pre=[cache[f"blocks.{i}.hook_resid_pre"] for i in range(L)],
            resid_mid=[cache[f"blocks.{i}.hook_resid_mid"] for i in range(L)],
            q=out["q"],
            k=out["k"],
            v=out["v"],
            scores=out["s"],
            pattern=out["p"],
            head_out=out["ho"],
            vo=out["vo"],
            mlp_out=out["mlp"],
            final=cache[f"blocks.{L - 1}.hook_resid_post"],
        )


@dataclass
class Bank:
    """Stacked start messages of every sender writing at one position (or at all positions).

    Rows are in :func:`pathdb.graph.predecessors` order, so the default candidate list of any
    receiver (single heads, ``kv`` site) is a contiguous *prefix slice* of the bank (no gather).
    With ``K = r + 1`` sources at position ``r`` (``K = 0`` for the non-positional bank) and
    ``S = H (1 + K) + 1`` rows per layer: ``[embed]``, then per layer ``[per head: q-side, kv-side
    sources 0..K-1] + [mlp]``, then after all layers the whole-layer rows ``[q-side, kv sources
    0..K-1]`` per layer (the ``batch_heads`` pre-screen). kv/k/v senders with a source share one row
    (the same single-source output); kv senders without a source share the q row.
    """

    position: int | None
    messages: Tensor  # [n, B, D] (positional) or [n, B, T, D]
    n_heads: int
    n_layers: int = 0

    @property
    def n_sources(self) -> int:
        """``K``: key/value sources per head (0 for the non-positional bank)."""
        return 0 if self.position is None else self.position + 1

    def per_layer(self) -> int:
        """Rows per layer in the per-head part."""
        return self.n_heads * (1 + self.n_sources) + 1

    def rows(self, kind: np.ndarray, layer: np.ndarray, head: np.ndarray, kv: np.ndarray) -> np.ndarray:
        """Vectorised row numbers; ``kind`` codes 0 embed / 1 attn / 2 mlp, ``head`` and ``kv`` -1 for None."""
        K1 = 1 + self.n_sources
        S = self.per_layer()
        base = 1 + layer * S
        src = np.where(kv >= 0, 1 + kv, 0)
        per_head = base + head * K1 + src
        whole = 1 + self.n_layers * S + layer * K1 + src
        attn = np.where(head >= 0, per_head, whole)
        return np.where(kind == 0, 0, np.where(kind == 2, base + S - 1, attn))

    @functools.cached_property
    def nonzero(self) -> np.ndarray:
        """Per row: does the start message have any non-zero entry? (With counterfactual
        patching, senders whose clean and counterfactual outputs agree start an exactly-zero
        message, which every node maps to exactly zero: such candidates score the clean value.)"""
        flat = self.messages.reshape(self.messages.shape[0], -1)
        return flat.ne(0).any(dim=1).cpu().numpy()

    def index(self, node: Node) -> int:
        """Row of ``node``'s start message (the node must write at this bank's position)."""
        if node.position != self.position:
            raise ValueError(f"{node.label} does not write at position {self.position}")
        if node.kind is NodeKind.EMBED:
            return 0
        K1 = 1 + self.n_sources
        S = self.per_layer()
        base = 1 + node.layer * S
        if node.kind is NodeKind.MLP:
            return base + S - 1
        if node.kind is not NodeKind.ATTN:
            raise ValueError(f"{node.label} is not a sender")
        src = 1 + node.kv_position if node.is_kv and node.kv_position is not None else 0
        if node.head is None:
            return 1 + self.n_layers * S + node.layer * K1 + src
        return base + node.head * K1 + src


def take_rows(messages: Tensor, rows: np.ndarray) -> Tensor:
    """``messages[rows]``: a zero-copy slice when ``rows`` is a contiguous ascending run."""
    first = int(rows[0])
    n = len(rows)
    if n == 1 or (int(rows[-1]) - first == n - 1 and bool((np.diff(rows) == 1).all())):
        return messages[first : first + n]
    return messages.index_select(0, torch.from_numpy(rows).to(messages.device))


@dataclass
class ActivationCache:
    """Clean (+ reference) activations of a prompt batch and lazily built start-message banks.

    ``patch_type``: ``zero`` (reference output 0), ``counterfactual`` (reference = the
    counterfactual run) or ``mean`` (reference = clean output averaged over the prompt batch).
    The start message of a sender is ``out_clean - out_reference``.
    """

    weights: ModelWeights
    shape: ModelShape
    clean: RunCache
    ref: RunCache | None
    patch_type: str
    tokens: Tensor
    banks: dict[int | None, Bank] = field(default_factory=dict)
    memo: dict[tuple[Any, ...], dict[str, Tensor]] = field(default_factory=dict)  # node-function pieces

    @classmethod
    def build(
        cls,
        model: Any,
        tokens: Tensor,
        cf_tokens: Tensor | None = None,
        patch_type: str = "counterfactual",
    ) -> ActivationCache:
        """Run the model once on ``tokens`` (and once on ``cf_tokens``) and keep what the engine needs."""
        check_supported(model)
        if patch_type not in PATCH_TYPES:
            raise ValueError(f"patch_type={patch_type!r}: choose one of {', '.join(PATCH_TYPES)}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        weights = ModelWeights(model)
        clean = _run(weights, model, tokens)
        ref: RunCache | None = None
        if patch_type == "counterfactual":
            if cf_tokens is None:
                raise ValueError("patch_type='counterfactual' needs cf_tokens (counterfactual prompts)")
            if cf_tokens.shape != tokens.shape:
                raise ValueError(
                    f"cf_tokens shape {tuple(cf_tokens.shape)} != tokens shape {tuple(tokens.shape)}"
                )
            ref = _run(weights, model, cf_tokens)
        shape = ModelShape(weights.n_layers, weights.n_heads, tokens.shape[1])
        return cls(weights, shape, clean, ref, patch_type, tokens)

    @property
    def batch(self) -> int:
        """Number of prompts."""
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """Prompt length ``T``."""
        return int(self.tokens.shape[1])

    # ---- start messages ---------------------------------------------------------------------
    def _sender_outputs(self, run: RunCache, position: int | None) -> Tensor:
        """Stacked sender outputs of one run in :class:`Bank` row order."""
        rows = slice(None) if position is None else position
        parts: list[Tensor] = [run.embed[:, rows][None]]
        wholes: list[Tensor] = []
        for layer in range(self.weights.n_layers):
            b_O = self.weights.attn(layer).b_O
            ho = run.head_out[layer][:, rows].movedim(-2, 0)  # [H, B, (T,) D]
            if position is None:
                parts.append(ho)
                wholes.append((ho.sum(0) + b_O)[None])
            else:
                pat = run.pattern[layer][:, :, position, : position + 1]  # [B, H, K]
                vo = run.vo[layer][:, : position + 1]  # [B, K, H, D]
                ss = (pat.permute(0, 2, 1)[..., None] * vo).permute(2, 1, 0, 3)  # [H, K, B, D]
                parts.append(torch.cat([ho[:, None], ss], dim=1).flatten(0, 1))  # per head: q, kv 0..K-1
                whole_q = (ho.sum(0) + b_O)[None]
                whole_kv = ss.sum(0) + b_O  # [K, B, D]
                wholes.append(torch.cat([whole_q, whole_kv], dim=0))
            parts.append(run.mlp_out[layer][:, rows][None])
        return torch.cat(parts + wholes, dim=0).contiguous()

    @property
    def device(self) -> torch.device:
        """The device of the model and of every cached activation (engine tensors are made here)."""
        return self.weights.device

    @functools.cached_property
    def causal(self) -> Tensor:
        """Boolean ``[T, T]`` causal mask on the cache's device (True where key > query), built once."""
        with torch.inference_mode(False):  # a plain tensor: autograd may save it (attribution VJPs)
            return causal_mask(self.seq_len, self.seq_len, self.device)

    def bank(self, position: int | None) -> Bank:
        """The start-message bank of senders writing at ``position`` (built once, then reused)."""
        if position not in self.banks:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable anywhere
                out = self._sender_outputs(self.clean, position)
                if self.patch_type == "zero":
                    msgs = out
                elif self.patch_type == "counterfactual":
                    assert self.ref is not None
                    msgs = out - self._sender_outputs(self.ref, position)
                else:
                    msgs = out - out.mean(dim=1, keepdim=True)
            self.banks[position] = Bank(position, msgs, self.weights.n_heads, self.weights.n_layers)
        return self.banks[position]

    def start_messages(self, nodes: list[Node]) -> Tensor:
        """Start messages of ``nodes`` (all writing at the same position), stacked on axis 0."""
        if not nodes:
            raise ValueError("start_messages needs at least one node")
        bank = self.bank(nodes[0].position)
        return take_rows(bank.messages, np.array([bank.index(n) for n in nodes], dtype=np.int64))

    def release_banks(self) -> None:
        """Drop all cached banks and node-function pieces (they are rebuilt on demand)."""
        self.banks.clear()
        self.memo.clear()
