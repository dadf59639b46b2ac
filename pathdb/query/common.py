"""Shared helpers of the query layer: the error type, run resolution and small SQL builders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:  # pandas is heavy: the light read commands import this module
    import pandas as pd

RunRef = int | str
RunSpec = RunRef | Sequence[RunRef]


class QueryError(ValueError):
    """A query that cannot be answered (unknown run, empty run, bad SQL, bad argument)."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """The model-shape facts of one stored run that queries and exports need."""

    run_id: int
    name: str
    model_name: str
    n_layers: int
    n_heads: int
    d_model: int
    prompt_mode: str


def first_row(rows: list[Any]) -> Any:
    """The first row of a fetched result, or None (``fetchone`` leaves results open in duckdb 2)."""
    return rows[0] if rows else None


def _existing_runs(con: duckdb.DuckDBPyConnection, limit: int = 5) -> str:
    rows = con.execute(
        f"SELECT run_id, name FROM runs ORDER BY run_id DESC LIMIT {int(limit)}"
    ).fetchall()
    if not rows:
        return "the store has no runs yet (run `pathdb search` first)"
    return "existing runs: " + ", ".join(f"{rid} ({name!r})" for rid, name in rows)


def resolve_run(con: duckdb.DuckDBPyConnection, run: RunRef) -> RunInfo:
    """Turn a run id or run name into its :class:`RunInfo`; unknown runs raise :class:`QueryError`."""
    cols = "run_id, name, model_name, n_layers, n_heads, d_model, prompt_mode"
    if isinstance(run, bool) or not isinstance(run, int | str):
        raise QueryError(f"a run is an integer id or a name, not {run!r}")
    if isinstance(run, int):
        row = first_row(con.execute(f"SELECT {cols} FROM runs WHERE run_id = ?", [run]).fetchall())
    else:
        row = first_row(con.execute(f"SELECT {cols} FROM runs WHERE name = ?", [run]).fetchall())
        if row is None and run.strip().isdigit():
            row = first_row(
                con.execute(f"SELECT {cols} FROM runs WHERE run_id = ?", [int(run)]).fetchall()
            )
    if row is None:
        raise QueryError(f"unknown run {run!r}; {_existing_runs(con)}")
    return RunInfo(
        int(row[0]), str(row[1]), str(row[2]), int(row[3]), int(row[4]), int(row[5]), str(row[6])
    )


def resolve_runs(con: duckdb.DuckDBPyConnection, run: RunSpec) -> list[RunInfo]:
    """Resolve one run or a list of runs (for pooling); all must share the model's graph shape."""
    refs: list[RunRef] = [run] if isinstance(run, int | str) else list(run)
    if not refs:
        raise QueryError("no run given: pass a run id or name (or a non-empty list of them)")
    infos = [resolve_run(con, r) for r in refs]
    shapes = {(i.n_layers, i.n_heads) for i in infos}
    if len(shapes) > 1:
        raise QueryError(
            "cannot pool runs of different model shapes: "
            + ", ".join(f"{i.run_id} (L={i.n_layers}, H={i.n_heads})" for i in infos)
        )
    return infos


def require_paths(
    con: duckdb.DuckDBPyConnection, infos: Sequence[RunInfo], *, complete_kept: bool
) -> None:
    """Raise a clear :class:`QueryError` when the runs hold no (complete kept) scored paths."""
    ids = run_list(infos)
    cond = " AND complete AND kept" if complete_kept else ""
    row = first_row(
        con.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM paths WHERE run_id IN ({ids}) "
            f"AND contribution IS NOT NULL{cond} LIMIT 1)"
        ).fetchall()
    )
    if row is None or row[0] == 0:
        names = ", ".join(f"{i.run_id} ({i.name!r})" for i in infos)
        kinds = con.execute(f"SELECT DISTINCT kind FROM runs WHERE run_id IN ({ids})").fetchall()
        if ("edges",) in kinds:
            raise QueryError(
                f"run {names} is an edge run (pathdb attribute): it scores edges, not paths; "
                "use `pathdb query edges|nodes|circuit|signed`"
            )
        what = "complete kept paths" if complete_kept else "scored paths"
        raise QueryError(
            f"run {names} has no {what}; the search may have been interrupted or found nothing "
            "(try a lower threshold, or query with complete/kept filters off)"
        )


def run_list(infos: Sequence[RunInfo]) -> str:
    """SQL list of run ids (integers only, safe to inline)."""
    return ", ".join(str(int(i.run_id)) for i in infos)


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise :class:`QueryError` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise QueryError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def tidy_scores(df: pd.DataFrame) -> pd.DataFrame:
    """An edge / node score table with integer counts and float scores, indexed 0..n-1 (a copy)."""
    df = df.copy()
    for col in ("n_paths", "kv_paths"):
        if col in df:
            df[col] = df[col].astype("int64")
    for col in ("score", "abs_score", "pos_score", "neg_score"):
        df[col] = df[col].astype("float64")
    return df.reset_index(drop=True)
