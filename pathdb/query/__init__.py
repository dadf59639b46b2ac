"""Query layer: top paths, edge/node aggregation, circuits, signed sub-circuits, cross-prompt
statistics and ad-hoc SQL over a pathdb DuckDB store (takes a raw duckdb connection + run).

Names are imported from their submodule on first use, so a command that needs only one of them
(``pathdb query paths``) does not pay for pandas and networkx, which the aggregations need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathdb.query.aggregate import Circuit, circuit, circuit_from_edges, edges, nodes
    from pathdb.query.common import QueryError, RunInfo, resolve_run, resolve_runs
    from pathdb.query.crossprompt import cross_prompt_edges, cross_prompt_nodes, cross_prompt_paths
    from pathdb.query.paths import top_paths
    from pathdb.query.signed import positive_negative, signed_circuits
    from pathdb.query.sql import sql

_SOURCES = {
    "Circuit": "aggregate", "circuit": "aggregate", "circuit_from_edges": "aggregate",
    "edges": "aggregate", "nodes": "aggregate",
    "QueryError": "common", "RunInfo": "common", "resolve_run": "common", "resolve_runs": "common",
    "cross_prompt_edges": "crossprompt", "cross_prompt_nodes": "crossprompt",
    "cross_prompt_paths": "crossprompt",
    "top_paths": "paths",
    "positive_negative": "signed", "signed_circuits": "signed",
    "sql": "sql",
}  # fmt: skip

__all__ = [
    "Circuit",
    "QueryError",
    "RunInfo",
    "circuit",
    "circuit_from_edges",
    "cross_prompt_edges",
    "cross_prompt_nodes",
    "cross_prompt_paths",
    "edges",
    "nodes",
    "positive_negative",
    "resolve_run",
    "resolve_runs",
    "signed_circuits",
    "sql",
    "top_paths",
]


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first access (PEP 562)."""
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes including the names not imported yet (for tab completion)."""
    return sorted({*globals(), *__all__})
