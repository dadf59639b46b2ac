"""Positive and negative sub-circuits: circuits of the paths with contribution > 0 and < 0."""

from __future__ import annotations

import duckdb
import pandas as pd

from pathdb.query.aggregate import Circuit, circuit
from pathdb.query.common import RunSpec


def positive_negative(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    positional: bool = False,
    prompt: int | None = None,
    prune: bool = True,
) -> tuple[Circuit, Circuit]:
    """The circuit of the positive paths alone and of the negative paths alone (each ranked by |score|).

    ``prune=False`` keeps the selected edges even when they are not on an input -> logits chain of
    selected edges (useful to list the strongest edges of each sign)."""
    kw = {
        "top_k": top_k,
        "threshold": threshold,
        "positional": positional,
        "prompt": prompt,
        "by": "abs",
        "prune": prune,
    }
    return (
        circuit(con, run, sign="positive", **kw),  # type: ignore[arg-type]
        circuit(con, run, sign="negative", **kw),  # type: ignore[arg-type]
    )


def signed_circuits(
    con: duckdb.DuckDBPyConnection,
    run: RunSpec,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    positional: bool = False,
    prompt: int | None = None,
    prune: bool = True,
) -> pd.DataFrame:
    """Side by side: one row per edge of either sub-circuit with its positive-path and negative-path
    scores and membership flags (an edge can belong to both)."""
    pos, neg = positive_negative(
        con,
        run,
        top_k=top_k,
        threshold=threshold,
        positional=positional,
        prompt=prompt,
        prune=prune,
    )
    cols = ["edge", "src", "dst", "dst_site", "score", "n_paths"]
    p = pos.edges[cols].rename(columns={"score": "positive_score", "n_paths": "positive_n_paths"})
    n = neg.edges[cols].rename(columns={"score": "negative_score", "n_paths": "negative_n_paths"})
    p["in_positive"] = True
    n["in_negative"] = True
    out = p.merge(n, on=["edge", "src", "dst", "dst_site"], how="outer")
    out["in_positive"] = out["in_positive"].astype("boolean").fillna(False).astype(bool)
    out["in_negative"] = out["in_negative"].astype("boolean").fillna(False).astype(bool)
    for c in ("positive_score", "negative_score"):
        out[c] = out[c].fillna(0.0)
    for c in ("positive_n_paths", "negative_n_paths"):
        out[c] = out[c].fillna(0).astype("int64")
    order = out["positive_score"].abs() + out["negative_score"].abs()
    out = (
        out.assign(_o=order).sort_values(["_o", "edge"], ascending=[False, True]).drop(columns="_o")
    )
    return out[
        [
            "edge",
            "src",
            "dst",
            "dst_site",
            "positive_score",
            "negative_score",
            "positive_n_paths",
            "negative_n_paths",
            "in_positive",
            "in_negative",
        ]
    ].reset_index(drop=True)
