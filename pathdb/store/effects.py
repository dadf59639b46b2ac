"""The group effects a store keeps per completed path run (revision 0008, table ``group_effects``).

A receiver input's *group effect* is the metric change on the run's search prompts when every
edge into it is corrupted at once (:mod:`pathdb.evaluate.groups` measures it). The search writes
them in the transaction that completes the run (it has the model then), so that export and
evaluate can apply the ``group`` edge rule without loading the model; ``pathdb merge`` copies
them with the run. Reopening a run to write it again drops them; a run without them (searched
before revision 0008, on a model the edge-masked forward does not run, or not completed) falls
back to the ``effect`` rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import duckdb
import pyarrow as pa

TABLE = "group_effects"


def drop_group_effects(con: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Delete run ``run_id``'s group effects."""
    con.execute(f"DELETE FROM {TABLE} WHERE run_id = ?", [int(run_id)])


def write_group_effects(
    con: duckdb.DuckDBPyConnection, run_id: int, effects: Mapping[str, float]
) -> None:
    """(Re)write run ``run_id``'s group effects (receiver name -> effect) in the caller's transaction."""
    from pathdb.query.tree import registered

    drop_group_effects(con, run_id)
    if not effects:
        return
    data = pa.table({
        "run_id": pa.array([int(run_id)] * len(effects), pa.int32()),
        "receiver": pa.array(list(effects), pa.string()),
        "effect": pa.array([float(v) for v in effects.values()], pa.float64()),
    })  # fmt: skip
    with registered(con, data) as view:
        con.execute(
            f"INSERT INTO {TABLE} (run_id, receiver, effect) SELECT run_id, receiver, effect FROM {view}"
        )


def stored_group_effects(con: duckdb.DuckDBPyConnection, run_id: int) -> dict[str, float] | None:
    """Run ``run_id``'s stored group effects, or None when it has none."""
    rows = con.execute(
        f"SELECT receiver, effect FROM {TABLE} WHERE run_id = ? ORDER BY receiver", [int(run_id)]
    ).fetchall()
    return {str(r): float(e) for r, e in rows} or None


def default_edge_rule(
    con: duckdb.DuckDBPyConnection, run_id: int
) -> tuple[str, dict[str, float] | None]:
    """The position-free edge rule export, evaluate and compare use for run ``run_id`` unless told,
    with the stored group effects it needs: ``group`` when the run stored them (a search completed
    at revision 0008 or later), ``effect`` (and None) otherwise."""
    effects = stored_group_effects(con, run_id)
    return ("group", effects) if effects else ("effect", None)
