"""Exact edge patching: one masked forward per edge (the full graph minus that edge, batched by
``MaskedEvaluator.metric_values``); the ground truth the linear methods approximate."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pathdb.evaluate.masked import MaskedEvaluator
from search.methods.common import EdgeScores

CHUNK = 256  # edges per progress step (the evaluator batches them further to its memory budget)


def edge_patching(
    ev: MaskedEvaluator, progress: Callable[[int, int], None] | None = None
) -> EdgeScores:
    """``score[f, b] = metric(full graph without f -> b) - metric(full graph)``."""
    real = ev.graph.real()
    cells = np.argwhere(real)
    full = float(ev.metric_values(real)[0])
    scores = np.zeros(real.shape)
    for s in range(0, len(cells), CHUNK):
        part = cells[s : s + CHUNK]
        masks = np.repeat(real[None], len(part), axis=0)
        masks[np.arange(len(part)), part[:, 0], part[:, 1]] = False
        scores[part[:, 0], part[:, 1]] = ev.metric_values(masks) - full
        if progress is not None:
            progress(min(s + CHUNK, len(cells)), len(cells))
    return EdgeScores("edge-patching", scores)
