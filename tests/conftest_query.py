"""Test helpers for the query/export tests: a real DuckDB store built from the schema's metadata,
filled through Arrow with hand-written runs, nodes and tree-stored paths."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import sqlalchemy

from pathdb.graph import Node, NodeKind
from pathdb.store.nodes import NODE_COLUMNS, node_row
from pathdb.store.schema import metadata


def make_store(path: Path) -> duckdb.DuckDBPyConnection:
    """Create every schema table in a fresh DuckDB file and return a raw read-write connection."""
    engine = sqlalchemy.create_engine(f"duckdb:///{path}")
    metadata.create_all(engine)
    engine.dispose()
    return duckdb.connect(str(path))


def add_run(
    con: duckdb.DuckDBPyConnection,
    run_id: int,
    name: str,
    *,
    n_layers: int = 2,
    n_heads: int = 2,
    d_model: int = 8,
    prompt_mode: str = "per-prompt",
) -> None:
    """Insert one runs row with plausible provenance values."""
    now = dt.datetime(2025, 1, 1)
    con.execute(
        "INSERT INTO runs (run_id, name, status, created_at, model_name, model_fingerprint, n_layers, "
        'n_heads, d_model, method, strategy, metric, patch_type, prompt_mode, "positional", params, '
        "package_version) VALUES (?, ?, 'completed', ?, 'toy', 'f', ?, ?, ?, 'exact', 'threshold', "
        "'logit_diff', 'zero', ?, true, '{}', '0')",
        [run_id, name, now, n_layers, n_heads, d_model, prompt_mode],
    )


def add_prompt(
    con: duckdb.DuckDBPyConnection,
    run_id: int,
    prompt_idx: int,
    n_tokens: int,
    roles: Sequence[str] | None,
) -> None:
    """Insert one prompts row with ``n_tokens`` dummy tokens and optional role labels."""
    con.execute(
        "INSERT INTO prompts (run_id, prompt_idx, clean, target, target_id, tokens, token_strs, roles) "
        "VALUES (?, ?, 'x', 't', 0, ?, ?, ?)",
        [
            run_id,
            prompt_idx,
            list(range(n_tokens)),
            ["t"] * n_tokens,
            None if roles is None else list(roles),
        ],
    )


class TreeBuilder:
    """Builds the nodes and paths rows of one run from whole paths (start first, FINAL last).

    Every proper suffix of a path becomes an (incomplete, kept) ancestor row, created once and shared.
    """

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self.node_ids: dict[Node, int] = {}
        self.rows: dict[tuple[int | None, tuple[Node, ...]], dict[str, object]] = {}
        self.next_id = 1

    def node_id(self, node: Node) -> int:
        """Id of ``node`` in this run's node dictionary (assigned on first use)."""
        if node not in self.node_ids:
            self.node_ids[node] = len(self.node_ids)
        return self.node_ids[node]

    def _row(self, prompt: int | None, nodes: tuple[Node, ...]) -> dict[str, object]:
        key = (prompt, nodes)
        if key not in self.rows:
            parent = None if len(nodes) == 1 else self._row(prompt, nodes[1:])["path_id"]
            self.rows[key] = {
                "run_id": self.run_id,
                "path_id": self.next_id,
                "parent_id": parent,
                "node_id": self.node_id(nodes[0]),
                "depth": len(nodes) - 1,
                "prompt_idx": prompt,
                "contribution": None if len(nodes) == 1 else 0.5,
                "method": "root" if len(nodes) == 1 else "attribution",
                "complete": False,
                "kept": True,
                "batch_id": 0,
            }
            self.next_id += 1
        return self.rows[key]

    def add(
        self,
        nodes: Sequence[Node],
        contribution: float,
        *,
        prompt: int | None = None,
        kept: bool = True,
        method: str = "exact",
    ) -> int:
        """Add a scored path; returns its path id. ``complete`` follows from its start node."""
        row = self._row(prompt, tuple(nodes))
        row.update(
            contribution=contribution,
            kept=kept,
            method=method,
            complete=nodes[0].kind is NodeKind.EMBED,
        )
        return int(row["path_id"])  # type: ignore[call-overload]

    def write(self, con: duckdb.DuckDBPyConnection) -> None:
        """Insert the nodes and paths rows through Arrow."""
        nodes_tab = pa.Table.from_pylist(
            [
                {"run_id": self.run_id, **dict(zip(NODE_COLUMNS, node_row(i, n), strict=True))}
                for n, i in self.node_ids.items()
            ]
        )
        paths_tab = pa.Table.from_pylist(list(self.rows.values()))
        con.register("nodes_in", nodes_tab)
        con.execute("INSERT INTO nodes BY NAME SELECT * FROM nodes_in")
        con.unregister("nodes_in")
        con.register("paths_in", paths_tab)
        con.execute("INSERT INTO paths BY NAME SELECT * FROM paths_in")
        con.unregister("paths_in")
