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

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from pathdb.graph import Node, NodeKind, Path
from pathdb.metrics import Metric

from .activations import ActivationCache, take_rows
from .evaluator import ATTRIBUTION, EXACT, ExtensionPaths, Scores
from .exact import ExactEvaluator, plan_extension, score_by_tail
from .node_functions import Msg, read_rows, step


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
    ) -> None:
        """``max_cached`` bounds the number of per-path gradients held at once (LRU)."""
        self.exact = ExactEvaluator(cache, metric, root)
        self.cache = cache
        self.metric = metric
        self.root = root
        self.exact_complete = exact_complete
        self.max_cached = max_cached
        self._grads: OrderedDict[Path, Msg] = OrderedDict()
        self._base: Tensor | None = None

    def baseline(self) -> float:
        """Batch-mean metric on the clean run."""
        return self.exact.baseline()

    def _baseline_rows(self) -> Tensor:
        if self._base is None:
            with torch.no_grad():
                self._base = self.metric(self.exact._clean_row).detach()
        return self._base

    def release(self, path: Sequence[Node]) -> None:
        """Drop the cached gradient of ``path`` (it left the frontier)."""
        self._grads.pop(tuple(path), None)

    @property
    def n_cached(self) -> int:
        """Number of per-path gradients currently held."""
        return len(self._grads)

    def _remember(self, path: Path, g: Msg) -> None:
        self._grads[path] = g
        self._grads.move_to_end(path)
        while len(self._grads) > self.max_cached:
            self._grads.popitem(last=False)

    def gradient(self, path: Sequence[Node]) -> Msg:
        """``g_P`` on the input rows of ``path[0]`` as a ``Msg`` with ``rows [1, B, R, D]``."""
        p = tuple(path)
        hit = self._grads.get(p)
        if hit is not None:
            self._grads.move_to_end(p)
            return hit
        self.exact._check_root(p)
        g = self._final_gradient() if len(p) == 1 else self.vjp(p[0], self.gradient(p[1:]))
        self._remember(p, g)
        return g

    def _final_gradient(self) -> Msg:
        row = self.exact._clean_row.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = self.metric(row).sum()
            (grad,) = torch.autograd.grad(value, row)
        return Msg(-grad[None, :, None], (self.exact.root_row,))

    def vjp(self, node: Node, g_out: Msg) -> Msg:
        """``J_node^T g_out``: the gradient on ``node``'s input rows given the gradient on its output."""
        if node.kind is NodeKind.FINAL:
            return g_out
        if node.kind is NodeKind.MLP:
            fast = self._mlp_vjp(node, g_out)
            if fast is not None:
                return fast
        rows = read_rows(node, self.cache.seq_len)
        B, D = self.cache.batch, self.cache.clean.final.shape[-1]
        dtype = self.cache.clean.final.dtype
        m = torch.zeros(
            1, B, len(rows), D, dtype=dtype, device=self.cache.device, requires_grad=True
        )
        with torch.enable_grad():
            out = step(node, Msg(m, rows), self.cache)
            cot = g_out.gather(out.pos)
            (grad,) = torch.autograd.grad(out.rows, m, grad_outputs=cot, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(m)
        return Msg(grad.detach(), rows)

    def _mlp_vjp(self, node: Node, g_out: Msg) -> Msg | None:
        """``J^T g`` through a standard MLP node at its clean input without re-running its forward
        pass (``W_out^T``, the activation's derivative at the cached clean pre-activation, ``W_in^T``,
        the LayerNorm's VJP): each weight matrix is read once, which is what a one-row VJP costs
        on a CPU. None when the seam says the MLP is not a plain one (gated, LN activation, post-norm)."""
        mlp = self.cache.weights.plain_mlp(node.layer)
        if mlp is None:
            return None
        rows = read_rows(node, self.cache.seq_len)
        key = ("mlp_pre", node.layer, rows)
        memo = self.cache.memo.get(key)
        if memo is None:
            with torch.inference_mode(False), torch.no_grad():
                x = self.cache.clean.mlp_in[node.layer][:, list(rows)]  # [B, R, D]
                memo = {"x": x, "pre": self.cache.weights.ln2(node.layer, x) @ mlp.W_in + mlp.b_in}
            self.cache.memo[key] = memo
        with torch.no_grad():
            g_post = g_out.gather(rows)[0] @ mlp.W_out.T  # [B, R, d_mlp]
        with torch.enable_grad():
            pre = memo["pre"].detach().requires_grad_(True)
            (g_pre,) = torch.autograd.grad(mlp.act_fn(pre), pre, g_post)
        with torch.no_grad():
            g_ln = g_pre @ mlp.W_in.T  # [B, R, D]
        with torch.enable_grad():
            x = memo["x"].detach().requires_grad_(True)
            (g_x,) = torch.autograd.grad(self.cache.weights.ln2(node.layer, x), x, g_ln)
        return Msg(g_x.detach()[None], rows)

    def expand(self, path: Sequence[Node], candidates: Sequence[Node]) -> Scores:
        """First-order scores ``baseline + m_0(c) . g_P`` for every candidate (complete ones exact
        when ``exact_complete``)."""
        p = self.exact.checked_path(path)
        g = self.gradient(p)
        n = len(candidates)
        dev = self.cache.device
        out = torch.empty(n, self.cache.batch, dtype=g.rows.dtype, device=dev)
        methods = [ATTRIBUTION] * n
        base = self._baseline_rows()
        with torch.inference_mode():
            for grp in plan_extension(self.cache, p[0], candidates) if n else []:
                msgs = take_rows(self.cache.bank(grp.position).messages, grp.rows)
                dots = self._dots(msgs, g, grp.position) + base
                if grp.index is None:
                    out.copy_(dots)
                else:
                    out[torch.from_numpy(grp.index).to(dev)] = dots.to(out.dtype)
        if self.exact_complete:
            embeds = [i for i, c in enumerate(candidates) if c.kind is NodeKind.EMBED]
            if embeds:
                ex = self.exact.expand_on_device(p, [candidates[i] for i in embeds])
                out[torch.tensor(embeds).to(dev)] = ex.to(out.dtype)
                for i in embeds:
                    methods[i] = EXACT
        return Scores(ExtensionPaths(candidates, p), out.cpu(), methods)

    def _dots(self, msgs: Tensor, g: Msg, position: int | None) -> Tensor:
        """``m . g`` per candidate and prompt: ``msgs [N, B, D]`` (or ``[N, B, T, D]`` for the
        non-positional bank) against the gradient rows. On a CPU one strided matrix-vector
        product per prompt: it reads each message once (the scoring is memory-bound), several
        times faster than a batched product with a width-1 right-hand side; on an accelerator one
        contraction (one kernel, not one launch per prompt)."""
        N, B = msgs.shape[0], msgs.shape[1]
        accelerator = msgs.device.type != "cpu"
        if position is None:
            gr = g.gather(tuple(range(self.cache.seq_len)))[0]  # [B, T, D]
            flat = msgs.flatten(2)  # [N, B, T*D] (a view: T and D are contiguous)
            if accelerator:
                return torch.einsum("nbx,bx->nb", flat, gr.flatten(1))
            return torch.stack([flat[:, b] @ gr[b].reshape(-1) for b in range(B)], dim=1)
        gr = g.gather((position,))[0, :, 0]  # [B, D]
        if accelerator:
            return torch.einsum("nbd,bd->nb", msgs, gr)
        out = msgs.new_empty(N, B)
        for b in range(B):
            torch.mv(msgs[:, b], gr[b], out=out[:, b])
        return out

    def score_paths(self, paths: Sequence[Sequence[Node]]) -> Scores:
        """Attribution scores of paths, batched by shared tail (complete ones exact if configured)."""
        return score_by_tail(
            self, paths, lambda n: self._baseline_rows().cpu().expand(n, -1).clone()
        )

    def _check_root(self, path: Path) -> None:
        self.exact._check_root(path)
