"""Edge and node tables of edge-score runs (``pathdb attribute``), in the layout of the path
aggregation (:func:`pathdb.query.aggregate.edges` / ``nodes`` dispatch here), so every query,
export, drawing and evaluation reads both kinds of run the same way.

Edge runs are position-free and scored on the prompt set as a whole: ``positional`` and
``prompt`` are refused. Pooled edge runs sum their scores; ``abs_score`` / ``pos_score`` /
``neg_score`` are the sums of ``|score|`` / the positive / the negative scores, ``n_paths`` is 0.
``sign='positive'`` (``'negative'``) keeps only the edges (nodes) of that sign. Node scores are the
method's own where it stores them (atp*: outputs, and ``<q>``/``<k>``/``<v>`` inputs of heads);
otherwise a node's score is the sum of its outgoing edges' scores (the logits: incoming), which is
the first-order effect of patching the node's output.
"""

from __future__ import annotations

import re

import duckdb
import pandas as pd

from pathdb.query.common import (
    QueryError,
    RunInfo,
    RunSpec,
    check_choice,
    resolve_runs,
    run_list,
    tidy_scores,
)

_COMPONENT = re.compile(r"^(?:a(\d+)\.h(\d+)(?:<[qkv]>)?|m(\d+)|input|logits)$")


def edge_runs(con: duckdb.DuckDBPyConnection, run: RunSpec) -> list[RunInfo] | None:
    """The runs when they are all edge runs, None when they are all path runs (mixing is refused)."""
    infos = resolve_runs(con, run)
    kinds = dict(
        con.execute(f"SELECT run_id, kind FROM runs WHERE run_id IN ({run_list(infos)})").fetchall()
    )
    if set(kinds.values()) == {"paths"}:
        return None
    if set(kinds.values()) != {"edges"}:
        raise QueryError(
            "cannot pool path runs with edge runs ("
            + ", ".join(f"{i.name!r}: {kinds[i.run_id]}" for i in infos)
            + "); query them separately, or compare them with `pathdb compare`"
        )
    return infos


def _check(infos: list[RunInfo], positional: bool, prompt: int | None, sign: str | None) -> None:
    check_choice("sign", sign, [None, "positive", "negative"])
    names = ", ".join(repr(i.name) for i in infos)
    if positional:
        raise QueryError(f"edge run {names} is position-free; drop --positional")
    if prompt is not None:
        raise QueryError(f"edge run {names} scores the prompt set as a whole; drop --prompt")


def _sign_filter(sign: str | None) -> str:
    return {None: "", "positive": " AND score > 0", "negative": " AND score < 0"}[sign]


def _component_columns(df: pd.DataFrame, col: str, prefix: str, n_layers: int) -> None:
    """Add ``{prefix}kind``, ``{prefix}layer``, ``{prefix}head`` parsed from component names."""
    parsed: list[tuple[str, int, int | None]] = []
    for name in df[col]:
        m = _COMPONENT.match(str(name))
        if m is None:
            raise QueryError(f"unexpected component name {name!r} in an edge run")
        if m.group(1) is not None:
            parsed.append(("attn", int(m.group(1)), int(m.group(2))))
        elif m.group(3) is not None:
            parsed.append(("mlp", int(m.group(3)), None))
        else:
            parsed.append(("embed", -1, None) if name == "input" else ("final", n_layers, None))
    kinds = [p[0] for p in parsed]
    layers = [p[1] for p in parsed]
    heads = [p[2] for p in parsed]
    df[f"{prefix}kind"] = kinds
    df[f"{prefix}layer"] = pd.array(layers, dtype="Int16")
    df[f"{prefix}head"] = pd.array(heads, dtype="Int16")


_SUMS = (
    "sum(score) AS score, sum(abs(score)) AS abs_score, sum(greatest(score, 0)) AS pos_score, "
    "sum(least(score, 0)) AS neg_score, 0 AS n_paths"
)
_EDGE_SUMS = _SUMS + ", 0 AS kv_paths"


def edges(
    con: duckdb.DuckDBPyConnection,
    infos: list[RunInfo],
    *,
    positional: bool = False,
    prompt: int | None = None,
    sign: str | None = None,
) -> pd.DataFrame:
    """The edge table of edge runs (columns of :func:`pathdb.query.aggregate.edges`)."""
    _check(infos, positional, prompt, sign)
    df = con.sql(
        f"""SELECT edge, any_value(src) AS src, any_value(dst) AS dst, any_value(site) AS dst_site,
       {_EDGE_SUMS}
FROM edge_scores WHERE run_id IN ({run_list(infos)}){_sign_filter(sign)}
GROUP BY edge ORDER BY abs(sum(score)) DESC, edge"""
    ).df()
    df["dst_site"] = df["dst_site"].astype(object).where(df["dst_site"].notna(), None)
    n_layers = infos[0].n_layers
    _component_columns(df, "src", "src_", n_layers)
    _component_columns(df, "dst", "dst_", n_layers)
    cols = ["edge", "src", "dst", "dst_site", "score", "abs_score", "pos_score", "neg_score",
            "n_paths", "kv_paths", "src_kind", "src_layer", "src_head", "dst_kind", "dst_layer", "dst_head"]  # fmt: skip
    return tidy_scores(df[cols])


def nodes(
    con: duckdb.DuckDBPyConnection,
    infos: list[RunInfo],
    *,
    positional: bool = False,
    prompt: int | None = None,
    sign: str | None = None,
) -> pd.DataFrame:
    """The node table of edge runs (columns of :func:`pathdb.query.aggregate.nodes`)."""
    _check(infos, positional, prompt, sign)
    ids = run_list(infos)
    own = con.execute(f"SELECT count(*) FROM node_scores WHERE run_id IN ({ids})").fetchall()[0][0]
    if own:
        source = f"SELECT component AS node, score FROM node_scores WHERE run_id IN ({ids})"
    else:
        source = f"""SELECT src AS node, score FROM edge_scores WHERE run_id IN ({ids})
UNION ALL SELECT dst AS node, score FROM edge_scores WHERE run_id IN ({ids}) AND dst = 'logits'"""
    df = con.sql(
        f"""SELECT node, {_SUMS} FROM ({source}) WHERE true{_sign_filter(sign)}
GROUP BY node ORDER BY abs(sum(score)) DESC, node"""
    ).df()
    _component_columns(df, "node", "", infos[0].n_layers)
    return tidy_scores(
        df[
            [
                "node",
                "kind",
                "layer",
                "head",
                "score",
                "abs_score",
                "pos_score",
                "neg_score",
                "n_paths",
            ]
        ]
    )
