"""Path attribution patching: first-order scores from one VJP per frontier path.

For a path ``P = (n_1, ..., FINAL)`` the score of a start message ``m`` entering ``n_1`` is
``S_P(m) = metric(clean_final[root] - Phi_P(m))`` with ``Phi_P`` the composed node functions
(``Phi_P(0) = 0``). Its gradient at ``m = 0`` is ``g_P = -J_{Phi_P}^T grad metric`` (the sign makes
``baseline + m . g_P`` the first-order estimate of the exact score). ``g_P`` is built right to left:
``g_(FINAL) = -grad metric(clean)`` at the root row, and ``g_(n, *P) = J_n^T g_P`` is one VJP
through node ``n`` alone, taken with autograd of the same node function the exact evaluator uses.
All candidates of a frontier path are then scored with one contraction against their cached start
messages. Per-path gradients are kept in a bounded LRU map; ``release`` drops one explicitly.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from pathdb.graph import Node, NodeKind, Path
from pathdb.metrics import Metric

from .activations import ActivationCache
from .evaluator import ATTRIBUTION, EXACT, ExtensionPaths, Scores
from .exact import ExactEvaluator, _write, score_by_tail
from .memo import Recent
from .node_functions import Msg, read_rows, step
from .sparse_rows import StepCache, row_sets


class AttributionEvaluator:
    """Path attribution patching; complete paths (EMBED start) are scored exactly when
    ``exact_complete`` (as ``ipe`` does), and each score records its method."""

    method = ATTRIBUTION

    def __init__(
        self,
        cache: ActivationCache,
        metric: Metric,
        root: Node,
        *,
        exact_complete: bool = True,
        max_cached: int = 4096,
        retired_bytes: int = 128 * 2**20,
        max_graphs: int = 256,
    ) -> None:
        """``max_cached`` bounds the number of per-path gradients held at once (LRU);
        ``retired_bytes`` bounds the released gradients kept for the paths' children;
        ``max_graphs`` the nodes whose forward graphs are kept for their VJPs (LRU)."""
        self.exact = ExactEvaluator(cache, metric, root)
        self.cache = cache
        self.metric = metric
        self.root = root
        self.exact_complete = exact_complete
        self._grads: Recent[Path, Msg] = Recent(max_cached)
        self._retired = StepCache(retired_bytes)
        self._graphs: Recent[Hashable, Any] = Recent(max_graphs)
        self._first_row: int | None = None
        self._base: Tensor | None = None

    def baseline(self) -> float:
        """Batch-mean metric on the clean run."""
        return self.exact.baseline()

    def baseline_rows(self) -> Tensor:
        """Per-prompt metric on the clean run ``[B]``: the constant term of every first-order score."""
        if self._base is None:
            with torch.no_grad():
                self._base = self.metric(self.exact._clean_row).detach()
        return self._base

    def release(self, path: Sequence[Node]) -> None:
        """Drop the cached gradient of ``path`` (it left the frontier) into the bounded retired
        tier: the path's children, expanded a level later, start from it (one VJP each instead
        of the whole path again)."""
        p = tuple(path)
        g = self._grads.pop(p)
        if g is not None:
            self._retired.put(p, g)

    @property
    def n_cached(self) -> int:
        """Number of per-path gradients currently held."""
        return len(self._grads)

    def gradient(self, path: Sequence[Node]) -> Msg:
        """``g_P`` on the input rows of ``path[0]`` that reach the metric (the others are exactly
        zero: :func:`search.node_functions.needed_rows`) as a ``Msg`` with ``rows [1, B, R, D]``.
        Built from the gradient of ``path[1:]`` (cached, or kept after its release: see
        :meth:`release`), so a child path costs one VJP through its first node."""
        p = tuple(path)
        hit = self._grads.get(p)
        if hit is not None:
            return hit
        hit = self._retired.get(p)
        if hit is None:
            self.exact._check_root(p)
            hit = (
                self._final_gradient()
                if len(p) == 1
                else self.vjp(p[0], self.gradient(p[1:]), self._rows(p))
            )
        self._grads.put(p, hit)
        return hit

    def _rows(self, path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Input and output rows of ``path[0]`` whose gradient can count: those that reach the
        metric (:func:`needed_rows`) and, for a non-positional root, none before the first row
        where some start message is non-zero (the model is causal, so every message of every
        path is zero there and the gradient on those rows only ever meets zeros)."""
        need, want = self.exact._needs(path)[0]
        if self._first_row is None:
            self._first_row = 0
            if self.root.position is None:
                live = row_sets(self.cache)[1].any(axis=0)
                self._first_row = int(live.argmax()) if live.any() else self.cache.seq_len
        first = self._first_row
        if first:
            need, want = tuple(r for r in need if r >= first), tuple(r for r in want if r >= first)
        return need, want

    def _final_gradient(self) -> Msg:
        row = self.exact._clean_row.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = self.metric(row).sum()
            (grad,) = torch.autograd.grad(value, row)
        return Msg(-grad[None, :, None], (self.exact.root_row,))

    def vjp(
        self,
        node: Node,
        g_out: Msg,
        rows: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> Msg:
        """``J_node^T g_out``: the gradient on ``node``'s input rows given the gradient on its
        output; with ``rows = (input rows, output rows)`` (:func:`needed_rows` of the path) only
        those input rows, through the node's output rows that reach the metric (the gradient is
        exactly zero on every other input row)."""
        if node.kind is NodeKind.FINAL:
            return g_out
        need, want = rows or (read_rows(node, self.cache.seq_len), None)
        B, D = self.cache.batch, self.cache.clean.final.shape[-1]
        dtype = self.cache.clean.final.dtype
        if not need or want == ():
            return Msg(torch.zeros(1, B, len(need), D, dtype=dtype, device=self.cache.device), need)
        if node.kind is NodeKind.MLP:
            fast = self._mlp_vjp(node, g_out, need)
            if fast is not None:
                return fast
        graph = self._graphs.get((node, need, want))
        if graph is None:
            m = torch.zeros(
                1, B, len(need), D, dtype=dtype, device=self.cache.device, requires_grad=True
            )
            with torch.enable_grad():
                graph = {"m": m, "out": step(node, Msg(m, need), self.cache, want)}
            self._graphs.put((node, need, want), graph)
        m, out = graph["m"], graph["out"]
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(
                out.rows,
                m,
                grad_outputs=g_out.gather(out.pos),
                retain_graph=True,
                allow_unused=True,
            )
        if grad is None:
            grad = torch.zeros_like(m)
        return Msg(grad.detach(), need)

    def _mlp_vjp(self, node: Node, g_out: Msg, rows: tuple[int, ...]) -> Msg | None:
        """``J^T g`` on input ``rows`` through a standard MLP node at its clean input without
        re-running its forward pass (``W_out^T``, the activation's derivative at the cached clean
        pre-activation, ``W_in^T``, the LayerNorm's VJP): each weight matrix is read once, which is
        what a one-row VJP costs on a CPU. None when the seam says the MLP is not a plain one
        (gated, LN activation, post-norm)."""
        mlp = self.cache.weights.plain_mlp(node.layer)
        if mlp is None:
            return None
        key = ("mlp", node.layer, rows)
        g = self._graphs.get(key)
        if g is None:
            with torch.inference_mode(False), torch.enable_grad():
                x = self.cache.clean.mlp_in[node.layer][:, list(rows)].detach().requires_grad_(True)
                ln = self.cache.weights.ln2(node.layer, x)  # [B, R, D]
                with torch.no_grad():
                    pre = (ln @ mlp.W_in + mlp.b_in).requires_grad_(True)
                g = {"x": x, "ln": ln, "pre": pre, "act": mlp.act_fn(pre)}
            self._graphs.put(key, g)
        with torch.no_grad():
            g_post = g_out.gather(rows)[0] @ mlp.W_out.T  # [B, R, d_mlp]
        with torch.enable_grad():
            (g_pre,) = torch.autograd.grad(g["act"], g["pre"], g_post, retain_graph=True)
        with torch.no_grad():
            g_ln = g_pre @ mlp.W_in.T  # [B, R, D]
        with torch.enable_grad():
            (g_x,) = torch.autograd.grad(g["ln"], g["x"], g_ln, retain_graph=True)
        return Msg(g_x.detach()[None], rows)

    def expand(self, path: Sequence[Node], candidates: Sequence[Node]) -> Scores:
        """First-order scores ``baseline + m_0(c) . g_P`` for every candidate (complete ones exact
        when ``exact_complete``): each candidate's start message on the rows where it and
        ``g_P`` can both be non-zero (the exact engine's batches; a candidate with none of them
        scores the baseline)."""
        p = self.exact.checked_path(path)
        g = self.gradient(p)
        n = len(candidates)
        dev = self.cache.device
        out = torch.empty(n, self.cache.batch, dtype=g.rows.dtype, device=dev)
        methods = [ATTRIBUTION] * n
        base = self.baseline_rows()
        with torch.inference_mode():
            # the exact engine's memoised plan: write-position groups, batches of the rows where
            # start messages can be non-zero (every candidate scored: no repeated rows dropped)
            plan = self.exact.plan(p, candidates, distinct=False) if n else []
            for position, index, _, n_rows, batches in plan:
                buf = out if index is None else out.new_empty(n_rows, out.shape[1])
                for sub, rows, pos in batches:
                    if pos is None:
                        _write(buf, sub, base)
                    else:
                        msg = self.exact.messages(position, rows, pos)
                        _write(buf, sub, self._dots(msg, g) + base)
                if index is not None:
                    _write(out, index, buf)
        if self.exact_complete:
            embeds = [i for i, c in enumerate(candidates) if c.kind is NodeKind.EMBED]
            if embeds:
                ex = self.exact.expand_on_device(p, [candidates[i] for i in embeds])
                out[torch.tensor(embeds).to(dev)] = ex.to(out.dtype)
                for i in embeds:
                    methods[i] = EXACT
        return Scores(ExtensionPaths(candidates, p), out.cpu(), methods)

    @staticmethod
    def _dots(msg: Msg, g: Msg) -> Tensor:
        """``m . g`` per candidate and prompt over the rows ``msg`` carries (``rows [N, B, R, D]``).
        On a CPU one strided matrix-vector product per prompt: it reads each message once (the
        scoring is memory-bound), several times faster than a batched product with a width-1
        right-hand side; on an accelerator one contraction (one kernel, not one launch per
        prompt)."""
        rows = msg.rows
        N, B = rows.shape[0], rows.shape[1]
        gr = g.gather(msg.pos)[0]  # [B, R, D]
        if rows.device.type != "cpu":
            return torch.einsum("nbrd,brd->nb", rows, gr)
        out = rows.new_empty(N, B)
        for b in range(B):
            torch.mv(rows[:, b].reshape(N, -1), gr[b].reshape(-1), out=out[:, b])
        return out

    def score_paths(self, paths: Sequence[Sequence[Node]]) -> Scores:
        """Attribution scores of paths, batched by shared tail (complete ones exact if configured)."""
        return score_by_tail(
            self, paths, lambda n: self.baseline_rows().cpu().expand(n, -1).clone()
        )

    def _check_root(self, path: Path) -> None:
        self.exact._check_root(path)
