"""Side-by-side comparison of runs: faithfulness summary, top-k edge overlap (Jaccard) and rank
correlation (Spearman) of edge scores over every real edge of the model (unscored edges = 0).
Each run's edge scores follow its default rule (:func:`pathdb.store.effects.default_edge_rule`:
``refined`` or ``group`` with its stored inputs, else ``effect``), as its export does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import combinations

import duckdb
import numpy as np
import pandas as pd

from pathdb.arch import parallel_blocks_of
from pathdb.evaluate.graph import EdgeGraph, full_edge_table
from pathdb.evaluate.results import Evaluation
from pathdb.query.aggregate import edges as edge_table
from pathdb.query.aggregate import select_edges
from pathdb.query.common import resolve_runs
from pathdb.store.effects import default_edge_rule


def summary(con: duckdb.DuckDBPyConnection, evaluations: Sequence[Evaluation]) -> pd.DataFrame:
    """One row per run: search settings, CPR, CMD, edges for 80% / 90%, search and evaluation time."""
    rows = []
    for ev in evaluations:
        method, strategy, wall, params = con.execute(
            "SELECT method, strategy, wall_s, params FROM runs WHERE run_id = ?", [ev.run_id]
        ).fetchall()[0]
        stored = json.loads(params) if isinstance(params, str) else dict(params)
        split = bool(stored.get("params", {}).get("split_kv", False))
        rows.append({
            "run": ev.run_name, "method": method, "strategy": strategy, "split_kv": split,
            "cpr": ev.cpr, "cmd": ev.cmd, "edges_80": ev.edges_80, "edges_90": ev.edges_90,
            "search_s": wall, "eval_s": ev.wall_s, "eval_prompts": ev.prompts,
            "intervention": ev.intervention,
        })  # fmt: skip
    df = pd.DataFrame(rows)
    for col in ("edges_80", "edges_90"):
        df[col] = df[col].astype("Int64")
    return df


def _scores(con: duckdb.DuckDBPyConnection, run: int, graph: EdgeGraph, score: str) -> pd.DataFrame:
    """Every real edge with run ``run``'s score under its default rule (never loads the model)."""
    rule, effects, refined = default_edge_rule(con, run)
    table = edge_table(con, run, positional=False, rule=rule, effects=effects, refined=refined)
    return full_edge_table(graph, table, score)


def agreement(
    con: duckdb.DuckDBPyConnection,
    runs: Sequence[int | str],
    *,
    top_k: int = 50,
    score: str = "score",
) -> pd.DataFrame:
    """For every pair of runs: Jaccard overlap of their top-``top_k`` edges by ``|score|`` and the
    Spearman rank correlation of their edge scores over all real edges."""
    infos = resolve_runs(con, list(runs))
    graph = EdgeGraph.of(
        infos[0].n_layers, infos[0].n_heads, parallel_blocks_of(infos[0].model_name)
    )
    tables = {i.run_id: _scores(con, i.run_id, graph, score) for i in infos}
    rows = []
    for a, b in combinations(infos, 2):
        ta, tb = tables[a.run_id], tables[b.run_id]
        top_a = set(select_edges(ta, top_k=top_k, threshold=None, by="abs")["edge"])
        top_b = set(select_edges(tb, top_k=top_k, threshold=None, by="abs")["edge"])
        union = top_a | top_b
        jaccard = len(top_a & top_b) / len(union) if union else float("nan")
        rho = (
            ta["score"].rank().corr(tb["score"].rank())
            if ta["score"].std() and tb["score"].std()
            else np.nan
        )
        rows.append(
            {
                "run_a": a.name,
                "run_b": b.name,
                f"jaccard_top{top_k}": jaccard,
                "spearman": float(rho),
            }
        )
    return pd.DataFrame(rows)
