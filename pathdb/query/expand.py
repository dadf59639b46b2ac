"""SQL builders that expand tree-stored paths into node sequences and edges inside DuckDB.

A stored path is a chain of ``paths`` rows (each prepends one node to its parent) up to the root
``[FINAL]``. The expansion is a recursive CTE that walks parent links, one join per depth level,
so the work is ``O(sum of depths)`` of the selected paths and never leaves DuckDB.
"""

from __future__ import annotations

#: Expands the kv site of a position-free destination into the two EAP-IG inputs ``<k>`` and ``<v>``.
SITE_EXPANSION = (
    "(VALUES ('q', 'q'), ('k', 'k'), ('v', 'v'), ('kv', 'k'), ('kv', 'v')) AS sx(site, esite)"
)


def edge_chain_cte(selection: str) -> str:
    """CTE text defining ``chain(run_id, path_id, prompt_idx, c, src_id, dst_id, nxt)``: one row per
    edge (consecutive node pair) of every path in ``selection`` (a SELECT giving
    ``run_id, path_id, prompt_idx, c, node_id, parent_id``); ``nxt`` is NULL on the last edge."""
    return f"""sel AS ({selection}),
chain AS (
  SELECT s.run_id, s.path_id, s.prompt_idx, s.c, s.node_id AS src_id, par.node_id AS dst_id,
         par.parent_id AS nxt
  FROM sel s JOIN paths par ON par.run_id = s.run_id AND par.path_id = s.parent_id
  UNION ALL
  SELECT ch.run_id, ch.path_id, ch.prompt_idx, ch.c, ch.dst_id, p.node_id, p.parent_id
  FROM chain ch JOIN paths p ON p.run_id = ch.run_id AND p.path_id = ch.nxt
)"""


def node_chain_cte(selection: str) -> str:
    """CTE text defining ``nchain(run_id, path_id, step, node_id, nxt)``: one row per node of every
    path in ``selection`` (a SELECT giving ``run_id, path_id, node_id, parent_id``), step 0 first."""
    return f"""nsel AS ({selection}),
nchain AS (
  SELECT run_id, path_id, 0 AS step, node_id, parent_id AS nxt FROM nsel
  UNION ALL
  SELECT c.run_id, c.path_id, c.step + 1, p.node_id, p.parent_id
  FROM nchain c JOIN paths p ON p.run_id = c.run_id AND p.path_id = c.nxt
)"""


def complete_kept_selection(
    run_ids: str,
    *,
    complete_only: bool = True,
    kept_only: bool = True,
    prompt: int | None = None,
    sign: str | None = None,
) -> str:
    """SELECT of the scored paths to aggregate (complete and kept by default), with optional filters."""
    conds: list[str] = []
    if complete_only:
        conds.append("complete")
    if kept_only:
        conds.append("kept")
    conds += [f"run_id IN ({run_ids})", "parent_id IS NOT NULL", "contribution IS NOT NULL"]
    if prompt is not None:
        conds.append(f"prompt_idx = {int(prompt)}")
    if sign == "positive":
        conds.append("contribution > 0")
    elif sign == "negative":
        conds.append("contribution < 0")
    return (
        "SELECT run_id, path_id, prompt_idx, contribution AS c, node_id, parent_id, depth FROM paths WHERE "
        + " AND ".join(conds)
    )


def base_name_sql(n: str) -> str:
    """SQL expression: a node's name without position (``input``, ``m4``, ``a3.h0<q>``, ``logits``)."""
    return f"CASE WHEN {n}.kind = 'attn' THEN {n}.component || '<' || {n}.site || '>' ELSE {n}.component END"


def role_label_sql(n: str, roles: str) -> str:
    """SQL expression: a node's label with positions replaced by role names from the list ``roles``
    (1-based DuckDB list; a missing role falls back to the position number), e.g. ``a3.h0<q>@END``."""

    def role(pos: str) -> str:
        return f"coalesce(nullif(list_extract({roles}, {pos} + 1), ''), CAST({pos} AS VARCHAR))"

    kv = (
        f"CASE WHEN {n}.kind = 'attn' AND {n}.site <> 'q' THEN ':' || "
        f"CASE WHEN {n}.kv_position IS NULL THEN '*' ELSE {role(f'{n}.kv_position')} END ELSE '' END"
    )
    return (
        f"CASE WHEN {n}.position IS NULL THEN {base_name_sql(n)} ELSE "
        f"{base_name_sql(n)} || '@' || {role(f'{n}.position')} || {kv} END"
    )


def node_match_sql(n: str, param: str = "?") -> str:
    """SQL predicate: node ``n`` matches a user spec given as its label (``a3.h0<q>@10``), its
    component (``a3.h0``) or its position-free input name (``a3.h0<q>``; ``<k>``/``<v>`` also match kv)."""
    return (
        f"({n}.label = {param} OR {n}.component = {param} OR ({n}.kind = 'attn' AND "
        f"({n}.component || '<' || {n}.site || '>' = {param} OR ({n}.site = 'kv' AND "
        f"({n}.component || '<k>' = {param} OR {n}.component || '<v>' = {param})))))"
    )
