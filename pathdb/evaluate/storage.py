"""Evaluations in the store: write one (``evaluations`` + ``evaluation_points``), read them back,
and the runs listing with each run's latest CPR / CMD.

Example SQL (``pathdb sql``)::

    SELECT r.name, e.cpr, e.cmd, e.edges_80, e.edges_90 FROM evaluations e JOIN runs r USING (run_id);
    SELECT k, n_edges, faithfulness FROM evaluation_points WHERE evaluation_id = 1 AND curve = 'abs';
"""

from __future__ import annotations

import datetime as dt
from importlib.metadata import version

import duckdb

from pathdb.evaluate.results import CurvePoint, Evaluation
from pathdb.query.common import QueryError, resolve_run

_EVAL_COLUMNS = (
    "evaluation_id, run_id, prompts, heldout, n_prompts, intervention, metric, score, n_edges_total, "
    "m_full, m_empty, cpr, cmd, edges_80, edges_90, wall_s"
)

#: the runs listing (``v_runs``) plus the run's latest evaluation summary
RUNS_WITH_FAITHFULNESS = """
SELECT v.*, e.cpr, e.cmd, e.edges_80, e.edges_90
FROM v_runs v LEFT JOIN (
    SELECT * FROM evaluations QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY evaluation_id DESC) = 1
) e USING (run_id)
ORDER BY run_id
"""


def save_evaluation(con: duckdb.DuckDBPyConnection, ev: Evaluation) -> int:
    """Insert ``ev`` with all its points in one transaction; returns (and sets) its evaluation id."""
    import pyarrow as pa  # lazy: `pathdb runs` imports this module for its listing only

    con.execute("BEGIN TRANSACTION")
    try:
        eid = int(
            con.execute("SELECT coalesce(max(evaluation_id), 0) + 1 FROM evaluations").fetchall()[
                0
            ][0]
        )
        con.execute(
            f"INSERT INTO evaluations ({_EVAL_COLUMNS}, created_at, package_version) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [eid, ev.run_id, ev.prompts, ev.heldout, ev.n_prompts, ev.intervention, ev.metric, ev.score,
             ev.n_edges_total, ev.m_full, ev.m_empty, ev.cpr, ev.cmd, ev.edges_80, ev.edges_90, ev.wall_s,
             dt.datetime.now(dt.UTC).replace(tzinfo=None), version("pathdb")],
        )  # fmt: skip
        pts = ev.points
        table = pa.table({
            "evaluation_id": pa.array([eid] * len(pts), pa.int32()),
            "point": pa.array(range(len(pts)), pa.int32()),
            "curve": [p.curve for p in pts], "k": pa.array([p.k for p in pts], pa.int32()),
            "fraction": pa.array([p.fraction for p in pts], pa.float64()),
            "n_edges": pa.array([p.n_edges for p in pts], pa.int32()),
            "metric": [p.metric for p in pts], "faithfulness": [p.faithfulness for p in pts],
            "source": [p.source for p in pts],
        })  # fmt: skip
        con.register("_pathdb_eval_points", table)
        try:
            con.execute("INSERT INTO evaluation_points SELECT * FROM _pathdb_eval_points")
        finally:
            con.unregister("_pathdb_eval_points")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    ev.evaluation_id = eid
    return eid


def _points(con: duckdb.DuckDBPyConnection, eid: int) -> list[CurvePoint]:
    rows = con.execute(
        "SELECT curve, k, fraction, n_edges, metric, faithfulness, source FROM evaluation_points "
        "WHERE evaluation_id = ? ORDER BY point",
        [eid],
    ).fetchall()
    return [CurvePoint(str(c), int(k), None if f is None else float(f), int(n), float(m), float(fa), str(s))
            for c, k, f, n, m, fa, s in rows]  # fmt: skip


def latest_evaluation(con: duckdb.DuckDBPyConnection, run: int | str) -> Evaluation | None:
    """The most recent stored evaluation of ``run`` (None when it has none)."""
    info = resolve_run(con, run)
    rows = con.execute(
        f"SELECT {_EVAL_COLUMNS} FROM evaluations WHERE run_id = ? ORDER BY evaluation_id DESC LIMIT 1",
        [info.run_id],
    ).fetchall()
    if not rows:
        return None
    (eid, rid, prompts, heldout, n_prompts, iv, metric, score, n_total,
     m_full, m_empty, cpr, cmd, e80, e90, wall) = rows[0]  # fmt: skip
    return Evaluation(
        run_id=int(rid), run_name=info.name, prompts=prompts, heldout=bool(heldout), intervention=iv,
        metric=metric, score=score, n_prompts=int(n_prompts), n_edges_total=int(n_total),
        m_full=float(m_full), m_empty=float(m_empty), points=_points(con, int(eid)),
        cpr=float("nan") if cpr is None else float(cpr), cmd=float("nan") if cmd is None else float(cmd),
        edges_80=e80, edges_90=e90, wall_s=float(wall or 0.0), evaluation_id=int(eid),
    )  # fmt: skip


def require_evaluation(con: duckdb.DuckDBPyConnection, run: int | str, db: object) -> Evaluation:
    """:func:`latest_evaluation`, or a one-line error saying how to make one."""
    ev = latest_evaluation(con, run)
    if ev is None:
        raise QueryError(
            f"run {run!r} has no stored evaluation; run `pathdb evaluate {run} --db {db}` first"
        )
    return ev
