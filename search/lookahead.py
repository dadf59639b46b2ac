"""Recall mode's look-ahead: bounds on, and exact scores of, the ``input`` starts of pruned partials.

The pruned partials of one frontier path share their tail: ``(node_i, *tail)``. The complete
paths ``(s, node_i, *tail)`` differ only in their first two nodes, so the messages ``node_i``
sends for its starts are computed node by node (one small step each) and pushed through the
shared tail in one batched pass, instead of one whole-path evaluation per pruned partial (a
Python loop that made recall mode 0.9-27x slower than the plain search). Scores are those of
:meth:`search.exact.ExactEvaluator.expand` up to float rounding (same node functions and metric,
other batch shapes: tests/test_recall.py compares them at 1e-4 in float32).

Before any of them is scored, :meth:`StartLookahead.bounds` bounds each one without a model
evaluation of the whole path: the message ``d`` that ``node`` sends when its input is patched is
computed exactly (the node step), and so is the tail's first node's response to it (one more step,
all starts of a frontier path in one batched pass; both reused by the exact pass, which starts
after them). Only the rest of the tail, ``tail[1:]``, is linearised, and its first-order response
to the stepped message ``d'`` is bounded by Cauchy-Schwarz row by row,
``|g . d'| <= sum_r |g_r| |d'_r|`` with ``g`` the attribution gradient of ``tail[1:]`` (one per
tail, shared by all its pruned partials); a tail that is the root alone is linearised whole. The
tail's first node (an attention head whose pattern the start moves, an MLP) is where most of the
higher-order response sits, so bounding through it exactly leaves only the later nodes' higher-order
terms uncovered (docs/semantics.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pathdb.graph import Node, Path
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, plan_extension
from search.node_functions import Msg, needed_rows, step


class StartLookahead:
    """The ``input`` starts of the pruned partials ``(node, *tail)`` of one frontier path: their
    bounds and exact scores, each node's start messages computed once for both. Scorers that are
    not over one prompt batch (prompts of several lengths or role layouts) get no bounds and are
    scored per node."""

    def __init__(
        self, scorer: Any, tail: Path, nodes: Sequence[Node], starts: Sequence[Sequence[Node]]
    ) -> None:
        self.scorer = scorer
        self.tail = tail
        self.nodes = list(nodes)
        self.starts = [list(s) for s in starts]
        ev = getattr(scorer, "exact", None)
        self.ev = ev if isinstance(ev, ExactEvaluator) else None
        # the part of the tail the bound linearises: all of it when it is the root alone
        self.rest = self.tail[1:] if len(self.tail) > 1 else self.tail
        self._msgs: list[Msg | None] | None = None
        self._sent: list[Msg | None] | None = None

    def _messages(self) -> list[Msg | None]:
        """Per node the exact messages it sends for each of its starts, in the starts' order."""
        if self._msgs is None:
            assert self.ev is not None
            cache = self.ev.cache
            msgs: list[Msg | None] = []
            with torch.inference_mode():
                for node, s in zip(self.nodes, self.starts, strict=True):
                    if not s:
                        msgs.append(None)
                        continue
                    self.ev.checked_path((node, *self.tail))  # validates the path once (memoised)
                    order = np.empty(len(s), dtype=np.int64)
                    done = 0
                    parts: list[Msg] = []
                    for grp in plan_extension(cache, node, s):
                        idx = np.arange(len(s)) if grp.index is None else grp.index
                        order[done : done + len(idx)] = idx
                        done += len(idx)
                        parts.append(step(node, grp.messages(cache), cache))
                    joined = _joined(parts)
                    order_back = torch.from_numpy(np.argsort(order))
                    msgs.append(Msg(joined.rows[order_back], joined.pos))
            self._msgs = msgs
        return self._msgs

    def _entering(self) -> list[Msg | None]:
        """Per node the exact messages entering :attr:`rest` for each of its starts: the node's
        messages stepped through the tail's first node (the node's own when ``rest`` is the tail)."""
        if self._sent is None:
            assert self.ev is not None
            msgs = self._messages()
            live = [m for m in msgs if m is not None]
            if self.rest is not self.tail and live:
                cache = self.ev.cache
                # one step for all nodes' starts, on the rows that reach the metric as the exact
                # pass through the whole tail takes them (search.node_functions.propagate)
                need, want = needed_rows(self.tail, cache.seq_len)[0]
                with torch.inference_mode():
                    batch = _joined(live).restrict(need)
                    if batch.pos:
                        batch = step(self.tail[0], batch, cache, want)
                parts = iter(batch.rows.split([m.n for m in live]))
                msgs = [None if m is None else Msg(next(parts), batch.pos) for m in msgs]
            self._sent = msgs
        return self._sent

    def bounds(self) -> list[np.ndarray] | None:
        """Batch-mean upper bounds on the ``|score|`` of ``(s, node, *tail)`` to first order in
        ``tail[1:]``, one array per node: ``mean_b (|base_b| + sum_r |g_r| |d'_r|)``, ``d'`` the
        exact message entering ``tail[1:]`` for ``s`` (:meth:`_entering`), ``g`` the attribution
        gradient of ``tail[1:]``. None without an exact evaluator."""
        att = getattr(self.scorer, "attribution", None)
        if self.ev is None or not isinstance(att, AttributionEvaluator):
            return None
        g = att.gradient(self.rest)  # autograd: outside inference mode
        out: list[np.ndarray] = []
        with torch.inference_mode():
            g_norm = g.rows[0].float().norm(dim=-1)  # [B, R]
            # [B]: 0 for the built-in, clean-relative metrics
            base = att.baseline_rows().float().abs()
            for m in self._entering():
                if m is None:
                    out.append(np.zeros(0))
                    continue
                d = m.gather(g.pos).float().norm(dim=-1)  # [k, B, R]
                out.append(((d * g_norm).sum(dim=-1) + base).mean(dim=1).double().cpu().numpy())
        return out

    def scores(self, chosen: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch-mean exact scores of ``(s, node, *tail)`` for the starts at indices ``chosen[i]``
        of each node ``i`` (one array per node): their messages entering ``tail[1:]`` (reused from
        the bounds) in one batched pass through it, chunked by the exact evaluator's rule
        (:meth:`search.exact.ExactEvaluator.message_scores`)."""
        if self.ev is None:
            return [
                self.scorer.expand_exact((n, *self.tail), [s[int(j)] for j in c])
                if len(c)
                else np.zeros(0)
                for n, s, c in zip(self.nodes, self.starts, chosen, strict=True)
            ]
        picked: list[Msg] = []
        for m, c in zip(self._entering(), chosen, strict=True):
            if m is not None and len(c):
                picked.append(Msg(m.rows[torch.from_numpy(np.asarray(c, dtype=np.int64))], m.pos))
        if not picked:
            return [np.zeros(0) for _ in self.nodes]
        with torch.inference_mode():
            scores = self.ev.message_scores(self.rest, _joined(picked))
            means = scores.mean(dim=1).double().cpu().numpy()
        out: list[np.ndarray] = []
        at = 0
        for c in chosen:
            out.append(means[at : at + len(c)])
            at += len(c)
        return out


def _joined(parts: list[Msg]) -> Msg:
    """Message batches as one, on the union of their rows (each zero on rows it does not carry)."""
    pos = tuple(sorted({r for m in parts for r in m.pos}))
    return Msg(torch.cat([m.gather(pos) for m in parts]), pos)
