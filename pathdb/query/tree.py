"""Bottom-up aggregation over the stored path tree, level by level, inside DuckDB.

An edge ``node(a) -> node(parent(a))`` of the tree carries every selected (complete kept) path in
the subtree of row ``a``; so the edge sums of all selected paths equal the subtree sums of the tree
rows, pushed up one depth level at a time (one small join per level, collapsing shared ancestors).
This visits each ancestor once instead of once per path, and each level is materialised as an Arrow
table so DuckDB always builds its hash tables on the small side.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa

W = "s, a, pos, neg, n"
_SUM_W = "sum(s) AS s, sum(a) AS a, sum(pos) AS pos, sum(neg) AS neg, sum(n) AS n"
_counter = itertools.count()


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, table: pa.Table) -> Iterator[str]:
    """Register an Arrow table under a fresh name for the duration of the block."""
    name = f"_pathdb_tmp_{next(_counter)}"
    con.register(name, table)
    try:
        yield name
    finally:
        con.unregister(name)


def ancestry(con: duckdb.DuckDBPyConnection, selection: str) -> pa.Table:
    """Every tree row on the way from the selected paths to their roots, with subtree weights.

    ``selection``: SELECT of ``run_id, prompt_idx, path_id, parent_id, node_id, depth, c``.
    Returns ``run_id, prompt_idx, path_id, parent_id, node_id, s, a, pos, neg, n`` where the weights
    are the signed / absolute / positive / negative sums and the count of selected paths at or below
    the row (grouped by the selected paths' prompt_idx, so shared ancestors stay per prompt).
    """
    sel = con.sql(
        f"""SELECT run_id, prompt_idx, path_id, parent_id, node_id, depth, c AS s, abs(c) AS a,
                   greatest(c, 0) AS pos, least(c, 0) AS neg, 1::BIGINT AS n
            FROM ({selection})"""
    ).to_arrow_table()
    out: list[pa.Table] = []
    if sel.num_rows == 0:
        return sel.drop_columns(["depth"])
    with registered(con, sel) as sel_name:
        max_depth = con.execute(f"SELECT max(depth) FROM {sel_name}").fetchall()[0]
        assert max_depth is not None
        carry: pa.Table | None = None
        for d in range(int(max_depth[0]), -1, -1):
            parts = [f"SELECT run_id, prompt_idx, path_id, parent_id, node_id, {W} FROM {sel_name} WHERE depth = {d}"]
            if carry is not None:
                parts.append(f"SELECT run_id, prompt_idx, path_id, parent_id, node_id, {W} FROM {{carry}}")
            with registered(con, carry if carry is not None else sel) as carry_name:
                union = " UNION ALL ".join(parts).replace("{carry}", carry_name)
                level = _arrow(con.sql(
                    f"""SELECT run_id, prompt_idx, path_id, any_value(parent_id) AS parent_id,
                               any_value(node_id) AS node_id, {_SUM_W}
                        FROM ({union}) GROUP BY run_id, prompt_idx, path_id"""
                ))
            out.append(level)
            if d == 0:
                break
            with registered(con, level) as lvl:
                up = _arrow(con.sql(
                    f"""SELECT run_id, prompt_idx, parent_id AS path_id, {_SUM_W} FROM {lvl}
                        WHERE parent_id IS NOT NULL GROUP BY run_id, prompt_idx, parent_id"""
                ))
            with registered(con, up) as up_name:
                carry = _arrow(con.sql(
                    f"""WITH par AS (SELECT run_id, path_id, parent_id, node_id FROM paths
                                     WHERE depth = {d - 1} AND path_id IN (SELECT path_id FROM {up_name}))
                        SELECT u.run_id, u.prompt_idx, u.path_id, par.parent_id, par.node_id, {W}
                        FROM {up_name} u JOIN par ON par.run_id = u.run_id AND par.path_id = u.path_id"""
                ))
    return pa.concat_tables(out)


def _arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    return rel.to_arrow_table()


def edge_pairs(con: duckdb.DuckDBPyConnection, anc: pa.Table, *, by_prompt: bool) -> pa.Table:
    """Edges as node-id pairs: ``run_id, [prompt_idx,] src_id, dst_id, s, a, pos, neg, n``."""
    key = "c.run_id, c.prompt_idx" if by_prompt else "c.run_id"
    with registered(con, anc) as t:
        return _arrow(con.sql(
            f"""SELECT {key}, c.node_id AS src_id, p.node_id AS dst_id, {_SUM_W.replace('sum(', 'sum(c.')}
                FROM {t} c JOIN {t} p ON p.run_id = c.run_id AND p.prompt_idx IS NOT DISTINCT FROM c.prompt_idx
                     AND p.path_id = c.parent_id
                GROUP BY {key}, c.node_id, p.node_id"""
        ))


def node_weights(con: duckdb.DuckDBPyConnection, anc: pa.Table, *, by_prompt: bool) -> pa.Table:
    """Node occurrences as node ids: ``run_id, [prompt_idx,] node_id, s, a, pos, neg, n``."""
    key = "run_id, prompt_idx" if by_prompt else "run_id"
    with registered(con, anc) as t:
        return _arrow(con.sql(f"SELECT {key}, node_id, {_SUM_W} FROM {t} GROUP BY {key}, node_id"))
