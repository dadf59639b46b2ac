"""Learned edge masks (``002_*``): a learnable interpolation coefficient per edge between its clean
and its corrupted message, optimised by gradient descent on the masked model's faithfulness with
a sparsity penalty; one circuit per penalty of a sweep.

Coefficient ``a = clamp(1.2 sigmoid(theta) - 0.1, 0, 1)`` (the stretched sigmoid of L0 masks,
so exactly 0 and 1 are reachable) keeps the clean message (``MaskedEvaluator.masked_metric`` with
out-of-circuit weight ``1 - a``). Loss: ``(1 - F(a))^2 + penalty * mean(sigmoid(theta))`` with
``F`` the faithfulness normalised by the full and empty circuits; the penalty acts on the
unclamped sigmoid, so it moves coefficients stuck at 1. ``theta`` starts at :data:`INIT` plus
seeded noise of scale ``init_noise`` (every coefficient 1: the full graph, so penalty 0 keeps it);
Adam, ``steps`` full-batch steps. The circuit is ``a > 0.5``; the stored score is
``sigmoid(theta)`` (same order as ``a``, without ties at 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pathdb.evaluate.graph import EvaluationError
from pathdb.evaluate.masked import MaskedEvaluator
from search.methods.common import EdgeScores

INIT = 2.5  # 1.2 sigmoid(2.5) - 0.1 > 1: every coefficient starts at 1 (the full graph)


def learned_mask(
    ev: MaskedEvaluator,
    *,
    penalty: float,
    steps: int = 100,
    lr: float = 0.1,
    seed: int = 0,
    init_noise: float = 0.01,
    progress: Callable[[int, int, float], None] | None = None,
) -> EdgeScores:
    """Optimise the coefficients for one ``penalty`` (>= 0) and return them with the circuit."""
    if penalty < 0 or steps < 0 or lr <= 0:
        raise ValueError(
            f"need --penalty >= 0, --steps >= 0 and --lr > 0 (got {penalty}, {steps}, {lr})"
        )
    cfg = ev.model.cfg
    real_np = ev.graph.real()
    real = torch.from_numpy(real_np).to(cfg.device)
    full_empty = ev.metric_values(np.stack([real_np, ~real_np]))
    m_full, m_empty = float(full_empty[0]), float(full_empty[1])
    if abs(m_full - m_empty) < 1e-9:
        raise EvaluationError("the corruption changes nothing on these prompts: no mask to learn")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(ev.graph.shape, generator=gen, dtype=torch.float64) * init_noise
    theta = (INIT + noise).to(device=cfg.device, dtype=cfg.dtype).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    n_real = int(real_np.sum())
    loss_value = float("nan")
    for step in range(steps):
        with torch.enable_grad():
            soft = torch.sigmoid(theta)
            keep = (1.2 * soft - 0.1).clamp(0, 1)
            metric = ev.masked_metric((1 - keep)[None])[0]
            faith = (metric - m_empty) / (m_full - m_empty)
            loss = (1 - faith) ** 2 + penalty * (soft * real).sum() / n_real
            opt.zero_grad()
            loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step + 1, steps, loss_value)
    soft_np = torch.sigmoid(theta).detach().double().cpu().numpy()
    keep_np = soft_np * real_np
    in_graph = (np.clip(1.2 * soft_np - 0.1, 0, 1) > 0.5) & real_np
    info = {"penalty": penalty, "steps": steps, "lr": lr, "seed": seed, "final_loss": loss_value,
            "n_edges_kept": int(in_graph.sum())}  # fmt: skip
    return EdgeScores("learned-mask", keep_np, in_graph=in_graph, info=info)
