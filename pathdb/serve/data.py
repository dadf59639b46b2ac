"""The explorer's answers, computed by the query layer on a read-only connection: JSON-ready
dicts of aggregates only (top edges, one tree level, top paths), never a run's millions of rows.

Every number comes from :mod:`pathdb.query` (edges, nodes, top paths, cross-prompt statistics)
or :mod:`pathdb.evaluate.storage` (stored faithfulness), so the page shows what the CLI prints.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, NamedTuple

import duckdb

from pathdb.query.common import QueryError, RunInfo, check_choice, resolve_run

if TYPE_CHECKING:
    import pandas as pd

SIGNS = ("both", "positive", "negative")
_SITE = re.compile(r"<(q|kv|k|v)>")  # the input site in a positional node label
#: most edges one circuit answer carries (the slider's range); the page never needs more
MAX_EDGES = 500
#: most children one tree expansion carries (the strongest by |score|; the total is reported)
MAX_CHILDREN = 2000
#: most prompts (columns) of the cross-prompt heatmap; the statistics cover every prompt
MAX_PROMPTS = 50
EDGE_FIELDS = (
    "edge", "src", "dst", "dst_site", "score", "abs_score", "pos_score", "neg_score", "n_paths",
    "src_kind", "src_layer", "src_head", "dst_kind", "dst_layer", "dst_head",
    "src_position", "dst_position",
)  # fmt: skip
NODE_FIELDS = (
    "node", "kind", "layer", "head", "site", "position",
    "score", "abs_score", "pos_score", "neg_score", "n_paths",
)  # fmt: skip


class Tables(NamedTuple):
    """One circuit view (:func:`circuit_tables`): its strongest edge rows, its edge count and every
    node row (what the first paint and the node scores read)."""

    edges: pd.DataFrame  # the MAX_EDGES strongest rows of pathdb.query.edges, in its order
    total_edges: int  # how many rows pathdb.query.edges has
    nodes: pd.DataFrame  # every row of pathdb.query.nodes


RUN_FIELDS = (
    "run_id", "name", "status", "stop_reason", "kind", "model_name", "method", "strategy", "metric",
    "patch_type", "prompt_mode", "positional", "n_evaluated", "n_complete", "n_kept", "n_pruned",
    "pruned_mass", "n_nodes", "n_prompts", "wall_s", "eval_s", "write_s", "created_at",
    "finished_at", "error", "cpr", "cmd", "edges_80", "edges_90",
)  # fmt: skip
#: the columns of :func:`pathdb.evaluate.compare.summary` (one row per run of ``pathdb compare``)
SUMMARY_FIELDS = (
    "run", "method", "strategy", "split_kv", "cpr", "cmd", "edges_80", "edges_90", "search_s",
    "eval_s", "eval_prompts", "intervention",
)  # fmt: skip


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: NaN/NA -> None, numpy scalars -> Python, times -> ISO text."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, int | float):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        return jsonable(item())
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def records(df: Any, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a DataFrame as JSON-ready dicts with the ``fields`` it has (in that order)."""
    cols = [f for f in fields if f in df.columns]
    return [
        {c: jsonable(v) for c, v in zip(cols, row, strict=True)}
        for row in df[cols].itertuples(index=False, name=None)
    ]


def run_state(con: duckdb.DuckDBPyConnection, info: RunInfo) -> tuple[Any, ...]:
    """What changes when a search commits a checkpoint: status and the run's path count and last
    batch (a cache key: a cached aggregate is reused only while these are unchanged)."""
    status = con.execute("SELECT status FROM runs WHERE run_id = ?", [info.run_id]).fetchall()
    counts = con.execute(
        "SELECT count(*), max(batch_id) FROM paths WHERE run_id = ?", [info.run_id]
    ).fetchall()
    return (info.run_id, status[0][0] if status else None, *counts[0])


def run_summary(con: duckdb.DuckDBPyConnection, info: RunInfo) -> dict[str, Any]:
    """The run's own ``runs`` row (status, method, counters): no scan of its paths."""
    rel = con.sql(f"SELECT * EXCLUDE (params) FROM runs WHERE run_id = {int(info.run_id)}")
    cols = list(rel.columns)
    row = dict(zip(cols, rel.fetchall()[0], strict=True))
    return {f: jsonable(row[f]) for f in RUN_FIELDS if f in row}


def runs(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Every run with status, method, strategy, counts, timings and latest CPR/CMD (``pathdb runs``)."""
    from pathdb.evaluate.storage import RUNS_WITH_FAITHFULNESS

    rel = con.sql(RUNS_WITH_FAITHFULNESS)
    cols = list(rel.columns)
    out = []
    for row in rel.fetchall():
        rec = dict(zip(cols, row, strict=True))
        out.append({f: jsonable(rec[f]) for f in RUN_FIELDS if f in rec})
    return out


def _labels(con: duckdb.DuckDBPyConnection, run_id: int) -> dict[str, str] | None:
    """Position -> label for the positional view's bands, as ``pathdb show --positional``."""
    from pathdb.query.positions import position_labels

    labels = position_labels(con, run_id)
    return None if labels is None else {str(p): name for p, name in labels.items()}


def circuit_tables(
    con: duckdb.DuckDBPyConnection, run: str | int, *, sign: str = "both", positional: bool = False
) -> Tables:
    """The run's circuit view (:func:`pathdb.query.edges` and :func:`pathdb.query.nodes` with that
    sign and view) from one walk of the path tree: only its ``MAX_EDGES`` strongest edges become
    rows (ranked in DuckDB: a positional view has hundreds of thousands), plus their count."""
    from pathdb.query.aggregate import top_edges_and_nodes

    check_choice("sign", sign, list(SIGNS))
    info = resolve_run(con, run)
    return Tables(
        *top_edges_and_nodes(
            con, info.run_id, limit=MAX_EDGES, positional=positional, sign=_agg_sign(sign)
        )
    )


def edge_view(
    con: duckdb.DuckDBPyConnection,
    run: str | int,
    *,
    sign: str = "both",
    positional: bool = False,
    limit: int = MAX_EDGES,
    tables: Tables | None = None,
) -> dict[str, Any]:
    """The circuit view's first answer: the ``limit`` strongest edges by ``|score|`` (ties by
    name, the order of :func:`pathdb.query.aggregate.select_edges`) of
    :func:`pathdb.query.edges`, how many edges the run has in all, and the nodes these edges
    touch with what the layout needs (their scores come from :func:`node_view`, after the
    first paint, out of the same ``tables`` of :func:`circuit_tables`).

    ``sign`` aggregates only positive / negative paths (``pathdb show --sign``). The page selects
    the top k of these edges and prunes them exactly as ``pathdb query circuit --top-k k``.
    """
    from pathdb.query.aggregate import select_edges

    check_choice("sign", sign, list(SIGNS))
    if not 1 <= limit <= MAX_EDGES:
        raise QueryError(f"limit must be between 1 and {MAX_EDGES}, got {limit}")
    info = resolve_run(con, run)
    if tables is None:
        tables = circuit_tables(con, info.run_id, sign=sign, positional=positional)
    top = select_edges(tables.edges, top_k=limit, threshold=None, by="abs")
    edge_rows = records(top, EDGE_FIELDS)
    layout: dict[str, dict[str, Any]] = {}
    for e in edge_rows:
        for end in ("src", "dst"):
            name = e[end]
            if name not in layout:
                site = _SITE.search(name) if positional else None
                layout[name] = {
                    "node": name, "kind": e[f"{end}_kind"], "layer": e[f"{end}_layer"],
                    "head": e[f"{end}_head"], "position": e.get(f"{end}_position"),
                    "site": site.group(1) if site else None,
                }  # fmt: skip
    return {
        "run": run_summary(con, info),
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "sign": sign,
        "positional": positional,
        "total_edges": tables.total_edges,
        "edges": edge_rows,
        "nodes": list(layout.values()),
        "position_labels": _labels(con, info.run_id) if positional else None,
    }


def node_view(
    con: duckdb.DuckDBPyConnection,
    run: str | int,
    *,
    sign: str = "both",
    positional: bool = False,
    names: Collection[str] = (),
    tables: Tables | None = None,
) -> dict[str, Any]:
    """Scores of the nodes ``names`` (those the circuit view draws): their rows of
    :func:`pathdb.query.nodes` with the same sign and view (from ``tables`` when given)."""
    check_choice("sign", sign, list(SIGNS))
    info = resolve_run(con, run)
    if tables is None:
        tables = circuit_tables(con, info.run_id, sign=sign, positional=positional)
    all_nodes = tables.nodes
    return {"nodes": records(all_nodes[all_nodes["node"].isin(set(names))], NODE_FIELDS)}


def _agg_sign(sign: str) -> str | None:
    """The query layer's ``sign`` argument for the page's sign toggle."""
    return None if sign == "both" else sign


def paths_view(
    con: duckdb.DuckDBPyConnection,
    run: str | int,
    *,
    edge: str | None = None,
    through: str | None = None,
    k: int = 20,
    order: str = "abs",
) -> dict[str, Any]:
    """Top complete paths through an edge or a node: :func:`pathdb.query.top_paths`, the rows
    ``pathdb query paths RUN --edge E`` (or ``--through N``) prints."""
    from pathdb.query.paths import top_paths_relation

    if not 1 <= k <= 1000:
        raise QueryError(f"k must be between 1 and 1000, got {k}")
    info = resolve_run(con, run)
    rel = top_paths_relation(con, info.run_id, k=k, order=order, edge=edge, through=through)
    cols = list(rel.columns)
    rows = [{c: jsonable(v) for c, v in zip(cols, row, strict=True)} for row in rel.fetchall()]
    return {"run": info.name, "edge": edge, "through": through, "order": order, "paths": rows}


def tree_level(
    con: duckdb.DuckDBPyConnection,
    run: str | int,
    parent: int | None = None,
    *,
    limit: int = MAX_CHILDREN,
) -> dict[str, Any]:
    """One level of the stored search tree: every evaluated extension of path ``parent`` (the
    roots when None) with its prepended node, score, method, kept/complete flags and how many
    extensions it has in turn; the ``limit`` strongest by ``|score|`` when there are more."""
    if not 1 <= limit <= MAX_CHILDREN:
        raise QueryError(f"limit must be between 1 and {MAX_CHILDREN}, got {limit}")
    info = resolve_run(con, run)
    rid = info.run_id
    if parent is None:
        cond, params = "parent_id IS NULL", [rid]
    else:
        found = con.execute(
            "SELECT count(*) FROM paths WHERE run_id = ? AND path_id = ?", [rid, parent]
        ).fetchall()
        if not found[0][0]:
            raise QueryError(f"run {info.name!r} has no path {parent}; expand from the root")
        cond, params = "parent_id = ?", [rid, parent]
    total = con.execute(
        f"SELECT count(*) FROM paths WHERE run_id = ? AND {cond}", params
    ).fetchall()[0][0]
    rel = con.sql(
        f"""WITH ch AS (SELECT * FROM paths WHERE run_id = $rid AND {cond.replace("?", "$parent")}
                        ORDER BY abs(contribution) DESC NULLS LAST, path_id LIMIT {int(limit)}),
            grand AS (SELECT parent_id, count(*) AS n FROM paths
                      WHERE run_id = $rid AND parent_id IN (SELECT path_id FROM ch) GROUP BY parent_id)
        SELECT ch.path_id, ch.parent_id, ch.depth, ch.prompt_idx, ch.contribution, ch.method,
               ch.complete, ch.kept, n.label, n.component, coalesce(grand.n, 0) AS n_children
        FROM ch JOIN nodes n ON n.run_id = ch.run_id AND n.node_id = ch.node_id
        LEFT JOIN grand ON grand.parent_id = ch.path_id
        ORDER BY abs(ch.contribution) DESC NULLS LAST, ch.path_id""",
        params={"rid": rid, **({} if parent is None else {"parent": parent})},
    )
    cols = list(rel.columns)
    children = [{c: jsonable(v) for c, v in zip(cols, r, strict=True)} for r in rel.fetchall()]
    return {"run": info.name, "parent": parent, "total": int(total), "children": children}


def cross_prompt_view(
    con: duckdb.DuckDBPyConnection, run: str | int, *, top: int = 30
) -> dict[str, Any]:
    """Heatmap data of a per-prompt run: the ``top`` edges by ``|mean|`` of
    :func:`pathdb.query.cross_prompt_edges` (position-free) with their statistics, and each
    edge's score on each of the first :data:`MAX_PROMPTS` prompts,
    :func:`pathdb.query.edges` with ``prompt=p`` (``pathdb query edges RUN --prompt p``; 0 where
    the edge has no path on that prompt)."""
    from pathdb.query.aggregate import edges
    from pathdb.query.crossprompt import STAT_COLUMNS, cross_prompt_edges

    if not 1 <= top <= 200:
        raise QueryError(f"top must be between 1 and 200, got {top}")
    info = resolve_run(con, run)
    stats = cross_prompt_edges(con, info.run_id, align="none").head(top)
    rid = info.run_id
    prompts = con.execute(
        f"""SELECT prompt_idx, any_value(clean) FROM (
              SELECT prompt_idx, clean FROM prompts WHERE run_id = {rid}
              UNION ALL SELECT DISTINCT prompt_idx, NULL FROM paths
              WHERE run_id = {rid} AND prompt_idx IS NOT NULL) GROUP BY prompt_idx ORDER BY prompt_idx"""
    ).fetchall()
    shown = prompts[:MAX_PROMPTS]
    matrix = [[0.0] * len(shown) for _ in range(len(stats))]
    for col, (p, _) in enumerate(shown):
        try:
            per = edges(con, rid, prompt=int(p)).set_index("edge")["score"]
        except QueryError:  # no complete kept path on this prompt: every cell stays 0
            continue
        for row, edge in enumerate(stats["edge"]):
            matrix[row][col] = float(per.get(edge, 0.0))
    stat_fields = ("edge", *STAT_COLUMNS)
    return {
        "run": info.name,
        "n_prompts": len(prompts),
        "prompts": [{"prompt_idx": int(p), "clean": c} for p, c in shown],
        "edges": records(stats, stat_fields),
        "matrix": matrix,
    }


def faithfulness_view(con: duckdb.DuckDBPyConnection, run: str | int) -> dict[str, Any]:
    """The run's latest stored faithfulness evaluation (``pathdb evaluate``): CPR, CMD, edges for
    80 / 90 % and every curve's points; ``evaluation`` is None when the run has none."""
    from pathdb.evaluate.storage import latest_evaluation

    info = resolve_run(con, run)
    ev = latest_evaluation(con, info.run_id)
    if ev is None:
        return {"run": info.name, "evaluation": None}
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in sorted({p.curve for p in ev.points}):
        curves[name] = [
            {
                "k": p.k, "n_edges": p.n_edges, "fraction": jsonable(p.fraction),
                "metric": jsonable(p.metric), "faithfulness": jsonable(p.faithfulness),
                "source": p.source,
            }
            for p in ev.curve(name)
        ]  # fmt: skip
    settings = (
        "evaluation_id",
        "prompts",
        "heldout",
        "intervention",
        "metric",
        "score",
        "n_edges_total",
    )
    summary: dict[str, Any] = {f: getattr(ev, f) for f in settings}
    summary.update(
        cpr=jsonable(ev.cpr), cmd=jsonable(ev.cmd), edges_80=ev.edges_80, edges_90=ev.edges_90
    )
    return {"run": info.name, "evaluation": {**summary, "curves": curves}}


def compare_view(
    con: duckdb.DuckDBPyConnection, a: str | int, b: str | int, *, top_k: int = 50
) -> dict[str, Any]:
    """Two runs side by side, the numbers ``pathdb compare A B --top-k K`` prints: each run's
    :func:`pathdb.evaluate.compare.summary` row (CPR, CMD, edges for 80 / 90 %, timings; None
    when the run has no stored evaluation) and curves, and the pair's
    :func:`pathdb.evaluate.compare.agreement` (top-k Jaccard, Spearman rank correlation)."""
    from pathdb.evaluate.compare import agreement, summary
    from pathdb.evaluate.storage import latest_evaluation

    if not 1 <= top_k <= 10_000:
        raise QueryError(f"k must be between 1 and 10000, got {top_k}")
    infos = [resolve_run(con, r) for r in (a, b)]
    if infos[0].run_id == infos[1].run_id:
        raise QueryError(f"both sides are run {infos[0].name!r}; pick two different runs")
    shapes = {(i.n_layers, i.n_heads) for i in infos}
    if len(shapes) > 1:
        raise QueryError(
            f"runs {infos[0].name!r} and {infos[1].name!r} are of differently shaped models "
            "(layers x heads); compare runs of the same model"
        )
    pair = agreement(con, [i.run_id for i in infos], top_k=top_k).iloc[0]
    evaluations = [latest_evaluation(con, i.run_id) for i in infos]
    stored = [ev for ev in evaluations if ev is not None]
    rows = {r["run"]: r for r in records(summary(con, stored), SUMMARY_FIELDS)} if stored else {}
    settings = {(ev.prompts, ev.intervention, ev.metric, ev.score) for ev in stored}
    return {
        "runs": [
            {
                "run": run_summary(con, info),
                "summary": rows.get(info.name),
                "evaluation": faithfulness_view(con, info.run_id)["evaluation"] if ev else None,
            }
            for info, ev in zip(infos, evaluations, strict=True)
        ],
        "top_k": top_k,
        "jaccard": jsonable(pair[f"jaccard_top{top_k}"]),
        "spearman": jsonable(pair["spearman"]),
        "warning": (
            "the runs' latest evaluations used different prompts, interventions, metrics or "
            "scores; re-run `pathdb evaluate` with the same options to compare like with like"
            if len(settings) > 1
            else None
        ),
    }
