"""Read runs, node dictionaries and path node sequences back from a store.

Path sequences are rebuilt in SQL (a recursive CTE that joins each path to its parent, one
depth level per iteration), never with one query per path.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import duckdb

from pathdb.graph import Node
from pathdb.store.db import Store, fetch_one
from pathdb.store.errors import StoreError
from pathdb.store.nodes import row_node

if TYPE_CHECKING:  # numpy, pandas and pyarrow are imported where used, not by every reader
    import numpy.typing as npt
    import pandas as pd
    import pyarrow as pa

_SEQ_SQL = """
WITH RECURSIVE chain(path_id, step, parent_id, node_id) AS (
    SELECT path_id, 0, parent_id, node_id FROM paths WHERE run_id = $run AND {anchor}
    UNION ALL
    SELECT c.path_id, c.step + 1, p.parent_id, p.node_id
    FROM chain c JOIN paths p ON p.run_id = $run AND p.path_id = c.parent_id
)
SELECT path_id, list(node_id ORDER BY step) AS node_ids FROM chain GROUP BY path_id
"""


def list_runs(store: Store) -> pd.DataFrame:
    """One row per run (``v_runs`` columns: runs without params, plus row counts)."""
    return store.con.execute("SELECT * FROM v_runs ORDER BY run_id").df()


def get_run(store: Store, run: int | str) -> dict[str, Any]:
    """The ``runs`` row of ``run`` (id or name) as a dict, ``params`` decoded from JSON."""
    con = store.con
    row = None
    if isinstance(run, str):  # an exact name wins over an id, so an all-digit name stays reachable
        cur = con.execute("SELECT * FROM runs WHERE name = ?", [run])
        row = fetch_one(cur)
    if row is None and (isinstance(run, int) or run.strip().isdigit()):
        cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [int(run)])
        row = fetch_one(cur)
    if row is None:
        names = con.execute("SELECT run_id, name FROM runs ORDER BY run_id DESC LIMIT 5").fetchall()
        known = ", ".join(f"{n} (id {i})" for i, n in names) or "none: the store has no runs"
        raise StoreError(
            f"no run {run!r} in {store.path}; recent runs: {known} (`pathdb runs` lists all)"
        )
    cols = [d[0] for d in cur.description or []]
    out = dict(zip(cols, row, strict=True))
    if isinstance(out.get("params"), str):
        out["params"] = json.loads(out["params"])
    return out


def run_nodes(store: Store | duckdb.DuckDBPyConnection, run_id: int) -> dict[int, Node]:
    """The node dictionary of a run: node id -> :class:`Node`."""
    con = store.con if isinstance(store, Store) else store
    rows = con.execute(
        "SELECT node_id, kind, layer, head, site, position, kv_position FROM nodes "
        "WHERE run_id = ? ORDER BY node_id",
        [run_id],
    ).fetchall()
    return {int(r[0]): row_node(*r[1:]) for r in rows}


def position_names(con: Store | duckdb.DuckDBPyConnection, run_id: int) -> tuple[str, ...] | None:
    """A role-aligned run's position names (position -> name), or None for integer positions."""
    cur = con.con if isinstance(con, Store) else con
    rows = cur.execute(
        "SELECT name FROM positions WHERE run_id = ? ORDER BY position", [run_id]
    ).fetchall()
    return tuple(str(r[0]) for r in rows) or None


def node_id_sequences(
    con: duckdb.DuckDBPyConnection, run_id: int, path_ids: npt.ArrayLike
) -> dict[int, list[int]]:
    """Node-id sequences (start -> FINAL) of the given paths of ``run_id`` (missing ids skipped)."""
    import numpy as np
    import pyarrow as pa

    ids = np.asarray(path_ids, dtype=np.int64).ravel()
    if not ids.size:
        return {}
    con.register("_pathdb_seq_ids", pa.table({"path_id": ids}))
    try:
        rows = con.execute(
            _SEQ_SQL.format(anchor="path_id IN (SELECT path_id FROM _pathdb_seq_ids)"),
            {"run": run_id},
        ).fetchall()
    finally:
        con.unregister("_pathdb_seq_ids")
    return {int(pid): list(seq) for pid, seq in rows}


def path_sequence(store: Store, run_id: int, path_id: int) -> tuple[Node, ...]:
    """The node sequence (start first, FINAL last) of one stored path."""
    seqs = node_id_sequences(store.con, run_id, [path_id])
    if path_id not in seqs:
        raise StoreError(f"run {run_id} has no path {path_id} in {store.path}")
    nodes = run_nodes(store, run_id)
    return tuple(nodes[n] for n in seqs[path_id])


def iter_paths(
    store: Store, run_id: int, *, complete: bool | None = None, kept: bool | None = None
) -> pa.Table:
    """All paths of a run (optionally filtered) with their ``node_ids`` list (start -> FINAL).

    Columns: path_id, parent_id, depth, prompt_idx, contribution, method, complete, kept,
    batch_id, node_ids. Ordered by path_id.
    """
    conds = ["TRUE"]
    if complete is not None:
        conds.append("complete" if complete else "NOT complete")
    if kept is not None:
        conds.append("kept" if kept else "NOT kept")
    anchor = " AND ".join(conds)
    sql = f"""
        WITH seqs AS ({_SEQ_SQL.format(anchor=anchor)})
        SELECT p.path_id, p.parent_id, p.depth, p.prompt_idx, p.contribution, p.method,
               p.complete, p.kept, p.batch_id, s.node_ids
        FROM paths p JOIN seqs s USING (path_id)
        WHERE p.run_id = $run
        ORDER BY p.path_id
    """
    return store.con.sql(sql, params={"run": run_id}).to_arrow_table()
