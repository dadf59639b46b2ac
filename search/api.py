"""In-memory search for notebooks: the same strategies as ``pathdb search``, results as Python objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pathdb.metrics import Metric
from pathdb.prompts import PromptSet
from search.scorer import build_scorer
from search.sinks import EvaluatedPath, MemorySink
from search.strategies import SearchParams, SearchRun, check_size
from search.threads import DEFAULT_THREADS, torch_threads


def find_paths(
    model: Any,
    prompts: PromptSet,
    params: SearchParams | None = None,
    *,
    metric: str | Callable[..., Metric] = "logit_difference",
    patch_type: str = "counterfactual",
    positional: bool = True,
    root_position: int | str | None = None,
    threads: int | None = DEFAULT_THREADS,
    device: str | None = None,
    dtype: str | None = None,
) -> list[EvaluatedPath]:
    """Run one batch-mode search without a store; returns every evaluated path (root first).

    ``metric`` may be a registry name or a factory ``(readout, clean_row, target, cf_target)``
    returning a :class:`pathdb.metrics.Metric` (see :func:`pathdb.metrics.custom_metric`).
    Use :func:`search.runner.run_loaded` to keep the result in a DuckDB store instead.
    ``threads`` sets torch's CPU threads for the call (default 1, as the CLI; None keeps torch's).
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) and ``dtype`` (``float32``, ``bfloat16``,
    ``float16``, ``float64``) move the model there first, in place like ``Module.to``; None keeps
    it where it is. Prompts may stay on the host: the engine moves them to the model's device.
    """
    p = params or SearchParams()
    p.validate(positional=positional)
    if device is not None or dtype is not None:
        from pathdb.models import move_model

        move_model(model, device, dtype)
    with torch_threads(threads):
        scorer = build_scorer(
            model,
            prompts,
            metric=metric,
            patch_type=patch_type,
            positional=positional,
            root_position=root_position,
        )
        check_size(p, scorer.root, scorer.shape)
        sink = MemorySink()
        SearchRun(scorer, sink, p).run([sink.root(scorer.root)])
    return sink.paths
