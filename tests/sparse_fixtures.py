"""The tiny model, row-sparse prompts and dense-engine comparison shared by the exact-engine
speed tests (``test_sparse_exact``, ``test_exact_batching``; issue 22)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pathdb.graph import Node
from pathdb.prompts import PromptSet
from search import node_functions
from search.activations import ActivationCache
from search.exact import ExactEvaluator, build_metric
from search.node_functions import Msg
from tests.engine_helpers import tiny_model
from tests.search_fixtures import prompt_set_of

B, T = 3, 7
TOL = 1e-6


def sparse_setup() -> dict[str, Any]:
    """A 3-layer float64 model and prompts sharing their first two tokens, whose counterfactuals
    change only a few positions (prompt by prompt: {3}, {3, 5}, {4}): start messages are zero on
    many rows under counterfactual and mean patching."""
    model = tiny_model(n_layers=3, n_heads=2, n_ctx=T, seed=4)
    g = torch.Generator().manual_seed(5)
    V = model.cfg.d_vocab
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[:, :2] = tokens[0, :2]
    cf = tokens.clone()
    for b, rows in enumerate(([3], [3, 5], [4])):
        for r in rows:
            cf[b, r] = (tokens[b, r] + 1) % V
    target = torch.randint(0, V, (B,), generator=g)
    return dict(model=model, tokens=tokens, cf=cf, target=target, cf_target=(target + 1) % V)


def evaluator(s: dict[str, Any], patch_type: str, positional: bool, **kw: Any) -> ExactEvaluator:
    """An exact evaluator on ``s``'s prompts (logit difference, root at the last row or none)."""
    cache = ActivationCache.build(s["model"], s["tokens"], s["cf"], patch_type)
    root = Node.final(cache.shape.n_layers, T - 1 if positional else None)
    metric = build_metric(cache, "logit_difference", root, s["target"], s["cf_target"])
    return ExactEvaluator(cache, metric, root, **kw)


def prompt_set(s: dict[str, Any], name: str) -> PromptSet:
    """``s``'s prompts as a :class:`PromptSet` (for whole searches)."""
    return prompt_set_of(s["tokens"], s["cf"], s["target"], s["cf_target"], name)


def dense(fn: Callable[[], Any]) -> Any:
    """``fn()`` on the dense engine of before issue 22 (every row, one path at a time)."""
    ExactEvaluator.dense = True
    try:
        return fn()
    finally:
        ExactEvaluator.dense = False


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` equals the dense engine's ``want`` within ``TOL`` (relative to its largest value)."""
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= TOL * max(1.0, float(want.abs().max())), f"max |got - dense| = {err:.2e}"


def record_calls(
    monkeypatch: Any, module: Any, name: str, pick: Callable[..., Any] = lambda *a: a
) -> list[Any]:
    """From now on, record ``pick(*args)`` of every call of ``module.name`` (and run it); a class
    as ``module`` spies on a method (``args`` then start with the instance)."""
    seen: list[Any] = []
    inner = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(pick(*args))
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def record_mlp_steps(monkeypatch: Any) -> list[Msg]:
    """From now on, record every message ``node_functions.mlp_step`` is given (and run it): the
    rows (``len(m.pos)``) and candidates (``m.n``) the engine pushes through MLPs."""
    return record_calls(monkeypatch, node_functions, "mlp_step", lambda node, msg, cache: msg)
