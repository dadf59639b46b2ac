"""Positional circuits of a positional path run: edges between (node, position) pairs, evaluated by
an edge-masked forward whose mask is per position.

Senders are ``input@p``, ``a{l}.h{h}@p`` (the head's output ``z @ W_O`` at ``p``) and ``m{l}@p``;
receivers are a head's query at ``p`` (``a{l}.h{h}<q>@p``), its key or value input at source ``k``
as read by the query at ``q`` (``a{l}.h{h}<k>@q:k``, ``<v>@q:k``, ``k <= q``), an MLP input at
``p`` (``m{l}@p``) and the logits at the metric's (last) position. An edge joins a sender at ``p``
to a receiver reading ``p``: ``a0.h1@3->a2.h0<k>@14:3``. Each receiving input gets the clean
messages of its in-circuit (sender, position) pairs and the corrupted ones of the rest (as
:mod:`pathdb.evaluate.masked`, post-sublayer norms included), so a key or value at source ``k``
can differ per query: the attention of every layer is recomputed with per-query keys and values
(:mod:`pathdb.arch.compute`: rotary positions, score caps, sliding windows, GQA per query head).

A run's positional edge scores are its ``effect`` edge scores (every evaluated path on its first
edge, :func:`pathdb.query.aggregate.edges` with ``positional=True``): a head sender is the head at
its write position whatever site it was reached through, and a ``<kv>`` receiver puts half of the
score on its ``<k>`` and half on its ``<v>`` edge. Equal-length positional runs only: role-aligned
runs (prompts of different lengths, :mod:`pathdb.positions`) are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pathdb.arch.compute import Arch, apply_norm
from pathdb.evaluate.graph import EdgeGraph, EvaluationError
from pathdb.evaluate.masked import MEMORY_BUDGET, MaskedEvaluator, _Group, _split_inputs
from pathdb.graph import NodeKind, Site, parse_label
from pathdb.query.aggregate import edges as edge_table
from pathdb.query.common import RunInfo
from pathdb.query.expand import complete_kept_selection, edge_chain_cte

SCORE_COLUMNS = ("score", "abs_score", "pos_score", "neg_score")


def _kind(name: str) -> str:
    """Node kind of a positional node name (``input@3``, ``a1.h2@4``, ``m0@4``, ``logits@14``)."""
    comp = name.split("@")[0]
    if comp == "input":
        return "embed"
    if comp == "logits":
        return "final"
    return "mlp" if comp.startswith("m") else "attn"


@dataclass(frozen=True)
class PositionalGraph:
    """The position-free graph expanded over ``n_positions`` positions; a circuit is a boolean
    ``[F, Bk, T, T]`` matrix, cell ``[f, b, q, k]`` = sender ``f`` at ``k`` into receiver ``b`` of
    query position ``q`` (``q == k`` except for key / value receivers)."""

    base: EdgeGraph
    n_positions: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n_forward, n_backward, T, T)``."""
        return (*self.base.shape, self.n_positions, self.n_positions)

    @functools.cached_property
    def _edges(self) -> tuple[list[str], np.ndarray]:
        """Every real positional edge name and its cell ``[f, b, q, k]``."""
        last = self.n_positions - 1
        names: list[str] = []
        cells: list[tuple[int, int, int, int]] = []
        for name, f, b in self.base.spec.edges:
            src, dst = name.split("->")
            if dst == "logits":
                pairs = [(last, last)]
            elif dst.endswith(("<k>", "<v>")):
                pairs = [(q, k) for q in range(last + 1) for k in range(q + 1)]
            else:
                pairs = [(p, p) for p in range(last + 1)]
            for q, k in pairs:
                tail = f"@{q}:{k}" if dst.endswith(("<k>", "<v>")) else f"@{q}"
                names.append(f"{src}@{k}->{dst}{tail}")
                cells.append((f, b, q, k))
        return names, np.array(cells, dtype=np.int64).reshape(-1, 4)

    @functools.cached_property
    def edge_index(self) -> dict[str, tuple[int, int, int, int]]:
        """Edge name -> cell."""
        names, cells = self._edges
        return {
            n: (int(c[0]), int(c[1]), int(c[2]), int(c[3]))
            for n, c in zip(names, cells, strict=True)
        }

    @property
    def n_edges(self) -> int:
        """Number of real positional edges."""
        return len(self._edges[0])

    def real(self) -> np.ndarray:
        """Boolean matrix of the real positional edges."""
        m = np.zeros(self.shape, dtype=bool)
        cells = self._edges[1]
        m[cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3]] = True
        return m

    def mask(self, edges: Any) -> np.ndarray:
        """The circuit matrix of a set of positional edge names (unknown names raise)."""
        index = self.edge_index
        m = np.zeros(self.shape, dtype=bool)
        for e in edges:
            if e not in index:
                raise EvaluationError(
                    f"{e!r} is not a positional edge of this graph ({self.n_positions} positions); "
                    "edges look like 'input@3->a0.h1<q>@3', 'a0.h1@3->a1.h2<k>@14:3', 'm1@14->logits@14'"
                )
            m[index[e]] = True
        return m

    def expand(self, in_graph: np.ndarray) -> np.ndarray:
        """A position-free circuit ``[F, Bk]`` with every position of each of its edges."""
        return self.real() & np.asarray(in_graph, dtype=bool)[:, :, None, None]

    def table(self, scored: pd.DataFrame, score: str = "score") -> pd.DataFrame:
        """Every real positional edge with ``src``, ``dst``, kinds and ``score`` (0 when unscored),
        in the layout of :func:`pathdb.evaluate.graph.full_edge_table`."""
        index = self.edge_index
        unknown = [e for e in scored["edge"] if e not in index]
        if unknown:
            raise EvaluationError(
                f"{len(unknown)} scored edge(s) are not positional edges of the evaluation graph "
                f"({self.n_positions} positions), e.g. {unknown[:3]}"
            )
        values = dict(zip(scored["edge"], scored[score].astype(float), strict=True))
        names = self._edges[0]
        src = [n.split("->")[0] for n in names]
        dst = [_receiver_node(n.split("->")[1]) for n in names]
        return pd.DataFrame({
            "edge": names, "src": src, "dst": dst,
            "src_kind": [_kind(s) for s in src], "dst_kind": [_kind(d) for d in dst],
            "score": [values.get(n, 0.0) for n in names],
        })  # fmt: skip


def _receiver_node(receiver: str) -> str:
    """The node a receiver belongs to, named at its write position: ``a1.h2<k>@14:3`` -> ``a1.h2@14``."""
    comp, pos = receiver.split("@")
    return f"{comp.split('<')[0]}@{pos.split(':')[0]}"


def _eval_edges(src_label: str, dst_label: str, n_layers: int) -> list[tuple[str, float]]:
    """The evaluation edges (with their share of the score) of a stored positional edge."""
    s, d = parse_label(src_label, n_layers), parse_label(dst_label, n_layers)
    sender = f"{s.component}@{s.position}"
    if d.kind is NodeKind.ATTN and d.is_kv:
        sites = ["k", "v"] if d.site is Site.KV else [str(d.site)]
        return [
            (f"{sender}->{d.component}<{site}>@{d.position}:{d.kv_position}", 1 / len(sites))
            for site in sites
        ]
    if d.kind is NodeKind.ATTN:
        return [(f"{sender}->{d.component}<q>@{d.position}", 1.0)]
    return [(f"{sender}->{d.component}@{d.position}", 1.0)]


def run_edges(con: duckdb.DuckDBPyConnection, info: RunInfo) -> pd.DataFrame:
    """The run's positional ``effect`` edge scores on evaluation edges (``edge`` + score columns)."""
    df = edge_table(con, info.run_id, positional=True, rule="effect")
    rows: dict[str, np.ndarray] = {}
    for src, dst, *scores in df[["src", "dst", *SCORE_COLUMNS]].itertuples(index=False):
        for name, share in _eval_edges(src, dst, info.n_layers):
            rows[name] = rows.get(name, np.zeros(len(SCORE_COLUMNS))) + share * np.array(scores)
    table = pd.DataFrame(list(rows.values()), columns=list(SCORE_COLUMNS))
    table.insert(0, "edge", list(rows))
    return table


def path_edge_ranks(con: duckdb.DuckDBPyConnection, info: RunInfo) -> pd.DataFrame:
    """For every positional evaluation edge on a complete kept path: the best rank (1 = largest
    ``|contribution|``) of a path through it (the ``paths`` curve's circuits)."""
    sel = complete_kept_selection(str(int(info.run_id)))
    sql = f"""WITH RECURSIVE ranked AS (
  SELECT path_id, row_number() OVER (ORDER BY abs(c) DESC, path_id) AS rank FROM ({sel})),
{edge_chain_cte(f"SELECT run_id, path_id, prompt_idx, c, node_id, parent_id FROM ({sel})")}
SELECT sn.label AS src, dn.label AS dst, min(r.rank) AS rank
FROM chain ch JOIN ranked r USING (path_id)
JOIN nodes sn ON sn.run_id = ch.run_id AND sn.node_id = ch.src_id
JOIN nodes dn ON dn.run_id = ch.run_id AND dn.node_id = ch.dst_id
GROUP BY ALL"""
    best: dict[str, int] = {}
    for src, dst, rank in con.sql(sql).fetchall():
        for name, _ in _eval_edges(src, dst, info.n_layers):
            best[name] = min(best.get(name, int(rank)), int(rank))
    out = pd.DataFrame({"edge": list(best), "rank": list(best.values())})
    return out.sort_values(["rank", "edge"]).reset_index(drop=True)


class PositionalEvaluator:
    """Metric of the per-position edge-masked model for many positional circuits, on evaluation
    prompts that all have the run's ``n_positions`` tokens (the clean and corrupted runs,
    intervention and metric are those of ``base``)."""

    def __init__(self, base: MaskedEvaluator, n_positions: int) -> None:
        """Check that the prompts form one length group of ``n_positions`` tokens."""
        lengths = sorted({int(g.tokens.shape[1]) for g in base.groups})
        if lengths != [n_positions]:
            raise EvaluationError(
                f"positional circuits have {n_positions} positions but the evaluation prompts have "
                f"{', '.join(map(str, lengths))} tokens; pass --prompts with prompts of exactly "
                f"{n_positions} tokens (e.g. the run's own prompt set)"
            )
        self.base = base
        self.model = base.model
        self.graph = PositionalGraph(base.graph, n_positions)
        self.metric_name = base.metric_name
        self.intervention = base.intervention
        self.n_prompts = base.n_prompts
        self.arch = Arch(base.model)

    def metric_values(self, in_graph: np.ndarray) -> np.ndarray:
        """Mean metric over the prompts for each circuit ``[C, F, Bk, T, T]`` (or one ``[F, Bk, T, T]``)."""
        masks = torch.from_numpy(np.asarray(in_graph, dtype=bool))
        if masks.dim() == 4:
            masks = masks[None]
        if tuple(masks.shape[1:]) != self.graph.shape:
            raise EvaluationError(
                f"positional circuit masks must be [C, {', '.join(map(str, self.graph.shape))}]"
            )
        cfg = self.model.cfg
        real = torch.from_numpy(self.graph.real())
        out_mask = (real & ~masks).to(dtype=cfg.dtype, device=cfg.device)
        totals = torch.zeros(masks.shape[0], dtype=torch.float64)
        g = self.base.groups[0]
        b, n = g.tokens.shape
        per = b * n * cfg.d_model * out_mask.element_size() * (self.graph.shape[0] + 8 * n)
        step = max(1, MEMORY_BUDGET // per)
        with torch.inference_mode(), _split_inputs(self.model):
            for s in range(0, masks.shape[0], step):
                totals[s : s + step] += (
                    self._masked(g, out_mask[s : s + step]).double().sum(1).cpu()
                )
        return (totals / self.n_prompts).numpy()

    def _masked(self, group: _Group, w: Tensor) -> Tensor:
        """Metric per circuit and prompt ``[C, b]`` for out-of-circuit weights ``[C, F, Bk, T, T]``."""
        base, arch, model = self.base, self.arch, self.model
        cfg = model.cfg
        n_circ, n_fwd = w.shape[0], w.shape[1]
        b, n = group.tokens.shape
        n_heads, d = cfg.n_heads, cfg.d_model
        diff = torch.zeros((n_circ, n_fwd, b, n, d), dtype=cfg.dtype, device=group.tokens.device)
        sums: dict[int, Tensor] = {}
        resid: dict[int, Tensor] = {}

        def store(f: int, act: Tensor) -> None:
            diff[:, f] = act.reshape(n_circ, b, n, -1) - group.corrupted[..., f, :]

        def removed(weights: Tensor, n_src: int) -> Tensor:
            """What the out-of-circuit senders before ``n_src`` remove: ``weights`` ``[C, F, T]``
            (a receiver per position) -> ``[C, b, T, D]``; ``[C, F, T, T]`` (per query and source)
            -> ``[C, b, T, T, D]``; post-norm heads through their layer's norm."""
            per_query = weights.dim() == 4
            eq = "cfqk,cfbkd->cbqkd" if per_query else "cfp,cfbpd->cbpd"
            if not base.post_norm:
                return torch.einsum(eq, weights, diff[:, :n_src])
            keep = base._not_head[:n_src].reshape(-1, *([1] * (weights.dim() - 2)))
            out = torch.einsum(eq, weights * keep, diff[:, :n_src])
            for layer in range(cfg.n_layers):
                hs = slice(1 + layer * (n_heads + 1), 1 + layer * (n_heads + 1) + n_heads)
                if hs.stop > n_src:
                    break
                mixed = torch.einsum(eq, weights[:, hs], diff[:, hs])
                s = sums[layer].reshape(n_circ, b, n, d)
                s = s[:, :, None] if per_query else s
                post = model.blocks[layer].ln1_post
                out = out + apply_norm(post, s) - apply_norm(post, s - mixed)
            return out

        def keep_resid(act: Tensor, hook: Any, layer: int) -> None:
            resid[layer] = act

        def attention(z: Tensor, hook: Any, layer: int) -> Tensor:
            """The layer's ``z`` from per-position queries and per-(query, source) keys / values."""
            x = resid[layer].reshape(n_circ, b, n, d)
            first, col0 = 1 + layer * (n_heads + 1), layer * (3 * n_heads + 1)
            aw = arch.attn(layer)
            mask = arch.mask(layer, n, x.device)
            new = torch.empty((n_circ, b, n, n_heads, z.shape[-1]), dtype=z.dtype, device=z.device)
            for h in range(n_heads):
                wq = torch.diagonal(w[:, :first, col0 + h], dim1=-2, dim2=-1)
                q = arch.ln1(layer, x - removed(wq, first)) @ aw.W_Q[h] + aw.b_Q[h]
                k_in = x[:, :, None] - removed(w[:, :first, col0 + n_heads + h], first)
                v_in = x[:, :, None] - removed(w[:, :first, col0 + 2 * n_heads + h], first)
                k = arch.ln1(layer, k_in) @ aw.W_K[h] + aw.b_K[h]  # [C, b, q, k, dh]
                v = arch.ln1(layer, v_in) @ aw.W_V[h] + aw.b_V[h]
                q, k = arch.rope(layer, q, slice(0, n)), arch.rope(layer, k, slice(0, n))
                scores = torch.einsum("cbqe,cbqke->cbqk", q, k) / arch.attn_scale[layer]
                scores = arch.cap_scores(scores).masked_fill(mask, float("-inf"))
                new[:, :, :, h] = torch.einsum("cbqk,cbqke->cbqe", scores.softmax(-1), v)
            return new.reshape(z.shape)

        def resid_in(act: Tensor, hook: Any, col: int, n_src: int) -> Tensor:
            weights = torch.diagonal(w[:, :n_src, col], dim1=-2, dim2=-1)
            return act - removed(weights, n_src).reshape(act.shape)

        hooks: list[tuple[str, Any]] = []
        for layer in range(cfg.n_layers):
            hooks.append((f"blocks.{layer}.hook_resid_pre",
                          lambda a, hook, layer=layer: keep_resid(a, hook, layer)))  # fmt: skip
            hooks.append((f"blocks.{layer}.attn.hook_z",
                          lambda a, hook, layer=layer: attention(a, hook, layer)))  # fmt: skip
        hooks += base._sender_hooks(store, sums if base.post_norm else None)
        for layer in range(cfg.n_layers):
            first, col0 = 1 + layer * (n_heads + 1), layer * (3 * n_heads + 1)
            mlp_src = first if base.parallel else first + n_heads
            hooks.append((f"blocks.{layer}.hook_mlp_in",
                          lambda a, hook, c=col0 + 3 * n_heads, s=mlp_src: resid_in(a, hook, c, s)))  # fmt: skip
        hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post",
                      lambda a, hook: resid_in(a, hook, w.shape[2] - 1, n_fwd)))  # fmt: skip
        out = model.run_with_hooks(
            group.tokens.repeat(n_circ, 1), fwd_hooks=hooks, stop_at_layer=cfg.n_layers
        )
        metric: Tensor = group.metric(out[:, -1].reshape(n_circ, b, -1))
        return metric
