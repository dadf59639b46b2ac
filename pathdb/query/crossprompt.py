"""Cross-prompt statistics of edges, nodes and path shapes for per-prompt runs (runs may be pooled).

For each key (edge, node or path shape) the per-prompt value is the signed sum of the contributions
of that prompt's complete kept paths. Over the set P of prompts of the runs (the ``prompts`` table,
or the distinct ``prompt_idx`` of the paths when it is empty; pooled runs count each
``(run, prompt)`` separately), a prompt where the key does not appear counts as **0** in ``mean``,
``std`` (population, ddof=0), ``min`` and ``max``. ``frequency`` = share of prompts where it appears;
``sign_consistency`` = share of its appearances whose per-prompt value has the majority sign
(a value of exactly 0 has neither sign); ``mean_present`` = mean over the appearances only.

Alignment: with ``align='roles'`` positions become the prompts' role labels (``a3.h0<q>@END``,
``input@IO``, kv heads ``a1.h0<kv>@END:IO``; a position without a role keeps its number);
with ``align='none'`` keys are position-free (edges as in the position-free view, with kv
destinations counted on both ``<k>`` and ``<v>``); ``'auto'`` uses roles when every prompt has them.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import pandas as pd

from pathdb.query.common import (
    QueryError,
    RunInfo,
    RunSpec,
    check_choice,
    first_row,
    require_paths,
    resolve_runs,
    run_list,
)
from pathdb.query.expand import (
    SITE_EXPANSION,
    complete_kept_selection,
    node_chain_cte,
    role_label_sql,
)
from pathdb.query.tree import ancestry, edge_pairs, node_weights, registered

# The per-edge statistics of :func:`cross_prompt_edges` (also the explorer heatmap's fields).
STAT_COLUMNS = [
    "mean",
    "std",
    "min",
    "max",
    "frequency",
    "sign_consistency",
    "n_present",
    "n_prompts",
    "mean_present",
]


def _prompt_set(con: duckdb.DuckDBPyConnection, infos: Sequence[RunInfo]) -> tuple[str, int, bool]:
    """SQL of the (run_id, prompt_idx, roles) prompt set, its size, and whether every prompt has roles."""
    ids = run_list(infos)
    nulls = first_row(
        con.execute(
            f"SELECT count(*) FROM paths WHERE run_id IN ({ids}) AND complete AND kept AND prompt_idx IS NULL "
            "AND parent_id IS NOT NULL"
        ).fetchall()
    )
    if nulls is not None and nulls[0] > 0:
        raise QueryError(
            "cross-prompt statistics need per-prompt runs (paths with a prompt_idx); run(s) "
            f"{ids} hold batch-mode paths: search with --prompt-mode per-prompt"
        )
    pset = f"""SELECT run_id, prompt_idx, any_value(roles) AS roles FROM (
      SELECT run_id, prompt_idx, roles FROM prompts WHERE run_id IN ({ids})
      UNION ALL SELECT DISTINCT run_id, prompt_idx, NULL::VARCHAR[] FROM paths
      WHERE run_id IN ({ids}) AND prompt_idx IS NOT NULL) GROUP BY run_id, prompt_idx"""
    row = first_row(con.execute(f"SELECT count(*), count(roles) FROM ({pset})").fetchall())
    assert row is not None
    return pset, int(row[0]), int(row[0]) > 0 and row[0] == row[1]


def _stats_sql(values: str, n_prompts: int) -> str:
    """SQL computing the statistics from ``values(key, v)`` (one row per prompt where key appears)."""
    n = float(n_prompts)
    return f"""vals AS ({values}),
st AS (SELECT key, count(*) AS n_present, sum(v) AS s, min(v) AS mn, max(v) AS mx,
              count(*) FILTER (WHERE v > 0) AS npos, count(*) FILTER (WHERE v < 0) AS nneg
       FROM vals GROUP BY key),
dev AS (SELECT vals.key, sum((v - st.s / {n}) * (v - st.s / {n})) AS ss
        FROM vals JOIN st USING (key) GROUP BY vals.key)
SELECT st.key, st.s / {n} AS mean,
       sqrt((dev.ss + ({n} - st.n_present) * (st.s / {n}) * (st.s / {n})) / {n}) AS std,
       CASE WHEN st.n_present < {n_prompts} THEN least(st.mn, 0.0) ELSE st.mn END AS min,
       CASE WHEN st.n_present < {n_prompts} THEN greatest(st.mx, 0.0) ELSE st.mx END AS max,
       st.n_present / {n} AS frequency,
       greatest(st.npos, st.nneg) / st.n_present AS sign_consistency,
       st.n_present, {n_prompts} AS n_prompts, st.s / st.n_present AS mean_present
FROM st JOIN dev USING (key)"""


def _prepare(
    con: duckdb.DuckDBPyConnection, runs: RunSpec, align: str
) -> tuple[list[RunInfo], str, int, bool]:
    check_choice("align", align, ["auto", "roles", "none"])
    infos = resolve_runs(con, runs)
    require_paths(con, infos, complete_kept=True)
    pset, n_prompts, has_roles = _prompt_set(con, infos)
    if align == "roles" and not has_roles:
        raise QueryError(
            "align='roles' needs role labels for every prompt (prompts.roles); use align='none'"
        )
    return infos, pset, n_prompts, align == "roles" or (align == "auto" and has_roles)


def _finish(con: duckdb.DuckDBPyConnection, sql: str, key: str, roles: bool) -> pd.DataFrame:
    df = con.sql(f"SELECT * FROM ({sql}) ORDER BY abs(mean) DESC, key").df()
    df = df.rename(columns={"key": key})
    df["n_present"] = df["n_present"].astype("int64")
    df["n_prompts"] = df["n_prompts"].astype("int64")
    df.attrs["aligned_by"] = "roles" if roles else "none"
    return df.reset_index(drop=True)


def cross_prompt_edges(
    con: duckdb.DuckDBPyConnection, runs: RunSpec, *, align: str = "auto"
) -> pd.DataFrame:
    """Per edge across prompts: mean, std, min, max, frequency, sign consistency (module docstring)."""
    infos, pset, n_prompts, roles = _prepare(con, runs, align)
    sel = complete_kept_selection(run_list(infos))
    pairs = edge_pairs(con, ancestry(con, sel), by_prompt=True)
    joins = """JOIN nodes sn ON sn.run_id = pairs.run_id AND sn.node_id = pairs.src_id
               JOIN nodes dn ON dn.run_id = pairs.run_id AND dn.node_id = pairs.dst_id"""
    with registered(con, pairs) as name:
        if roles:
            values = f"""SELECT {role_label_sql("sn", "ps.roles")} || '->' || {role_label_sql("dn", "ps.roles")}
                         AS key, sum(s) AS v FROM {name} pairs {joins}
                         JOIN ({pset}) ps ON ps.run_id = pairs.run_id AND ps.prompt_idx = pairs.prompt_idx
                         GROUP BY pairs.run_id, pairs.prompt_idx, key"""
        else:
            values = f"""SELECT sn.component || '->' || dn.component || coalesce('<' || sx.esite || '>', '')
                         AS key, sum(s) AS v FROM {name} pairs {joins} LEFT JOIN {SITE_EXPANSION}
                         ON sx.site = dn.site GROUP BY pairs.run_id, pairs.prompt_idx, key"""
        return _finish(con, f"WITH {_stats_sql(values, n_prompts)}", "edge", roles)


def cross_prompt_nodes(
    con: duckdb.DuckDBPyConnection, runs: RunSpec, *, align: str = "auto"
) -> pd.DataFrame:
    """Per node across prompts (every node on a path, input and logits included): the same statistics."""
    infos, pset, n_prompts, roles = _prepare(con, runs, align)
    sel = complete_kept_selection(run_list(infos))
    occ = node_weights(con, ancestry(con, sel), by_prompt=True)
    key = role_label_sql("n", "ps.roles") if roles else "n.component"
    with registered(con, occ) as name:
        values = f"""SELECT {key} AS key, sum(s) AS v FROM {name} occ
                     JOIN nodes n ON n.run_id = occ.run_id AND n.node_id = occ.node_id
                     JOIN ({pset}) ps ON ps.run_id = occ.run_id AND ps.prompt_idx = occ.prompt_idx
                     GROUP BY occ.run_id, occ.prompt_idx, key"""
        return _finish(con, f"WITH {_stats_sql(values, n_prompts)}", "node", roles)


def cross_prompt_paths(
    con: duckdb.DuckDBPyConnection, runs: RunSpec, *, align: str = "auto"
) -> pd.DataFrame:
    """Per path shape (the node chain with role or position-free names) across prompts."""
    infos, pset, n_prompts, roles = _prepare(con, runs, align)
    ids = run_list(infos)
    sel = (
        f"SELECT run_id, path_id, node_id, parent_id FROM paths WHERE run_id IN ({ids}) AND complete "
        "AND kept AND contribution IS NOT NULL AND parent_id IS NOT NULL"
    )
    key = role_label_sql("n", "ps.roles") if roles else "n.component"
    values = f"""SELECT shape AS key, sum(c) AS v FROM (
        SELECT p.run_id, p.prompt_idx, any_value(p.contribution) AS c,
               string_agg({key}, ' -> ' ORDER BY nc.step) AS shape
        FROM nchain nc JOIN paths p ON p.run_id = nc.run_id AND p.path_id = nc.path_id
        JOIN nodes n ON n.run_id = nc.run_id AND n.node_id = nc.node_id
        JOIN ({pset}) ps ON ps.run_id = p.run_id AND ps.prompt_idx = p.prompt_idx
        GROUP BY p.run_id, p.prompt_idx, p.path_id) GROUP BY run_id, prompt_idx, shape"""
    sql = f"WITH RECURSIVE {node_chain_cte(sel)}, {_stats_sql(values, n_prompts)}"
    return _finish(con, sql, "path", roles)
