"""Recall mode's look-ahead: exact scores of the ``input`` starts of many pruned partials at once.

The pruned partials of one frontier path share their tail: ``(node_i, *tail)``. The complete
paths ``(s, node_i, *tail)`` differ only in their first two nodes, so the messages ``node_i``
sends for its starts are computed node by node (one small step each) and pushed through the
shared tail in one batched pass, instead of one whole-path evaluation per pruned partial (a
Python loop that made recall mode 0.9-27x slower than the plain search). Scores are those of
:meth:`search.exact.ExactEvaluator.expand` up to float rounding (same node functions and metric,
other batch shapes: tests/test_recall.py compares them at 1e-4 in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pathdb.graph import Node, Path
from search.exact import ExactEvaluator, plan_extension
from search.node_functions import Msg, step

CHUNK = 256  # messages per pass through the tail (bounds memory on wide models)


def score_starts(
    scorer: Any, tail: Path, nodes: Sequence[Node], starts: Sequence[Sequence[Node]]
) -> list[np.ndarray]:
    """Batch-mean exact scores of ``(s, node, *tail)`` for each ``node`` and each ``s`` in its
    ``starts``: one array per node. A scorer over one prompt batch (``scorer.exact``, an
    :class:`ExactEvaluator`) gets one pass through ``tail``; other scorers (prompts of several
    lengths or role layouts) are called per node."""
    ev = getattr(scorer, "exact", None)
    if not isinstance(ev, ExactEvaluator):
        return [
            scorer.expand_exact((n, *tail), s) if s else np.zeros(0)
            for n, s in zip(nodes, starts, strict=True)
        ]
    cache = ev.cache
    msgs: list[Msg] = []
    with torch.inference_mode():
        for node, s in zip(nodes, starts, strict=True):
            if not s:
                continue
            ev.checked_path((node, *tail))  # validates the path once (memoised)
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
        if not msgs:
            return [np.zeros(0) for _ in nodes]
        pos = tuple(sorted({r for m in msgs for r in m.pos}))
        batch = Msg(torch.cat([m.gather(pos) for m in msgs]), pos)
        scores = torch.cat([ev.message_batch(tail, ch) for ch in batch.chunk(CHUNK)])
        means = scores.mean(dim=1).double().cpu().numpy()
    out: list[np.ndarray] = []
    at = 0
    for s in starts:
        out.append(means[at : at + len(s)])
        at += len(s)
    return out
