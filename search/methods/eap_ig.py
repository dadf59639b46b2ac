"""EAP-IG, inputs variant (EAP-IG/MIB's ``EAP-IG-inputs``): integrated gradients along the
straight line from the corrupted to the clean token embedding, ``steps`` points ``k / steps``
(k = 1..steps, so one step is plain EAP), times the sender differences."""

from __future__ import annotations

import torch
from torch import Tensor

from pathdb.evaluate.masked import MaskedEvaluator
from search.methods.common import EdgeScores, edge_products, finish, groups, receiver_grads


def eap_ig(ev: MaskedEvaluator, steps: int) -> EdgeScores:
    """``score[f, b] = -(clean_f - corrupted_f) . mean_k grad_b(embedding at k / steps)``."""
    if steps < 1:
        raise ValueError(f"--ig-steps must be >= 1 (got {steps})")
    total: Tensor | None = None
    for g, delta in groups(ev):
        corrupt = g.corrupted[..., 0, :]  # the token embedding is sender 0
        acc = torch.zeros_like(delta[:, :, :1, :]).expand(-1, -1, ev.graph.shape[1], -1).clone()
        for k in range(1, steps + 1):
            t = k / steps

            def embed(act: Tensor, t: float = t, corrupt: Tensor = corrupt) -> Tensor:
                return corrupt + t * (act - corrupt)

            acc += receiver_grads(ev, g, embed=embed).grads
        part = edge_products(delta, acc / steps).sum(0)
        total = part if total is None else total + part
    assert total is not None
    return EdgeScores("eap-ig", finish(total, ev), info={"ig_steps": steps})
