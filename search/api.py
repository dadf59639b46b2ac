"""In-memory search for notebooks: the same strategies as ``pathdb search``, results as Python objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pathdb.metrics import Metric
from pathdb.prompts import PromptSet
from search.scorer import build_scorer
from search.sinks import EvaluatedPath, MemorySink
from search.strategies import SearchParams, SearchRun


def find_paths(
    model: Any,
    prompts: PromptSet,
    params: SearchParams | None = None,
    *,
    metric: str | Callable[..., Metric] = "logit_difference",
    patch_type: str = "counterfactual",
    positional: bool = True,
    root_position: int | None = None,
) -> list[EvaluatedPath]:
    """Run one batch-mode search without a store; returns every evaluated path (root first).

    ``metric`` may be a registry name or a factory ``(readout, clean_row, target, cf_target)``
    returning a :class:`pathdb.metrics.Metric` (see :func:`pathdb.metrics.custom_metric`).
    Use :func:`search.runner.run_loaded` to keep the result in a DuckDB store instead.
    """
    p = params or SearchParams()
    p.validate(positional=positional)
    scorer = build_scorer(
        model, prompts, metric=metric, patch_type=patch_type, positional=positional, root_position=root_position
    )
    sink = MemorySink()
    SearchRun(scorer, sink, p).run([sink.root(scorer.root)])
    return sink.paths
