"""Query layer: top paths, edge/node aggregation, circuits, signed sub-circuits, cross-prompt
statistics and ad-hoc SQL over a pathdb DuckDB store (takes a raw duckdb connection + run)."""

from pathdb.query.aggregate import Circuit, circuit, circuit_from_edges, edges, nodes
from pathdb.query.common import QueryError, RunInfo, resolve_run, resolve_runs
from pathdb.query.crossprompt import cross_prompt_edges, cross_prompt_nodes, cross_prompt_paths
from pathdb.query.paths import top_paths
from pathdb.query.signed import positive_negative, signed_circuits
from pathdb.query.sql import sql

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
