"""Node functions: how a message entering a node's input site changes the node's output.

For a node ``n`` with clean input ``x`` and own computation ``f`` (LayerNorm included), the step is
``m_out = f(x) - f(x - m_in)`` (DESIGN.md section 2). Messages are :class:`Msg` objects: a dense
tensor of only the residual rows that can be non-zero, ``rows [N, B, R, D]``, plus the absolute
row indices ``pos`` (length ``R``). ``N`` is a *candidate* axis: the N messages are independent
and every operation below acts row-wise along it, so evaluating N candidates in one call gives
exactly the N one-at-a-time results (the batching is correct by construction; only the memory
footprint grows, which callers bound by chunking N).

Why only some rows: a positional sender writes one row; a positional receiver reads one row (its
query row for ``site=q``; its source row ``k`` for ``site=kv``; rows ``0..p`` for a kv node without
``k``); a non-positional node reads and writes every row. Rows a receiver does not read contribute
nothing, rows the message does not carry are zero.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from pathdb.graph import Node, NodeKind, Site

from .activations import ActivationCache


@dataclass
class Msg:
    """A batch of N residual-stream messages, non-zero only on rows ``pos``: ``rows [N, B, R, D]``."""

    rows: Tensor
    pos: tuple[int, ...]

    @property
    def n(self) -> int:
        """Number of messages on the candidate axis."""
        return int(self.rows.shape[0])

    def gather(self, want: tuple[int, ...]) -> Tensor:
        """The messages on rows ``want`` as ``[N, B, len(want), D]`` (zeros where not carried)."""
        if want == self.pos:
            return self.rows
        where = {p: i for i, p in enumerate(self.pos)}
        if all(w in where for w in want):
            return self.rows[:, :, span(tuple(where[w] for w in want))]
        N, B, _, D = self.rows.shape
        out = self.rows.new_zeros(N, B, len(want), D)
        for j, w in enumerate(want):
            if w in where:
                out[:, :, j] = self.rows[:, :, where[w]]
        return out

    def restrict(self, want: tuple[int, ...]) -> Msg:
        """The messages on the carried rows that are also in ``want`` (a view: carried rows are a
        consecutive run and ``want`` is one too, so their overlap is a slice)."""
        if want == self.pos:
            return self
        wanted = set(want)
        keep = tuple(r for r in self.pos if r in wanted)
        return self if keep == self.pos else Msg(self.gather(keep), keep)

    def dense(self, seq_len: int) -> Tensor:
        """The full ``[N, B, T, D]`` messages."""
        return self.gather(tuple(range(seq_len)))

    def chunk(self, size: int) -> list[Msg]:
        """Split along the candidate axis into pieces of at most ``size`` messages."""
        return [Msg(r, self.pos) for r in self.rows.split(size, dim=0)]


def span(rows: tuple[int, ...]) -> slice | list[int]:
    """``rows`` as an index: a slice when they are consecutive (always, for the rows a node reads
    or writes), so no index tensor is built on the host and copied to the data's device."""
    if rows and all(b == a + 1 for a, b in itertools.pairwise(rows)):
        return slice(rows[0], rows[-1] + 1)
    return list(rows)


def read_rows(node: Node, seq_len: int) -> tuple[int, ...]:
    """Residual rows ``node`` reads (its input support)."""
    if node.kind is NodeKind.ATTN and node.is_kv:
        if node.kv_position is not None:
            return (node.kv_position,)
        if node.position is not None:
            return tuple(range(node.position + 1))
        return tuple(range(seq_len))
    if node.position is not None:
        return (node.position,)
    return tuple(range(seq_len))


def write_rows(node: Node, seq_len: int) -> tuple[int, ...]:
    """Residual rows ``node`` writes (its output support)."""
    if node.position is not None:
        return (node.position,)
    return tuple(range(seq_len))


def needed_rows(
    nodes: tuple[Node, ...] | list[Node], seq_len: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per node of a path, ``(input rows, output rows)`` that can reach the metric, found backwards
    from FINAL (its root row): a row-wise node (MLP, query side) needs the input rows of the output
    rows wanted, a kv-side head every source row up to its last wanted query row. Rows outside
    these never change the score, so a message may drop them before each step (exact)."""
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    want = tuple(range(seq_len))  # a path not ending with FINAL: every output row counts
    for n in reversed(nodes):
        if n.kind is NodeKind.FINAL:
            need: tuple[int, ...] = (root_row(n, seq_len),)
            rows = need
        else:
            wanted = set(want)
            rows = tuple(r for r in write_rows(n, seq_len) if r in wanted)
            if not rows:
                need = ()
            elif n.kind is NodeKind.ATTN and n.is_kv:
                need = tuple(r for r in read_rows(n, seq_len) if r <= rows[-1])
            else:
                need = read_rows(n, seq_len) if n.position is not None else rows
        out.append((need, rows))
        want = need
    return out[::-1]


def active_rows(node: Node, msg: Msg, seq_len: int) -> tuple[int, ...]:
    """Rows an MLP or query-side node must compute for ``msg``: its own row when positional, else
    the rows the message carries (both act row by row, so every other output row is exactly zero;
    a message carrying every row computes every row, as the dense engine does)."""
    if node.position is not None:
        return (node.position,)
    return msg.pos


def _heads(node: Node, n_heads: int) -> slice:
    return slice(None) if node.head is None else slice(node.head, node.head + 1)


def mlp_step(node: Node, msg: Msg, cache: ActivationCache) -> Msg:
    """``f(x) - f(x - m)`` on the node's row(s) with ``f`` the seam's MLP node function
    (``MLP(LN2(x))``, post-norm included) and ``x`` what the MLP reads (``resid_mid[l]``, or the
    block input in parallel blocks)."""
    rows = active_rows(node, msg, cache.seq_len)
    delta = msg.gather(rows)
    sel = span(rows)
    x = cache.clean.mlp_in[node.layer][:, sel]  # [B, R, D]
    clean = cache.clean.mlp_out[node.layer][:, sel]
    return Msg(clean - cache.weights.mlp(node.layer, x - delta), rows)


def attn_q_step(node: Node, msg: Msg, cache: ActivationCache) -> Msg:
    """Query-side head (or whole layer): queries from ``LN1(x - m)`` on the query row(s) (rotated at
    their positions), keys and values clean, scores / soft-cap / mask / softmax recomputed; output
    ``z @ W_O`` (no ``b_O``), through the post-attention norm where the model has one."""
    if node.head is not None:
        return _attn_q_step_head(node, node.head, msg, cache)
    w, run, L = cache.weights, cache.clean, node.layer
    rows = active_rows(node, msg, cache.seq_len)
    hs = _heads(node, w.n_heads)
    attn = w.attn(L)
    sel = span(rows)
    x = run.resid_pre[L][:, sel] - msg.gather(rows)  # [N, B, R, D]
    q = torch.einsum("nbrd,hdk->nbrhk", w.ln1(L, x), attn.W_Q[hs]) + attn.b_Q[hs]
    q = w.rope(L, q, sel, head_axis=True)
    s = w.cap_scores(torch.einsum("nbrhk,bthk->nbhrt", q, run.k[L][:, :, hs]) / w.attn_scale[L])
    a = torch.softmax(s.masked_fill(cache.masks[L][sel], float("-inf")), dim=-1)
    z = torch.einsum("nbhrt,bthk->nbrhk", a, run.v[L][:, :, hs])
    new = torch.einsum("nbrhk,hkd->nbrd", z, attn.W_O[hs])
    clean = run.head_out[L][:, sel][:, :, hs].sum(2)
    return _out(cache, L, sel, clean - new, rows)


def _out(
    cache: ActivationCache, L: int, sel: slice | list[int], delta: Tensor, rows: tuple[int, ...]
) -> Msg:
    """An attention node's output message from its pre-norm change ``delta`` on rows ``sel``: the
    change of the residual after the model's post-attention norm (if any), every other head clean."""
    return Msg(cache.weights.attn_out(L, cache.clean.attn_sum[L][:, sel], delta), rows)


def _head_memo(cache: ActivationCache, L: int, h: int) -> dict[str, Tensor]:
    """Per-head clean pieces reused by every call: weights as plain contiguous tensors, keys
    pre-transposed and pre-scaled, values; built once per (layer, head)."""
    key = ("head", L, h)
    hit = cache.memo.get(key)
    if hit is None:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: autograd may save them
            hit = _build_head_memo(cache, L, h)
        cache.memo[key] = hit
    return hit


def _build_head_memo(cache: ActivationCache, L: int, h: int) -> dict[str, Tensor]:
    """The pieces :func:`_head_memo` caches."""
    w, run = cache.weights, cache.clean
    attn = w.attn(L)
    hit = {
        "W_Q": attn.W_Q[h].detach().contiguous(),
        "b_Q": attn.b_Q[h].detach(),
        "W_K": attn.W_K[h].detach().contiguous(),
        "b_K": attn.b_K[h].detach(),
        "W_V": attn.W_V[h].detach().contiguous(),
        "b_V": attn.b_V[h].detach(),
        "W_O": attn.W_O[h].detach().contiguous(),
        "kT": (run.k[L][:, :, h].transpose(1, 2) / w.attn_scale[L]).contiguous(),  # [B, dh, T]
        "v": run.v[L][:, :, h].contiguous(),  # [B, T, dh]
    }
    return hit


def _attn_q_step_head(node: Node, h: int, msg: Msg, cache: ActivationCache) -> Msg:
    """:func:`attn_q_step` for one head, with plain matrix products on cached per-head pieces."""
    run, L = cache.clean, node.layer
    rows = active_rows(node, msg, cache.seq_len)
    sel = span(rows)
    m = _head_memo(cache, L, h)
    x = run.resid_pre[L][:, sel] - msg.gather(rows)  # [N, B, R, D]
    w = cache.weights
    q = w.rope(L, w.ln1(L, x) @ m["W_Q"] + m["b_Q"], sel)  # [N, B, R, dh]
    N, B, R, dh = q.shape
    # prompts on the batch axis of two bmm's (not N * B tiny 1 x dh products)
    q = q.transpose(0, 1).reshape(B, N * R, dh)
    s = w.cap_scores(torch.bmm(q, m["kT"])).view(B, N, R, -1)  # [B, N, R, T], already scaled
    a = torch.softmax(s.masked_fill(cache.masks[L][sel], float("-inf")), dim=-1)
    new = (torch.bmm(a.view(B, N * R, -1), m["v"]) @ m["W_O"]).view(B, N, R, -1)  # [B, N, R, D]
    clean = run.head_out[L][:, sel, h]  # [B, R, D]
    return _out(cache, L, sel, (clean[:, None] - new).transpose(0, 1), rows)


def _kv_single_memo(cache: ActivationCache, L: int, h: int, p: int, k: int) -> dict[str, Tensor]:
    """Clean pieces of a single-source kv node: the log-sum-exp of the other scores, the clean
    weight, the scaled clean query, the clean value and whether ``p`` attends ``k`` at all (a local
    layer's window); built once per (layer, head, p, k)."""
    key = ("kv", L, h, p, k)
    hit = cache.memo.get(key)
    if hit is None:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: autograd may save them
            hit = _build_kv_single_memo(cache, L, h, p, k)
        cache.memo[key] = hit
    return hit


def _build_kv_single_memo(
    cache: ActivationCache, L: int, h: int, p: int, k: int
) -> dict[str, Tensor]:
    """The pieces :func:`_kv_single_memo` caches."""
    run, scale = cache.clean, cache.weights.attn_scale[L]
    s_row = run.scores[L][:, h, p, : p + 1]  # [B, p+1]
    others = s_row.clone()
    others[:, k] = float("-inf")
    lse = torch.logsumexp(others, dim=-1)  # [B]
    hit = {
        "lse": lse,
        "a_clean": torch.sigmoid(s_row[:, k] - lse),  # [B]
        "q": (run.q[L][:, p, h] / scale).contiguous(),  # [B, dh]
        "v": run.v[L][:, k, h],  # [B, dh]
        "open": (~cache.masks[L][p, k]).to(s_row.dtype),  # 0 where the window hides k from p
    }
    return hit


def _attn_kv_single_head(node: Node, h: int, msg: Msg, cache: ActivationCache) -> Msg:
    """:func:`attn_kv_single_step` for one head, on cached per-node clean pieces."""
    run, L = cache.clean, node.layer
    p, k = node.position, node.kv_position
    assert p is not None and k is not None
    hm = _head_memo(cache, L, h)
    km = _kv_single_memo(cache, L, h, p, k)
    x = run.resid_pre[L][:, k] - msg.gather((k,))[:, :, 0]  # [N, B, D]
    w = cache.weights
    ln = w.ln1(L, x)
    if node.site in (Site.KV, Site.K):
        k_new = w.rope(L, ln @ hm["W_K"] + hm["b_K"], k)  # [N, B, dh]
        a_new = (
            torch.sigmoid(w.cap_scores((k_new * km["q"]).sum(-1)) - km["lse"]) * km["open"]
        )  # [N, B]
    else:
        a_new = km["a_clean"].expand(msg.n, -1)
    v_use = ln @ hm["W_V"] + hm["b_V"] if node.site in (Site.KV, Site.V) else km["v"]
    diff = km["a_clean"][:, None] * km["v"] - a_new[..., None] * v_use  # [N, B, dh]
    return _out(cache, L, slice(p, p + 1), (diff @ hm["W_O"])[:, :, None], (p,))


def _kv_inputs(
    node: Node, cache: ActivationCache, x: Tensor, hs: slice, pos: int | slice | list[int]
) -> tuple[Tensor | None, Tensor | None]:
    """Perturbed keys / values from residual rows ``x [..., D]`` at positions ``pos`` (keys rotated
    there; None where the site keeps them clean)."""
    w, L = cache.weights, node.layer
    attn = w.attn(L)
    ln = w.ln1(L, x)
    k_new = v_new = None
    if node.site in (Site.KV, Site.K):
        k_new = torch.einsum("...d,hdk->...hk", ln, attn.W_K[hs]) + attn.b_K[hs]
        k_new = w.rope(L, k_new, pos, head_axis=True)
    if node.site in (Site.KV, Site.V):
        v_new = torch.einsum("...d,hdk->...hk", ln, attn.W_V[hs]) + attn.b_V[hs]
    return k_new, v_new


def attn_kv_single_step(node: Node, msg: Msg, cache: ActivationCache) -> Msg:
    """kv-side head at ``(p, k)``: key and/or value of source ``k`` from ``LN1(x - m)`` (the key
    rotated at ``k``), queries clean, softmax over all sources recomputed, only source ``k`` contributes:
    ``A[p,k] v[k] @ W_O``. Only one score changes, so ``A_new[p,k] = sigmoid(s_new - lse_{j!=k} s_j)``."""
    if node.head is not None:
        return _attn_kv_single_head(node, node.head, msg, cache)
    w, run, L = cache.weights, cache.clean, node.layer
    p, k = node.position, node.kv_position
    assert p is not None and k is not None
    hs = _heads(node, w.n_heads)
    attn = w.attn(L)
    x = run.resid_pre[L][:, k] - msg.gather((k,))[:, :, 0]  # [N, B, D]
    k_new, v_new = _kv_inputs(node, cache, x, hs, k)
    s_row = run.scores[L][:, hs, p, : p + 1]  # [B, H', p+1]
    others = s_row.clone()
    others[..., k] = float("-inf")
    lse = torch.logsumexp(others, dim=-1)  # [B, H']
    q_p = run.q[L][:, p, hs]  # [B, H', dh]
    s_clean = s_row[..., k]
    a_clean = torch.sigmoid(s_clean - lse)
    s_new = (
        s_clean
        if k_new is None
        else w.cap_scores(torch.einsum("nbhk,bhk->nbh", k_new, q_p) / w.attn_scale[L])
    )
    a_new = torch.sigmoid(s_new - lse) * (~cache.masks[L][p, k]).to(
        lse.dtype
    )  # [N?, B, H'], 0 outside a window
    v_clean = run.v[L][:, k, hs]  # [B, H', dh]
    v_use = v_clean if v_new is None else v_new
    z_new = a_new[..., None] * v_use
    z_clean = a_clean[..., None] * v_clean
    diff = z_clean - z_new  # [N, B, H', dh] (broadcast)
    if diff.dim() == 3:
        diff = diff.expand(msg.n, *diff.shape)
    out = torch.einsum("nbhk,hkd->nbd", diff, attn.W_O[hs])
    return _out(cache, L, slice(p, p + 1), out[:, :, None], (p,))


def attn_kv_all_step(
    node: Node, msg: Msg, cache: ActivationCache, want: tuple[int, ...] | None = None
) -> Msg:
    """kv-side head without a source position: keys and/or values of every source row the message
    carries (``<= p``, or all rows for a non-positional node) from ``LN1(x - m)``, queries clean,
    causal softmax recomputed, output ``z @ W_O`` over all sources at the query row(s) (only
    those in ``want`` when given: the rows a path reads further on)."""
    w, run, L = cache.weights, cache.clean, node.layer
    T = cache.seq_len
    hs = _heads(node, w.n_heads)
    attn = w.attn(L)
    krange = read_rows(node, T)
    sources = set(krange)
    pert = tuple(r for r in msg.pos if r in sources)
    # causal: only query rows at or after the first changed source see a change
    qrows = tuple(r for r in write_rows(node, T) if pert and r >= pert[0])
    if want is not None:
        wanted = set(want)
        qrows = tuple(r for r in qrows if r in wanted)
        if not qrows:
            return Msg(msg.rows.new_zeros(msg.n, cache.batch, 0, msg.rows.shape[-1]), ())
        pert = tuple(
            r for r in pert if r <= qrows[-1]
        )  # later sources are masked for every kept row
    qrows = qrows or write_rows(node, T)
    qsel = span(qrows)
    clean = run.head_out[L][:, qsel][:, :, hs].sum(2)  # [B, R, D]
    if not pert:
        return Msg(clean.new_zeros(msg.n, *clean.shape), qrows)
    nk = len(krange) if want is None else qrows[-1] + 1  # sources past the last query row: masked
    psel = span(pert)  # source rows carrying the message (also their score / value columns)
    x = run.resid_pre[L][:, psel] - msg.gather(pert)  # [N, B, P, D]
    if node.head is not None:
        new_h = _kv_all_head(node, node.head, cache, x, qsel, psel, nk)
        return _out(cache, L, qsel, clean - new_h, qrows)
    k_new, v_new = _kv_inputs(node, cache, x, hs, psel)
    s = run.scores[L][:, hs][:, :, qsel][..., :nk]  # [B, H', R, nk]
    s = s.expand(msg.n, *s.shape).clone()
    if k_new is not None:
        q = run.q[L][:, qsel][:, :, hs]  # [B, R, H', dh]
        s_new = torch.einsum("bqhk,nbphk->nbhqp", q, k_new) / w.attn_scale[L]
        s[..., psel] = w.cap_scores(s_new)
    a = torch.softmax(s.masked_fill(cache.masks[L][qsel][:, :nk], float("-inf")), dim=-1)
    v = run.v[L][:, :nk, hs]  # [B, nk, H', dh]
    if v_new is not None:
        v = v.expand(msg.n, *v.shape).clone()
        v[:, :, psel] = v_new
        z = torch.einsum("nbhqt,nbthk->nbqhk", a, v)
    else:
        z = torch.einsum("nbhqt,bthk->nbqhk", a, v)
    new = torch.einsum("nbqhk,hkd->nbqd", z, attn.W_O[hs])
    return _out(cache, L, qsel, clean - new, qrows)


def _kv_all_head(
    node: Node,
    h: int,
    cache: ActivationCache,
    x: Tensor,
    qsel: slice | list[int],
    psel: slice | list[int],
    nk: int,
) -> Tensor:
    """:func:`attn_kv_all_step`'s new head output ``z @ W_O`` ``[N, B, R, D]`` for one head, from the
    perturbed source rows ``x [N, B, P, D]`` (at ``psel``), with plain matrix products on the
    cached per-head pieces (the prompts on the batch axis of one ``bmm``, not per-candidate
    einsums)."""
    w, run, L = cache.weights, cache.clean, node.layer
    m = _head_memo(cache, L, h)
    N, B, P = x.shape[0], x.shape[1], x.shape[2]
    ln = w.ln1(L, x)
    s = run.scores[L][:, h][:, qsel][..., :nk]  # [B, R, nk], scaled and capped
    R = s.shape[1]
    if node.site in (Site.KV, Site.K):
        k_new = w.rope(L, ln @ m["W_K"] + m["b_K"], psel)  # [N, B, P, dh]
        q = run.q[L][:, qsel][:, :, h]  # [B, R, dh]
        kt = k_new.transpose(0, 1).reshape(B, N * P, -1).transpose(1, 2)  # [B, dh, N * P]
        s_new = torch.bmm(q, kt).view(B, R, N, P).permute(2, 0, 1, 3) / w.attn_scale[L]
        s = s.expand(N, B, R, nk).clone()
        s[..., psel] = w.cap_scores(s_new)
    a = torch.softmax(s.masked_fill(cache.masks[L][qsel][:, :nk], float("-inf")), dim=-1)
    v = m["v"][:, :nk]  # [B, nk, dh]
    if node.site in (Site.KV, Site.V):
        v = v.expand(N, *v.shape).clone()
        v[:, :, psel] = ln @ m["W_V"] + m["b_V"]
    return (a @ v) @ m["W_O"]  # [N, B, R, D]


def final_step(node: Node, msg: Msg, cache: ActivationCache) -> Msg:
    """FINAL: identity on the root row (the metric reads ``clean_final[root] - m[root]``)."""
    root = root_row(node, cache.seq_len)
    return Msg(msg.gather((root,)), (root,))


def root_row(node: Node, seq_len: int) -> int:
    """The residual row the metric reads for a FINAL node (its position, else the last one)."""
    return seq_len - 1 if node.position is None else node.position


def step(node: Node, msg: Msg, cache: ActivationCache, want: tuple[int, ...] | None = None) -> Msg:
    """Apply ``node``'s message function to a batch of input messages (``want``: the output rows
    needed, for a kv-side head over all sources; row-wise nodes compute the rows ``msg`` carries)."""
    if node.kind is NodeKind.MLP:
        return mlp_step(node, msg, cache)
    if node.kind is NodeKind.FINAL:
        return final_step(node, msg, cache)
    if node.kind is NodeKind.ATTN:
        if not node.is_kv:
            return attn_q_step(node, msg, cache)
        if node.kv_position is not None:
            return attn_kv_single_step(node, msg, cache)
        return attn_kv_all_step(node, msg, cache, want)
    raise ValueError(f"{node.label}: an EMBED node has no input; it can only start a path")


def start_msg(nodes: list[Node], cache: ActivationCache) -> Msg:
    """Start messages of senders that all write at the same position, as one :class:`Msg` batch."""
    m = cache.start_messages(nodes)
    pos = nodes[0].position
    if pos is None:
        return Msg(m, tuple(range(cache.seq_len)))
    return Msg(m[:, :, None], (pos,))


def propagate(
    msg: Msg, nodes: tuple[Node, ...] | list[Node], cache: ActivationCache, *, demand: bool = False
) -> Msg:
    """Push a message batch through ``nodes`` in order (the receivers of a path, FINAL last); with
    ``demand``, each step computes only the rows that reach the end (:func:`needed_rows`) and a
    message with none of them left is exactly zero from there on (no further steps)."""
    if not demand:
        for n in nodes:
            msg = step(n, msg, cache)
        return msg
    for n, (need, want) in zip(nodes, needed_rows(nodes, cache.seq_len), strict=True):
        msg = msg.restrict(need)
        if not msg.pos:
            return msg
        msg = step(n, msg, cache, want)
    return msg
