"""Edge Attribution Patching (``004_*``): every edge's effect to first order, from one masked
forward and one backward: the gradient of the metric with respect to each edge's corruption
weight at the clean model (``MaskedEvaluator.masked_metric`` at weights 0)."""

from __future__ import annotations

import torch

from pathdb.evaluate.masked import MaskedEvaluator
from search.methods.common import EdgeScores


def eap(ev: MaskedEvaluator) -> EdgeScores:
    """``score[f, b] = d metric / d w[f, b]`` at ``w = 0`` (``w`` = 1 corrupts the edge), i.e.
    ``-(clean_f - corrupted_f) . d metric / d input_b`` summed over positions, mean over prompts."""
    cfg = ev.model.cfg
    weights = torch.zeros(
        (1, *ev.graph.shape), dtype=cfg.dtype, device=cfg.device, requires_grad=True
    )
    with torch.enable_grad():
        metric = ev.masked_metric(weights)[0]
        (grad,) = torch.autograd.grad(metric, weights)
    scores = grad[0].double().cpu().numpy()
    return EdgeScores("eap", scores * ev.graph.real())
