"""Aggregation of complete kept paths onto edges and nodes, and circuit selection with pruning.

Conventions (the IPE / MIB convention, documented in the README):

* every consecutive node pair of a path is an edge; the path's contribution is added to it;
* ``score`` = signed sum, ``abs_score`` = sum of ``|c|``, ``pos_score`` / ``neg_score`` = sums of the
  positive / negative contributions only, ``n_paths`` = number of paths through it;
* **positional view**: edge name ``"{src label}->{dst label}"`` with the stored node labels, e.g.
  ``input@3->a3.h0<q>@10`` or ``a1.h2<kv>@10:3->m4@10``: a head's site is part of its label on both
  ends, and a kv-side node stays one node (no k/v split);
* **position-free view**: source = component (``input``, ``a3.h2``, ``m5``), destination =
  component plus the input site for heads (``a3.h0<q>``, ``<k>``, ``<v>``), e.g. ``a0.h1->a1.h2<k>``.
  A kv-side destination splits the path's contribution half onto its ``<k>`` and half onto its
  ``<v>`` edge (``k part + v part == the path's score``; docs/semantics.md, "Edge scores of kv
  paths"); ``n_paths`` counts the path on both, ``kv_paths`` says how many of a row's paths are such
  shared kv paths. A whole-layer node (head None) appears as ``a3`` / ``a3<q>``.

Two edge rules (``rule=``): ``paths`` aggregates the complete kept paths through each edge (the
IPE/MIB path sum, the query layer's default); ``effect`` puts every evaluated path's score on its
*first* edge only (its sender's message through that receiver input, continued along every chain
the search scored), an estimate of the effect of patching that edge alone, which scores almost
every edge and is what exports and faithfulness evaluation use by default; ``group`` is the effect
rule with every receiver input's edges summing to that input's *group effect* (all its incoming
edges corrupted together, measured with the model: :mod:`pathdb.evaluate.groups`), so that senders
that are redundant together (a head's key inputs) get back the effect their single-edge scores miss;
``refined`` caps the group scores by each sender's input chains and refines the top edges' order
with the model (:mod:`pathdb.query.edge_rules`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from pathdb.query import edge_runs
from pathdb.query.common import (
    QueryError,
    RunInfo,
    RunSpec,
    check_choice,
    require_paths,
    resolve_runs,
    run_list,
    tidy_scores,
)
from pathdb.query.edge_rules import group_rule, refined_rule
from pathdb.query.expand import complete_kept_selection
from pathdb.query.positions import position_labels
from pathdb.query.tree import (
    ancestry,
    edge_pairs,
    node_weights,
    registered,
    stored_sums,
    subtree_sums,
)

SCORE_COLUMNS = ["score", "abs_score", "pos_score", "neg_score", "n_paths"]
EDGE_RULES = ("paths", "effect", "group", "refined")
_WSUM = "sum(s) AS score, sum(a) AS abs_score, sum(pos) AS pos_score, sum(neg) AS neg_score, sum(n) AS n_paths"
#: Position-free kv destinations: half of the contribution on ``<k>``, half on ``<v>`` (weight ``w``).
KV_SPLIT = "(VALUES ('q', 'q', 1.0), ('k', 'k', 1.0), ('v', 'v', 1.0), ('kv', 'k', 0.5), ('kv', 'v', 0.5)) AS sx(site, esite, w)"
_WSUM_KV = (
    "sum(s * coalesce(sx.w, 1.0)) AS score, sum(a * coalesce(sx.w, 1.0)) AS abs_score, "
    "sum(pos * coalesce(sx.w, 1.0)) AS pos_score, sum(neg * coalesce(sx.w, 1.0)) AS neg_score, "
    "sum(n) AS n_paths, sum(CASE WHEN dn.site = 'kv' THEN n ELSE 0 END) AS kv_paths"
)
#: Pre-screen start nodes (``--batch-heads`` whole layers, ``--batch-positions`` all sources): not edges.
_PRESCREEN = "(sn.kind = 'attn' AND (sn.head IS NULL OR (sn.site <> 'q' AND sn.position IS NOT NULL AND sn.kv_position IS NULL)))"


def _selection(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    complete_only: bool,
    kept_only: bool,
    prompt: int | None,
    sign: str | None,
) -> str:
    """SQL selecting the paths to aggregate, after checking the runs exist and have such paths."""
    check_choice("sign", sign, [None, "positive", "negative"])
    infos = resolve_runs(con, run)
    require_paths(con, infos, complete_kept=complete_only and kept_only)
    return complete_kept_selection(
        run_list(infos), complete_only=complete_only, kept_only=kept_only, prompt=prompt, sign=sign
    )


def edges(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    positional: bool = False,
    complete_only: bool = True,
    kept_only: bool = True,
    prompt: int | None = None,
    sign: str | None = None,
    rule: str = "paths",
    effects: Mapping[str, float] | None = None,
    refined: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Aggregate paths onto edges: one row per edge with signed/abs/positive/negative sums and counts.
    ``rule='effect'`` scores each edge by the evaluated paths starting with it (complete_only and
    kept_only do not apply: every evaluated path counts, pre-screen rows excepted); ``rule='group'``
    is the effect rule passed through :func:`~pathdb.query.edge_rules.group_rule` with the
    receivers' group ``effects``; ``rule='refined'`` then through
    :func:`~pathdb.query.edge_rules.refined_rule` with the run's ``refined`` top-edge scores."""
    check_choice("rule", rule, list(EDGE_RULES))
    if rule in ("group", "refined") and (effects is None or positional):
        raise QueryError(
            f"rule={rule!r} is position-free and needs the receivers' group effects, which need the "
            "model (pathdb.evaluate.groups.rule_edges); use rule='effect' without the model"
        )
    if rule == "refined" and (refined is None or prompt is not None or sign is not None):
        raise QueryError(
            "rule='refined' needs the run's refined top-edge scores (pathdb.evaluate.groups."
            "rule_edges) and ranks the whole run: use rule='group' with prompt= or sign="
        )
    scored = edge_runs.edge_runs(con, run)  # edge-score runs (pathdb attribute): stored per edge
    if scored is not None:
        return edge_runs.edges(con, scored, positional=positional, prompt=prompt, sign=sign)
    if rule in ("group", "refined"):
        assert effects is not None
        eff = edges(con, run, prompt=prompt, sign=sign, rule="effect")
        grouped = group_rule(eff, effects)
        return refined_rule(grouped, refined or {}) if rule == "refined" else grouped
    if rule == "effect":
        pairs = _first_edges(
            con,
            _selection(con, run, complete_only=False, kept_only=False, prompt=prompt, sign=sign),
        )
    else:
        sel = _selection(
            con, run, complete_only=complete_only, kept_only=kept_only, prompt=prompt, sign=sign
        )
        pairs = edge_pairs(con, ancestry(con, sel), by_prompt=False)
    return _edge_frame(con, pairs, positional)


def _edge_frame(con: duckdb.DuckDBPyConnection, pairs: pa.Table, positional: bool) -> pd.DataFrame:
    """The rows of :func:`edges` from weighted node-id pairs (``run_id, src_id, dst_id, s, a, pos, neg, n``)."""
    return _top_edge_frame(con, pairs, positional, None)[0]


def _top_edge_frame(
    con: duckdb.DuckDBPyConnection, pairs: pa.Table, positional: bool, limit: int | None
) -> tuple[pd.DataFrame, int]:
    """The first ``limit`` >= 1 rows (all with ``None``) of :func:`_edge_frame` in the order of
    :func:`select_edges` by ``|score|`` (NaN last, ties by name) and the number of rows in all:
    DuckDB ranks the edges, so only ``limit`` rows become a DataFrame (the explorer's paint)."""
    node_cols = (
        "any_value(sn.kind) AS src_kind, any_value(sn.layer) AS src_layer, any_value(sn.head) AS src_head, "
        "any_value(dn.kind) AS dst_kind, any_value(dn.layer) AS dst_layer, any_value(dn.head) AS dst_head"
    )
    joins = (
        "JOIN nodes sn ON sn.run_id = pairs.run_id AND sn.node_id = pairs.src_id "
        "JOIN nodes dn ON dn.run_id = pairs.run_id AND dn.node_id = pairs.dst_id"
    )
    if positional:
        sql = f"""SELECT sn.label || '->' || dn.label AS edge, sn.label AS src, dn.label AS dst,
       any_value(dn.site) AS dst_site, {_WSUM}, 0 AS kv_paths, {node_cols},
       any_value(sn.position) AS src_position, any_value(dn.position) AS dst_position
FROM pairs {joins}
GROUP BY sn.label, dn.label"""
    else:
        sql = f"""SELECT sn.component || '->' || dn.component || coalesce('<' || sx.esite || '>', '') AS edge,
       sn.component AS src, dn.component AS dst, sx.esite AS dst_site, {_WSUM_KV}, {node_cols}
FROM pairs {joins} LEFT JOIN {KV_SPLIT} ON sx.site = dn.site
GROUP BY sn.component, dn.component, sx.esite"""
    with registered(con, pairs) as name:
        sql = sql.replace("FROM pairs", f"FROM {name} pairs")
        if limit is None:
            df = con.sql(f"SELECT * FROM ({sql}) ORDER BY abs(score) DESC, edge").df()
            total = len(df)
        else:
            df = con.sql(
                f"""SELECT *, count(*) OVER () AS _total FROM ({sql})
                    ORDER BY isnan(abs(score)), abs(score) DESC, edge LIMIT {int(limit)}"""
            ).df()
            total = int(df["_total"].iloc[0]) if len(df) else 0
            df = df.drop(columns="_total")
    df["dst_site"] = df["dst_site"].astype(object).where(df["dst_site"].notna(), None)
    return tidy_scores(df), total


def _first_edges(con: duckdb.DuckDBPyConnection, selection: str) -> pa.Table:
    """Each selected path's score on its first edge (start node -> next node), summed per node pair:
    ``run_id, src_id, dst_id, s, a, pos, neg, n``; pre-screen rows are not edges and are skipped."""
    return con.sql(
        f"""SELECT p.run_id, p.node_id AS src_id, par.node_id AS dst_id, sum(p.c) AS s, sum(abs(p.c)) AS a,
                   sum(greatest(p.c, 0)) AS pos, sum(least(p.c, 0)) AS neg, count(*)::BIGINT AS n
            FROM ({selection}) p JOIN paths par ON par.run_id = p.run_id AND par.path_id = p.parent_id
            JOIN nodes sn ON sn.run_id = p.run_id AND sn.node_id = p.node_id
            WHERE NOT {_PRESCREEN}
            GROUP BY p.run_id, p.node_id, par.node_id"""
    ).to_arrow_table()


def nodes(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    positional: bool = False,
    complete_only: bool = True,
    kept_only: bool = True,
    prompt: int | None = None,
    sign: str | None = None,
) -> pd.DataFrame:
    """Aggregate paths onto nodes (every node on a path, input and logits included): one row per node
    (its label in the positional view, its component in the position-free view)."""
    scored = edge_runs.edge_runs(con, run)  # edge-score runs (pathdb attribute): stored per node
    if scored is not None:
        return edge_runs.nodes(con, scored, positional=positional, prompt=prompt, sign=sign)
    sel = _selection(
        con, run, complete_only=complete_only, kept_only=kept_only, prompt=prompt, sign=sign
    )
    return _node_frame(con, node_weights(con, ancestry(con, sel), by_prompt=False), positional)


def _node_frame(
    con: duckdb.DuckDBPyConnection, weights: pa.Table, positional: bool
) -> pd.DataFrame:
    """The rows of :func:`nodes` from node-id weights (``run_id, node_id, s, a, pos, neg, n``)."""
    key = "n.label" if positional else "n.component"
    extra = ", any_value(n.site) AS site, any_value(n.position) AS position" if positional else ""
    with registered(con, weights) as name:
        sql = f"""SELECT {key} AS node, any_value(n.kind) AS kind, any_value(n.layer) AS layer,
       any_value(n.head) AS head{extra}, {_WSUM}
FROM {name} per JOIN nodes n ON n.run_id = per.run_id AND n.node_id = per.node_id
GROUP BY {key}"""
        df = con.sql(f"SELECT * FROM ({sql}) ORDER BY abs(score) DESC, node").df()
    return tidy_scores(df)


def edges_and_nodes(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    positional: bool = False,
    prompt: int | None = None,
    sign: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(edges(...), nodes(...))`` of the complete kept paths (rule ``paths``) from one walk of the
    path tree: both come from the same :func:`~pathdb.query.tree.subtree_sums` (the sums of
    :func:`~pathdb.query.tree.ancestry` from one read of the run's kept rows, the explorer's
    cold first paint), equal to :func:`edges` and :func:`nodes` up to float rounding; for
    completed runs, from the sums the store kept when they completed (the same numbers)."""
    all_edges, _, all_nodes = top_edges_and_nodes(
        con, run, limit=None, positional=positional, prompt=prompt, sign=sign
    )
    return all_edges, all_nodes


def top_edges_and_nodes(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    limit: int | None,
    positional: bool = False,
    prompt: int | None = None,
    sign: str | None = None,
) -> tuple[pd.DataFrame, int, pd.DataFrame]:
    """:func:`edges_and_nodes` with only the ``limit`` >= 1 strongest edge rows (all with
    ``None``; the top ``limit`` of :func:`select_edges` by ``|score|``), plus the number of edges
    in all: the explorer's first paint, which draws a few hundred of a positional view's
    hundreds of thousands of edges, ranks them in DuckDB instead of building every row."""
    if edge_runs.edge_runs(con, run) is not None:
        scored = edges(con, run, positional=positional, prompt=prompt, sign=sign)
        top = (
            scored if limit is None else select_edges(scored, top_k=limit, threshold=None, by="abs")
        )
        return top, len(scored), nodes(con, run, positional=positional, prompt=prompt, sign=sign)
    check_choice("sign", sign, [None, "positive", "negative"])
    ids = [i.run_id for i in resolve_runs(con, run)]
    kept = None if prompt is not None else stored_sums(con, ids, sign)
    if kept is None:
        sel = _selection(con, run, complete_only=True, kept_only=True, prompt=prompt, sign=sign)
        kept = subtree_sums(con, sel)
    top, total = _top_edge_frame(con, kept[0], positional, limit)
    return top, total, _node_frame(con, kept[1], positional)


@dataclass
class Circuit:
    """A selected set of edges (and the nodes they touch) with the full edge scores it came from."""

    edges: pd.DataFrame  # selected and pruned edges (columns of :func:`edges`)
    nodes: pd.DataFrame  # nodes touched by the selected edges (columns of :func:`nodes`)
    all_edges: pd.DataFrame  # every aggregated edge (for exports that carry all scores)
    positional: bool
    runs: list[RunInfo]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """Number of layers of the runs' model."""
        return self.runs[0].n_layers

    @property
    def n_heads(self) -> int:
        """Number of heads per layer of the runs' model."""
        return self.runs[0].n_heads

    def eap_cfg(self) -> dict[str, Any]:
        """The EAP-IG ``cfg`` dict of the runs' model; ``parallel_attn_mlp`` is the model seam's
        graph fact for the model the run names (parallel blocks: Pythia, GPT-J)."""
        from pathdb.arch import parallel_blocks_of

        r = self.runs[0]
        return {
            "n_layers": r.n_layers,
            "n_heads": r.n_heads,
            "parallel_attn_mlp": parallel_blocks_of(r.model_name),
            "d_model": r.d_model,
        }


def rank_scores(df: pd.DataFrame, by: str, score: str = "score") -> pd.Series:
    """The ranking key of edges: ``|score|`` for ``by='abs'``, the signed ``score`` for ``by='signed'``
    (``score`` names the column ranked, so a circuit follows the score an export writes)."""
    return df[score].abs() if by == "abs" else df[score]


def select_edges(
    all_edges: pd.DataFrame,
    *,
    top_k: int | None,
    threshold: float | None,
    by: str,
    score: str = "score",
) -> pd.DataFrame:
    """Keep edges whose ranking key is >= ``threshold`` (if given), then the ``top_k`` best (if given)."""
    check_choice("by", by, ["abs", "signed"])
    check_choice("score", score, SCORE_COLUMNS[:-1])
    if top_k is not None and top_k < 0:
        raise QueryError(f"top_k must be >= 0, got {top_k}")
    key = rank_scores(all_edges, by, score)
    sel = all_edges.assign(_key=key)
    if threshold is not None:
        sel = sel[sel["_key"] >= threshold]
    sel = sel.sort_values(["_key", "edge"], ascending=[False, True], kind="mergesort")
    if top_k is not None:
        sel = sel.head(top_k)
    return sel.drop(columns="_key")


def prune_edges(sel: pd.DataFrame) -> pd.DataFrame:
    """Drop edges not on some input -> logits chain of selected edges (reachability with networkx,
    imported here: the explorer's first paint selects edges but does not prune)."""
    import networkx as nx

    if sel.empty:
        return sel
    g: nx.DiGraph = nx.DiGraph()
    g.add_edges_from(zip(sel["src"], sel["dst"], strict=True))
    sources = set(sel.loc[sel["src_kind"] == "embed", "src"])
    sinks = set(sel.loc[sel["dst_kind"] == "final", "dst"])
    fwd: set[Any] = set(sources)
    for s in sources:
        fwd |= nx.descendants(g, s)
    bwd: set[Any] = set(sinks)
    for t in sinks:
        bwd |= nx.ancestors(g, t)
    keep = sel["src"].isin(fwd) & sel["dst"].isin(bwd)
    return sel[keep].reset_index(drop=True)


def circuit_from_edges(
    all_edges: pd.DataFrame,
    all_nodes: pd.DataFrame,
    infos: Sequence[RunInfo],
    *,
    positional: bool,
    top_k: int | None = None,
    threshold: float | None = None,
    by: str = "abs",
    prune: bool = True,
    meta: dict[str, Any] | None = None,
    score: str = "score",
) -> Circuit:
    """Build a :class:`Circuit` from already aggregated edge and node tables (edges ranked by ``score``)."""
    sel = select_edges(all_edges, top_k=top_k, threshold=threshold, by=by, score=score)
    sel = prune_edges(sel) if prune else sel.reset_index(drop=True)
    touched = set(sel["src"]) | set(sel["dst"])
    node_df = all_nodes[all_nodes["node"].isin(touched)].reset_index(drop=True)
    info = {"top_k": top_k, "threshold": threshold, "by": by, "pruned": prune, "score": score}
    info.update(meta or {})
    return Circuit(sel, node_df, all_edges, positional, list(infos), info)


def circuit(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    by: str = "abs",
    positional: bool = False,
    sign: str | None = None,
    prompt: int | None = None,
    prune: bool = True,
    rule: str = "paths",
    score: str = "score",
    effects: Mapping[str, float] | None = None,
    refined: Mapping[str, float] | None = None,
) -> Circuit:
    """Select the top-k edges (or those with score >= threshold; ``by='abs'`` ranks by ``|score|``),
    then prune edges left without a path from the input and to the logits. ``sign`` restricts the
    aggregation to paths with positive / negative contribution. Neither top_k nor threshold: all edges.
    ``rule`` is the edge rule of :func:`edges` (``effects`` / ``refined``: its inputs);
    ``score`` the column ranked (and exported)."""
    check_choice("by", by, ["abs", "signed"])
    infos = resolve_runs(con, run)
    all_edges = edges(
        con, run, positional=positional, prompt=prompt, sign=sign, rule=rule, effects=effects,
        refined=refined,
    )  # fmt: skip
    all_nodes = nodes(con, run, positional=positional, prompt=prompt, sign=sign)
    return circuit_from_edges(
        all_edges,
        all_nodes,
        infos,
        positional=positional,
        top_k=top_k,
        threshold=threshold,
        by=by,
        prune=prune,
        score=score,
        meta={
            "sign": sign,
            "prompt": prompt,
            "rule": rule,
            "position_labels": position_labels(con, infos[0].run_id) if positional else None,
        },
    )
