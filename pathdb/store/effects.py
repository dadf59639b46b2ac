"""The edge-rule inputs a store keeps per completed path run: group effects (revision 0008, table
``group_effects``) and the refined rule's top-edge scores (revision 0009, ``refined_edges``).

A receiver input's *group effect* is the metric change on the run's search prompts when every
edge into it is corrupted at once (:mod:`pathdb.evaluate.groups` measures it). The search writes
them in the transaction that completes the run (it has the model then), so that export and
evaluate can apply the ``group`` edge rule without loading the model; ``pathdb merge`` copies
them with the run. Reopening a run to write it again drops them; a run without them (searched
before revision 0008, on a model the edge-masked forward does not run, or not completed) falls
back to the ``effect`` rule. The refined scores (:mod:`pathdb.evaluate.refine`) start from the
group effects and the run's stored edges, so they are written in a second transaction right after
the one that completes the run (:func:`write_refined`), and dropped with the group effects; a run
with group effects but no refined scores (searched at revision 0008, or interrupted between the
two) defaults to ``group``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import duckdb
import pyarrow as pa

TABLE = "group_effects"
REFINED = "refined_edges"


def drop_group_effects(con: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Delete run ``run_id``'s group effects and the refined scores that start from them."""
    con.execute(f"DELETE FROM {TABLE} WHERE run_id = ?", [int(run_id)])
    con.execute(f"DELETE FROM {REFINED} WHERE run_id = ?", [int(run_id)])


def _insert(
    con: duckdb.DuckDBPyConnection, table: str, run_id: int, key: str, value: str,
    rows: Mapping[str, float],
) -> None:  # fmt: skip
    """Insert ``rows`` (key -> value) of run ``run_id`` into ``table`` through Arrow."""
    from pathdb.query.tree import registered

    data = pa.table({
        "run_id": pa.array([int(run_id)] * len(rows), pa.int32()),
        key: pa.array(list(rows), pa.string()),
        value: pa.array([float(v) for v in rows.values()], pa.float64()),
    })  # fmt: skip
    with registered(con, data) as view:
        con.execute(
            f"INSERT INTO {table} (run_id, {key}, {value}) SELECT run_id, {key}, {value} FROM {view}"
        )


def write_group_effects(
    con: duckdb.DuckDBPyConnection, run_id: int, effects: Mapping[str, float]
) -> None:
    """(Re)write run ``run_id``'s group effects (receiver name -> effect) in the caller's
    transaction; its refined scores, which start from them, are dropped."""
    drop_group_effects(con, run_id)
    if effects:
        _insert(con, TABLE, run_id, "receiver", "effect", effects)


def write_refined(
    con: duckdb.DuckDBPyConnection, run_id: int, refined: Mapping[str, float], seconds: float
) -> None:
    """Store completed run ``run_id``'s refined top-edge scores (edge name -> score) in one
    transaction of their own, after the one that completed the run, and add the ``seconds`` they
    took to its ``wall_s``. Interrupted before it commits, the run stays completed with the
    ``group`` rule as its default."""
    con.begin()
    try:
        con.execute(f"DELETE FROM {REFINED} WHERE run_id = ?", [int(run_id)])
        _insert(con, REFINED, run_id, "edge", "score", refined)
        con.execute(
            "UPDATE runs SET wall_s = wall_s + ? WHERE run_id = ?", [float(seconds), int(run_id)]
        )
        con.commit()
    except BaseException:
        con.rollback()
        raise


def _stored(
    con: duckdb.DuckDBPyConnection, table: str, key: str, value: str, run_id: int
) -> dict[str, float] | None:
    """``key -> value`` of run ``run_id`` in ``table``, or None when it has no rows."""
    rows = con.execute(
        f"SELECT {key}, {value} FROM {table} WHERE run_id = ? ORDER BY {key}", [int(run_id)]
    ).fetchall()
    return {str(k): float(v) for k, v in rows} or None


def stored_group_effects(con: duckdb.DuckDBPyConnection, run_id: int) -> dict[str, float] | None:
    """Run ``run_id``'s stored group effects, or None when it has none."""
    return _stored(con, TABLE, "receiver", "effect", run_id)


def stored_refined(con: duckdb.DuckDBPyConnection, run_id: int) -> dict[str, float] | None:
    """Run ``run_id``'s stored refined top-edge scores, or None when it has none."""
    return _stored(con, REFINED, "edge", "score", run_id)


class EdgeRule(NamedTuple):
    """An edge rule with the stored inputs it needs (None where the rule needs none)."""

    rule: str
    effects: dict[str, float] | None = None
    refined: dict[str, float] | None = None


def default_edge_rule(con: duckdb.DuckDBPyConnection, run_id: int) -> EdgeRule:
    """The position-free edge rule export, evaluate and compare use for run ``run_id`` unless told,
    with the stored inputs it needs: ``refined`` when the run stored its refined scores (a search
    completed at revision 0009 or later), ``group`` when it stored only group effects (revision
    0008), ``effect`` otherwise."""
    effects = stored_group_effects(con, run_id)
    if not effects:
        return EdgeRule("effect")
    refined = stored_refined(con, run_id)
    return EdgeRule("refined", effects, refined) if refined else EdgeRule("group", effects)
