"""Writing edge-score runs (``pathdb attribute``): the run row (``kind = 'edges'``), its prompts
and one ``edge_scores`` row per edge of EAP-IG's position-free graph (plus ``node_scores`` where
the method scores nodes), all through Arrow in ONE transaction: a failure leaves nothing behind.

A ``replace`` of an existing run of the same name deletes it in the same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from pathdb.export.eap import eap_spec
from pathdb.store.db import Store, fetch_one
from pathdb.store.errors import StoreError
from pathdb.store.writer import (
    _PROMPT_SCHEMA,
    PROMPT_COLUMNS,
    RUN_META_OPTIONAL,
    RUN_META_REQUIRED,
    _delete_run_rows,
    _sigint_deferred,
)

EDGE_COLUMNS = ("edge_id", "edge", "src", "dst", "site", "score", "in_graph")
_EDGE_SCHEMA = pa.schema(
    [
        ("edge_id", pa.int32()),
        ("edge", pa.string()),
        ("src", pa.string()),
        ("dst", pa.string()),
        ("site", pa.string()),
        ("score", pa.float64()),
        ("in_graph", pa.bool_()),
    ]
)


def edge_table(
    n_layers: int,
    n_heads: int,
    scores: np.ndarray,
    in_graph: np.ndarray | None = None,
    parallel: bool = False,
) -> pa.Table:
    """The ``edge_scores`` rows of a ``[n_forward, n_backward]`` score matrix: every real edge
    (``parallel`` blocks have no same-layer head -> MLP edges)."""
    spec = eap_spec(n_layers, n_heads, parallel)
    names = [name for name, _, _ in spec.edges]
    f = np.array([fi for _, fi, _ in spec.edges], dtype=np.int64)
    b = np.array([bi for _, _, bi in spec.edges], dtype=np.int64)
    src, rest = zip(*(n.split("->") for n in names), strict=True)
    dst = [r.split("<")[0] for r in rest]
    site = [r[r.index("<") + 1 : -1] if "<" in r else None for r in rest]
    kept = None if in_graph is None else pa.array(np.asarray(in_graph, dtype=bool)[f, b])
    return pa.table(
        {
            "edge_id": pa.array(np.arange(len(names), dtype=np.int32)),
            "edge": names,
            "src": list(src),
            "dst": dst,
            "site": site,
            "score": pa.array(np.asarray(scores, dtype=np.float64)[f, b]),
            "in_graph": kept if kept is not None else pa.nulls(len(names), pa.bool_()),
        },
        schema=_EDGE_SCHEMA,
    )


def _insert(cur: Any, table: str, data: pa.Table, run_id: int) -> None:
    view = f"_pathdb_{table}_buf"
    cols = ", ".join(data.column_names)
    cur.register(view, data)
    try:
        cur.execute(f"INSERT INTO {table} (run_id, {cols}) SELECT {run_id}, {cols} FROM {view}")
    finally:
        cur.unregister(view)


def write_edge_run(
    store: Store,
    *,
    name: str | None,
    meta: Mapping[str, Any],
    prompts: Sequence[Mapping[str, Any]],
    edges: pa.Table,
    node_scores: Mapping[str, float] | None = None,
    wall_s: float | None = None,
    eval_s: float | None = None,
    replace: bool = False,
) -> tuple[int, str]:
    """Store one completed edge run; returns ``(run_id, name)``. ``meta`` has the ``runs``
    columns of path runs (:data:`RUN_META_REQUIRED`); a taken ``name`` is refused unless ``replace``."""
    missing = [k for k in RUN_META_REQUIRED if k not in meta]
    unknown = sorted(set(meta) - set(RUN_META_REQUIRED) - set(RUN_META_OPTIONAL))
    if missing or unknown:
        raise StoreError(f"edge run metadata: missing {missing}, unknown {unknown}")
    t0 = time.perf_counter()
    prompt_table = pa.Table.from_pylist([dict(r) for r in prompts], schema=_PROMPT_SCHEMA)
    nodes = node_scores or {}
    node_table = pa.table(
        {"component": pa.array(list(nodes), pa.string()),
         "score": pa.array([float(v) for v in nodes.values()], pa.float64())}
    )  # fmt: skip
    values = {k: meta.get(k) for k in RUN_META_REQUIRED + RUN_META_OPTIONAL}
    values["params"] = json.dumps(values["params"], sort_keys=True, default=str)
    with store.attached() as con, _sigint_deferred():
        cur = con.cursor()
        try:
            cur.begin()
            if name is not None:
                old = fetch_one(cur.execute("SELECT run_id FROM runs WHERE name = ?", [name]))
                if old is not None and not replace:
                    raise StoreError(
                        f"a run named {name!r} already exists in {store.path} (run_id {old[0]}); "
                        "choose another --run-name or pass --replace"
                    )
                if old is not None:
                    _delete_run_rows(cur, int(old[0]))
            (run_id,) = fetch_one(cur.execute("SELECT nextval('runs_run_id_seq')")) or (0,)
            run_name = name if name is not None else f"run-{run_id}"
            now = datetime.now(UTC).replace(tzinfo=None)
            row = {"run_id": run_id, "name": run_name, "status": "completed", "created_at": now,
                   "finished_at": now, "stop_reason": "completed", "kind": "edges",
                   "wall_s": wall_s, "eval_s": eval_s, "n_evaluated": edges.num_rows,
                   "n_complete": edges.num_rows, "n_kept": edges.num_rows, **values}  # fmt: skip
            quoted = ", ".join(f'"{c}"' for c in row)
            cur.execute(
                f"INSERT INTO runs ({quoted}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            _insert(cur, "prompts", prompt_table.select(list(PROMPT_COLUMNS)), int(run_id))
            _insert(cur, "edge_scores", edges, int(run_id))
            if node_table.num_rows:
                _insert(cur, "node_scores", node_table, int(run_id))
            cur.execute(
                "UPDATE runs SET write_s = ? WHERE run_id = ?", [time.perf_counter() - t0, run_id]
            )
            cur.commit()
        except BaseException:
            with suppress(duckdb.Error):
                cur.rollback()
            raise
        finally:
            cur.close()
    return int(run_id), run_name
