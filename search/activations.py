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
from torch import Tensor

from pathdb.arch import UnsupportedModelError, check_supported
from pathdb.arch.compute import Arch
from pathdb.graph import ModelShape, Node, NodeKind

__all__ = [
    "PATCH_TYPES",
    "ActivationCache",
    "Bank",
    "RoleMean",
    "RunCache",
    "UnsupportedModelError",
    "check_supported",
]

PatchType = Literal["zero", "counterfactual", "mean"]
PATCH_TYPES: tuple[str, ...] = ("zero", "counterfactual", "mean")


@dataclass
class RunCache:
    """Activations of one run (clean or counterfactual) that the engine needs, per layer."""

    embed: Tensor  # hook_embed [B, T, D]
    resid_pre: list[Tensor]  # [B, T, D] per layer
    mlp_in: list[Tensor]  # what each MLP reads: resid_mid (resid_pre in parallel blocks)
    q: list[Tensor]  # [B, T, H, dh] per query head, rotated
    k: list[Tensor]  # per query head (grouped key/value heads expanded), rotated
    v: list[Tensor]
    scores: list[Tensor]  # [B, H, T, T], scaled, soft-capped, masked entries -inf
    pattern: list[Tensor]  # [B, H, T, T]
    head_out: list[Tensor]  # z @ W_O per head, [B, T, H, D]
    vo: list[Tensor]  # v @ W_O per head and source, [B, T, H, D]
    attn_sum: list[Tensor]  # pre-norm attention output (all heads + b_O), [B, T, D]
    mlp_out: list[Tensor]  # [B, T, D], post-MLP norm included
    final: Tensor  # blocks.{L-1}.hook_resid_post [B, T, D]


def _run(weights: Arch, model: Any, tokens: Tensor) -> RunCache:
    """One run through the model, keeping the residual inputs; everything else recomputed by the seam."""
    L = weights.n_layers
    tokens = tokens.to(weights.device)
    pre = [weights.resid_pre_hook(i) for i in range(L)]
    mid = [weights.mlp_in_hook(i) for i in range(L)]
    names = {weights.embed_hook, weights.final_hook, *pre, *mid}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        out: dict[str, list[Tensor]] = {}
        T = tokens.shape[1]
        for layer in range(L):
            mask = weights.mask(layer, T, tokens.device)
            for key, value in weights.run_attention(layer, cache[pre[layer]], mask).items():
                out.setdefault(key, []).append(value)
            out.setdefault("mlp", []).append(weights.mlp(layer, cache[mid[layer]]))
        return RunCache(
            embed=cache[weights.embed_hook],
            resid_pre=[cache[n] for n in pre],
            mlp_in=[cache[n] for n in mid],
            q=out["q"],
            k=out["k"],
            v=out["v"],
            scores=out["scores"],
            pattern=out["pattern"],
            head_out=out["head_out"],
            vo=out["vo"],
            attn_sum=out["attn_sum"],
            mlp_out=out["mlp"],
            final=cache[weights.final_hook],
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

    def rows(
        self, kind: np.ndarray, layer: np.ndarray, head: np.ndarray, kv: np.ndarray
    ) -> np.ndarray:
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
        if self.position is None:  # derived from the row mask: one read-back serves both
            return np.asarray(self.row_mask.any(axis=1))
        flat = self.messages.reshape(self.messages.shape[0], -1)
        return flat.ne(0).any(dim=1).cpu().numpy()

    @functools.cached_property
    def row_mask(self) -> np.ndarray:
        """Non-positional bank only: ``[n, T]``, is sender ``i``'s start message non-zero on
        residual row ``r`` (over prompts and d_model)? Read back once (row-sparse messages)."""
        return self.messages.ne(0).any(dim=3).any(dim=1).cpu().numpy()

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
    counterfactual run) or ``mean`` (reference = clean output averaged over the prompt batch,
    position by position; or, for prompt sets of different lengths, the whole set's role-aligned
    mean of :class:`RoleMean`, which ``mean_reference`` names with this batch's position map).
    The start message of a sender is ``out_clean - out_reference``.
    """

    weights: Arch
    shape: ModelShape
    clean: RunCache
    ref: RunCache | None
    patch_type: str
    tokens: Tensor
    banks: dict[int | None, Bank] = field(default_factory=dict)
    memo: dict[tuple[Any, ...], dict[str, Tensor]] = field(
        default_factory=dict
    )  # node-function pieces
    mean_reference: tuple[RoleMean, np.ndarray] | None = (
        None  # whole-set mean, [B, T] axis positions
    )

    @classmethod
    def build(
        cls,
        model: Any,
        tokens: Tensor,
        cf_tokens: Tensor | None = None,
        patch_type: str = "counterfactual",
    ) -> ActivationCache:
        """Run the model once on ``tokens`` (and once on ``cf_tokens``) and keep what the engine needs."""
        weights = Arch(model)  # the support check: one error naming every unsupported feature
        if patch_type not in PATCH_TYPES:
            raise ValueError(f"patch_type={patch_type!r}: choose one of {', '.join(PATCH_TYPES)}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        clean = _run(weights, model, tokens)
        ref: RunCache | None = None
        if patch_type == "counterfactual":
            if cf_tokens is None:
                raise ValueError(
                    "patch_type='counterfactual' needs cf_tokens (counterfactual prompts)"
                )
            if cf_tokens.shape != tokens.shape:
                raise ValueError(
                    f"cf_tokens shape {tuple(cf_tokens.shape)} != tokens shape {tuple(tokens.shape)}"
                )
            ref = _run(weights, model, cf_tokens)
        shape = ModelShape(
            weights.n_layers, weights.n_heads, tokens.shape[1], parallel=weights.parallel
        )
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
                parts.append(
                    torch.cat([ho[:, None], ss], dim=1).flatten(0, 1)
                )  # per head: q, kv 0..K-1
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
    def masks(self) -> list[Tensor]:
        """Per layer, the boolean ``[T, T]`` attention mask on the cache's device (True where a key
        is not attended: causal, plus the sliding window of local layers), built once."""
        with torch.inference_mode(
            False
        ):  # plain tensors: autograd may save them (attribution VJPs)
            return [
                self.weights.mask(layer, self.seq_len, self.device)
                for layer in range(self.shape.n_layers)
            ]

    def _post_norm_rows(self, msgs: Tensor, position: int | None) -> Tensor:
        """Attention start messages as residual changes where the model normalises the attention
        output (Gemma-2): row ``c - c'`` becomes ``ln_post(S) - ln_post(S - c + c')``, ``S`` the clean
        pre-norm attention sum at the row's position(s) (docs/semantics.md, post-sublayer norms)."""
        bank = Bank(position, msgs, self.weights.n_heads, self.weights.n_layers)
        S, K1 = bank.per_layer(), 1 + bank.n_sources
        rows = slice(None) if position is None else position
        for layer in range(self.weights.n_layers):
            clean_sum = self.clean.attn_sum[layer][:, rows]
            base = 1 + layer * S
            whole = 1 + self.weights.n_layers * S + layer * K1
            for part in (slice(base, base + S - 1), slice(whole, whole + K1)):
                msgs[part] = self.weights.attn_out(layer, clean_sum, msgs[part])
        return msgs

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
                elif self.mean_reference is None:
                    msgs = out - out.mean(dim=1, keepdim=True)
                else:
                    shared, layout = self.mean_reference
                    msgs = out - shared.reference(self, layout, position)
                if self.weights.post_norm:
                    msgs = self._post_norm_rows(msgs, position)
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


def _row_parts(n_layers: int, n_heads: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a positional bank split into the query-side senders (embed, then per layer each
    head, the whole layer and the MLP) and the key/value senders ``[L (H + 1), K]`` per source."""
    bank = Bank(position, torch.empty(0), n_heads, n_layers)
    L, H = n_layers, n_heads
    layer = np.repeat(np.arange(L), H + 2)
    head = np.tile(np.r_[np.arange(H), -1, -1], L)
    kind = np.tile(np.r_[np.ones(H + 1, dtype=np.int64), 2], L)
    q = np.r_[0, bank.rows(kind, layer, head, np.full_like(layer, -1))]
    kv_layer = np.repeat(np.arange(L), H + 1)[:, None]
    kv_head = np.tile(np.r_[np.arange(H), -1], L)[:, None]
    sources = np.arange(bank.n_sources)[None, :]
    kv = bank.rows(np.ones_like(kv_layer), kv_layer, kv_head, sources)
    return q, kv


class RoleMean:
    """Mean patching's reference on prompts of different token lengths: at each role position, the
    sender outputs averaged over the prompts that have that position (docs/semantics.md).

    The caches that partition the prompt set are registered with :meth:`add` (``contributes``),
    each with its ``[B, T]`` map of tokens to axis positions (:class:`pathdb.positions.PositionAxis`);
    a cache over some of the same prompts (a role layout's own batch) is registered without
    contributing. A key/value sender's output from source ``k`` at query ``q`` is averaged over
    the prompts that have both positions. Means are taken on first use: per axis query position for
    positional banks, once for the position-free bank; means are never asked for before every
    contributing cache is registered (banks are built lazily, after the scorers).
    """

    def __init__(self, n_positions: int) -> None:
        self.n_positions = n_positions
        self.members: list[tuple[ActivationCache, np.ndarray]] = []
        self._at: dict[
            int, tuple[Tensor, Tensor]
        ] = {}  # axis position -> (q-side [n_q, D], kv [S, n_kv, D])
        self._free: Tensor | None = None  # position-free bank means per axis position [S, n, D]

    def add(self, cache: ActivationCache, layout: np.ndarray, *, contributes: bool) -> None:
        """Make ``cache`` (tokens -> axis positions ``layout``) read its mean reference here."""
        if layout.shape != tuple(cache.tokens.shape):
            raise ValueError(
                f"layout shape {layout.shape} != token shape {tuple(cache.tokens.shape)}"
            )
        cache.mean_reference = (self, layout)
        if contributes:
            self.members.append((cache, layout))

    def reference(self, cache: ActivationCache, layout: np.ndarray, position: int | None) -> Tensor:
        """The reference outputs of ``cache``'s prompts in its bank row order at token ``position``."""
        if position is None:
            idx = torch.from_numpy(layout).to(cache.device)
            return self._position_free()[idx].permute(2, 0, 1, 3)  # [n, B, T, D]
        q_rows, kv_rows = _row_parts(cache.shape.n_layers, cache.shape.n_heads, position)
        parts = [self._positional(int(s)) for s in layout[:, position]]
        q = torch.stack([qm for qm, _ in parts], dim=1)  # [n_q, B, D]
        src = torch.from_numpy(layout[:, : position + 1]).to(cache.device)  # [B, K]
        kv = torch.stack(
            [kvm[s] for (_, kvm), s in zip(parts, src, strict=True)], dim=2
        )  # [K, n_kv, B, D]
        out = q.new_empty((1 + int(max(q_rows.max(), kv_rows.max())), cache.batch, q.shape[-1]))
        out[torch.from_numpy(q_rows)] = q
        out[torch.from_numpy(kv_rows)] = kv.permute(1, 0, 2, 3)
        return out

    def _position_free(self) -> Tensor:
        """Per axis position, the mean output of every position-free sender row ``[S, n, D]``."""
        if self._free is None:
            total: Tensor | None = None
            count = np.zeros(self.n_positions)
            for cache, layout in self.members:
                out = cache._sender_outputs(cache.clean, None)  # [n, B, T, D]
                flat = out.permute(1, 2, 0, 3).reshape(-1, out.shape[0], out.shape[-1])
                if total is None:
                    total = flat.new_zeros((self.n_positions, *flat.shape[1:]))
                total.index_add_(0, torch.from_numpy(layout.reshape(-1)).to(flat.device), flat)
                count += np.bincount(layout.reshape(-1), minlength=self.n_positions)
            assert total is not None, "no contributing cache registered"
            self._free = total / torch.from_numpy(np.maximum(count, 1)).to(total)[:, None, None]
        return self._free

    def _positional(self, s: int) -> tuple[Tensor, Tensor]:
        """Mean query-side rows ``[n_q, D]`` at axis position ``s`` and mean key/value rows per
        source axis position ``[S, n_kv, D]`` (over the prompts with both positions)."""
        if s not in self._at:
            q_total: Tensor | None = None
            kv_total: Tensor | None = None
            n, kv_count = 0, np.zeros(self.n_positions)
            for cache, layout in self.members:
                for p in np.unique(np.nonzero(layout == s)[1]).tolist():
                    b = np.nonzero(layout[:, p] == s)[0]
                    out = cache._sender_outputs(cache.clean, p)[
                        :, torch.from_numpy(b).to(cache.device)
                    ]
                    q_rows, kv_rows = _row_parts(cache.shape.n_layers, cache.shape.n_heads, p)
                    kv = out[torch.from_numpy(kv_rows)].permute(1, 2, 0, 3)  # [K, nb, n_kv, D]
                    if q_total is None or kv_total is None:
                        q_total = out.new_zeros((len(q_rows), out.shape[-1]))
                        kv_total = out.new_zeros((self.n_positions, *kv.shape[2:]))
                    q_total += out[torch.from_numpy(q_rows)].sum(dim=1)
                    src = layout[b, : p + 1].T.reshape(-1)  # source axis positions, [K * nb]
                    kv_total.index_add_(
                        0, torch.from_numpy(src).to(kv.device), kv.reshape(-1, *kv.shape[2:])
                    )
                    n += len(b)
                    kv_count += np.bincount(src, minlength=self.n_positions)
            assert q_total is not None and kv_total is not None, f"no prompt has axis position {s}"
            kv_mean = (
                kv_total / torch.from_numpy(np.maximum(kv_count, 1)).to(kv_total)[:, None, None]
            )
            self._at[s] = (q_total / n, kv_mean)
        return self._at[s]
