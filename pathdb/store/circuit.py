"""The circuit aggregate a store keeps per completed path run (revision 0007): the sums of the
run's complete kept paths per node-id pair (``circuit_pairs``, the tree edges) and per node
(``circuit_nodes``), so the explorer's cold first paint reads a few thousand rows instead of
scanning the run's millions (:func:`pathdb.query.tree.stored_sums`).

Written through Arrow when a run completes (:meth:`RunWriter.finish`: a search, a resumed one,
a distributed one), by ``pathdb merge`` for copied runs that lack it and by migration 0007 for
the completed runs of an upgraded store; dropped when a run is reopened to be written again.
A run without it (running, interrupted, failed) is aggregated from its paths as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

CIRCUIT_TABLES = ("circuit_pairs", "circuit_nodes")


def drop_circuit_sums(con: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Delete run ``run_id``'s circuit aggregate (its paths are about to change)."""
    for table in CIRCUIT_TABLES:
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [int(run_id)])


def write_circuit_sums(con: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """(Re)write run ``run_id``'s circuit aggregate from its paths as they are now, in the
    caller's transaction (bulk inserts of Arrow tables)."""
    from pathdb.query.tree import circuit_sums, registered

    drop_circuit_sums(con, run_id)
    for table, data in zip(CIRCUIT_TABLES, circuit_sums(con, run_id), strict=True):
        if data.num_rows:
            cols = ", ".join(data.column_names)
            with registered(con, data) as view:
                con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {view}")


def backfill_circuit_sums(
    con: duckdb.DuckDBPyConnection, run_ids: Sequence[int] | None = None
) -> list[int]:
    """Write the circuit aggregate of every completed path run (of ``run_ids`` when given) that
    has none; returns their ids (migration 0007, ``pathdb merge``)."""
    only = "" if run_ids is None else f"AND run_id IN ({', '.join(map(str, map(int, run_ids)))})"
    if run_ids is not None and not run_ids:
        return []
    missing = [
        int(r[0])
        for r in con.execute(
            f"""SELECT run_id FROM runs WHERE status = 'completed' AND kind = 'paths' {only}
                AND run_id NOT IN (SELECT DISTINCT run_id FROM circuit_nodes) ORDER BY run_id"""
        ).fetchall()
    ]
    for run_id in missing:
        write_circuit_sums(con, run_id)
    return missing
