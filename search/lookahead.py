"""Recall mode's look-ahead: bounds on, and exact scores of, the ``input`` starts of pruned partials.

The pruned partials of one frontier path share their tail: ``(node_i, *tail)``. The complete
paths ``(s, node_i, *tail)`` differ only in their first two nodes, so the messages ``node_i``
sends for its starts are computed node by node (one small step each) and pushed through the
shared tail in one batched pass, instead of one whole-path evaluation per pruned partial (a
Python loop that made recall mode 0.9-27x slower than the plain search). Scores are those of
:meth:`search.exact.ExactEvaluator.expand` up to float rounding (same node functions and metric,
other batch shapes: tests/test_recall.py compares them at 1e-4 in float32).

Before any of them is scored, :meth:`StartLookahead.bounds` bounds each one without a model
evaluation: the message ``d`` that ``node`` sends when its input is patched is computed exactly
(the node step, done once and reused by the exact pass), and the tail's first-order response to it
is bounded by Cauchy-Schwarz row by row,
``|g . d| <= sum_r |g_r| |d_r|`` with ``g`` the tail's attribution gradient (one per tail, shared
by all its pruned partials). Whatever the direction of ``d``, a start whose bound is far below the
threshold cannot reach it; only the tail's higher-order terms are not covered (docs/semantics.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pathdb.graph import Node, Path
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, plan_extension
from search.node_functions import Msg, step

CHUNK = 256  # messages per pass through the tail (bounds memory on wide models)


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
        self._msgs: list[Msg | None] | None = None

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
                    pos = tuple(sorted({r for m in parts for r in m.pos}))
                    rows = torch.cat([m.gather(pos) for m in parts])
                    msgs.append(Msg(rows[torch.from_numpy(np.argsort(order))], pos))
            self._msgs = msgs
        return self._msgs

    def bounds(self) -> list[np.ndarray] | None:
        """Batch-mean upper bounds on the first-order ``|score|`` of ``(s, node, *tail)``, one array
        per node: ``mean_b (|base_b| + sum_r |g_r| |d_r|)``, ``d`` the exact message ``node`` sends
        for ``s``, ``g`` the tail's attribution gradient. None without an exact evaluator."""
        att = getattr(self.scorer, "attribution", None)
        if self.ev is None or not isinstance(att, AttributionEvaluator):
            return None
        g = att.gradient(self.tail)  # autograd: outside inference mode
        out: list[np.ndarray] = []
        with torch.inference_mode():
            g_norm = g.rows[0].float().norm(dim=-1)  # [B, R]
            # [B]: 0 for the built-in, clean-relative metrics
            base = att._baseline_rows().float().abs()
            for m in self._messages():
                if m is None:
                    out.append(np.zeros(0))
                    continue
                d = m.gather(g.pos).float().norm(dim=-1)  # [k, B, R]
                out.append(((d * g_norm).sum(dim=-1) + base).mean(dim=1).double().cpu().numpy())
        return out

    def scores(self, chosen: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch-mean exact scores of ``(s, node, *tail)`` for the starts at indices ``chosen[i]``
        of each node ``i`` (one array per node), in one batched pass through the tail."""
        if self.ev is None:
            return [
                self.scorer.expand_exact((n, *self.tail), [s[int(j)] for j in c])
                if len(c)
                else np.zeros(0)
                for n, s, c in zip(self.nodes, self.starts, chosen, strict=True)
            ]
        picked: list[Msg] = []
        for m, c in zip(self._messages(), chosen, strict=True):
            if m is not None and len(c):
                picked.append(Msg(m.rows[torch.from_numpy(np.asarray(c, dtype=np.int64))], m.pos))
        if not picked:
            return [np.zeros(0) for _ in self.nodes]
        with torch.inference_mode():
            pos = tuple(sorted({r for m in picked for r in m.pos}))
            batch = Msg(torch.cat([m.gather(pos) for m in picked]), pos)
            scores = torch.cat([self.ev.message_batch(self.tail, ch) for ch in batch.chunk(CHUNK)])
            means = scores.mean(dim=1).double().cpu().numpy()
        out: list[np.ndarray] = []
        at = 0
        for c in chosen:
            out.append(means[at : at + len(c)])
            at += len(c)
        return out
