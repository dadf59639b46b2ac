"""Top paths of a run, ordered by contribution, with filters on depth, prompt, method and nodes/edges."""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb

from pathdb.query.common import (
    QueryError,
    RunRef,
    check_choice,
    first_row,
    require_paths,
    resolve_run,
)
from pathdb.query.expand import node_chain_cte, node_match_sql

if TYPE_CHECKING:
    import pandas as pd

_ORDER = {
    "abs": ("", "abs(contribution) DESC"),
    "signed": ("", "contribution DESC"),
    "positive": (" AND contribution > 0", "contribution DESC"),
    "negative": (" AND contribution < 0", "contribution ASC"),
}


def _check_spec(con: duckdb.DuckDBPyConnection, run_id: int, spec: str) -> None:
    """Raise :class:`QueryError` when no node of the run matches the node spec ``spec``."""
    row = first_row(
        con.execute(
            f"SELECT count(*) FROM nodes n WHERE n.run_id = {run_id} AND {node_match_sql('n', '$spec')}",
            {"spec": spec},
        ).fetchall()
    )
    if row is None or row[0] == 0:
        some = con.execute(
            f"SELECT label FROM nodes WHERE run_id = {run_id} ORDER BY node_id LIMIT 5"
        ).fetchall()
        raise QueryError(
            f"no node of run {run_id} matches {spec!r}; give a label (e.g. 'a3.h0<q>@10'), a "
            f"component ('a3.h0') or an input name ('a3.h0<k>'); some labels here: "
            + ", ".join(r[0] for r in some)
        )


def top_paths(
    con: duckdb.DuckDBPyConnection,
    run: RunRef,
    *,
    k: int = 20,
    order: str = "abs",
    complete: bool | None = True,
    kept: bool | None = None,
    min_depth: int | None = None,
    max_depth: int | None = None,
    through: str | None = None,
    edge: str | None = None,
    prompt: int | None = None,
    method: str | None = None,
) -> pd.DataFrame:
    """The ``k`` best scored paths of a run with readable node chains (``input@3 -> ... -> logits@14``).

    ``through`` keeps paths containing a matching node; ``edge`` ('src->dst') paths with a matching
    consecutive pair (each side a label, component or input name such as ``a3.h0<q>``).
    """
    return top_paths_relation(
        con, run, k=k, order=order, complete=complete, kept=kept, min_depth=min_depth,
        max_depth=max_depth, through=through, edge=edge, prompt=prompt, method=method,
    ).df()  # fmt: skip


def top_paths_relation(
    con: duckdb.DuckDBPyConnection,
    run: RunRef,
    *,
    k: int = 20,
    order: str = "abs",
    complete: bool | None = True,
    kept: bool | None = None,
    min_depth: int | None = None,
    max_depth: int | None = None,
    through: str | None = None,
    edge: str | None = None,
    prompt: int | None = None,
    method: str | None = None,
) -> duckdb.DuckDBPyRelation:
    """:func:`top_paths` as a DuckDB relation (fetch it before ``con`` closes): the CLI prints its
    rows without importing pandas."""
    check_choice("order", order, list(_ORDER))
    if k < 0:
        raise QueryError(f"k must be >= 0, got {k}")
    info = resolve_run(con, run)
    require_paths(con, [info], complete_kept=False)
    rid = info.run_id
    where = f"run_id = {rid} AND contribution IS NOT NULL" + _ORDER[order][0]
    params: dict[str, object] = {}
    if complete is not None:
        where += f" AND complete = {str(bool(complete)).lower()}"
    if kept is not None:
        where += f" AND kept = {str(bool(kept)).lower()}"
    if min_depth is not None:
        where += f" AND depth >= {int(min_depth)}"
    if max_depth is not None:
        where += f" AND depth <= {int(max_depth)}"
    if prompt is not None:
        where += f" AND prompt_idx = {int(prompt)}"
    if method is not None:
        where += " AND method = $method"
        params["method"] = method
    cand = f"SELECT * FROM paths WHERE {where}"
    ctes: list[str] = []
    if through is not None or edge is not None:
        ctes.append(node_chain_cte(f"SELECT run_id, path_id, node_id, parent_id FROM ({cand})"))
        filters: list[str] = []
        if through is not None:
            _check_spec(con, rid, through)
            params["through"] = through
            filters.append(
                f"""path_id IN (SELECT c.path_id FROM nchain c JOIN nodes n
                   ON n.run_id = {rid} AND n.node_id = c.node_id WHERE {node_match_sql("n", "$through")})"""
            )
        if edge is not None:
            parts = [p.strip() for p in edge.split("->")]
            if len(parts) != 2 or not all(parts):
                raise QueryError(f"edge {edge!r} must look like 'src->dst', e.g. 'a0.h1->a1.h0<q>'")
            for p in parts:
                _check_spec(con, rid, p)
            params["esrc"], params["edst"] = parts
            filters.append(
                f"""path_id IN (SELECT a.path_id FROM nchain a JOIN nchain b
                   ON b.path_id = a.path_id AND b.step = a.step + 1
                   JOIN nodes sn ON sn.run_id = {rid} AND sn.node_id = a.node_id
                   JOIN nodes dn ON dn.run_id = {rid} AND dn.node_id = b.node_id
                   WHERE {node_match_sql("sn", "$esrc")} AND {node_match_sql("dn", "$edst")})"""
            )
        cand = f"SELECT * FROM ({cand}) WHERE " + " AND ".join(filters)
    top = f"top AS (SELECT * FROM ({cand}) ORDER BY {_ORDER[order][1]}, path_id LIMIT {int(k)})"
    ctes.append(top)
    ctes.append(
        node_chain_cte("SELECT run_id, path_id, node_id, parent_id FROM top")
        .replace("nsel AS", "tsel AS")
        .replace("FROM nsel", "FROM tsel")
        .replace("nchain", "tchain")
    )
    sql = f"""WITH RECURSIVE {", ".join(ctes)},
labels AS (SELECT c.path_id, string_agg(n.label, ' -> ' ORDER BY c.step) AS path
           FROM tchain c JOIN nodes n ON n.run_id = {rid} AND n.node_id = c.node_id GROUP BY c.path_id)
SELECT t.path_id, t.contribution, t.depth, t.method, t.complete, t.kept, t.prompt_idx, l.path
FROM top t JOIN labels l USING (path_id)
ORDER BY {_ORDER[order][1].replace("contribution", "t.contribution")}, t.path_id"""
    return con.sql(sql, params=params or None)
