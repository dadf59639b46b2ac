"""Server-side answer times of `pathdb serve` on a large store (issue 17: < 1 s on 10M paths).

Builds a search-tree-shaped store through the store's own writer (``RunWriter``, Arrow bulk
inserts), with the GPT-2-small-like positional node dictionary and tree shape of
``bench_query.py`` (per-prompt run, 4 prompts, ~5 % complete paths, most partials pruned), then
times the explorer's JSON answers in process (Starlette test client: routing, a read-only open
of the store per request, the query layer, JSON encoding):

* first paint of the circuit view: ``/api/runs/RUN/edges`` (the data it draws), cold in a
  fresh process (its first request: lazy imports, first open of the store), cold in a new
  server (empty cache), the same without the store's circuit aggregate (``_walk``: what a run
  without one, and every run before revision 0007, costs), of the positional view (its top 500
  edges ranked in DuckDB, not its ~200k edges as DataFrame rows), and warm
  (cached until the run changes, and what ``pathdb serve`` computes for every run at
  start-up); then ``/nodes`` (node scores for hover, fetched after the paint, out of the
  same tables as the edges);
* the query layer's edges and nodes of the run: ``edges()`` + ``nodes()`` (two level-by-level
  walks of the path tree in DuckDB, the reference), one such walk shared by both,
  ``edges_and_nodes()`` summing one read of the run's kept rows in NumPy (the walk a run
  without an aggregate gets) and ``edges_and_nodes()`` from the aggregate (what the server
  uses); writing the aggregate (what completing the run, or migration 0007, adds);
* one tree-level expansion: the roots, then the children of a root (thousands) and of a
  depth-2 path;
* extras: top paths through the strongest edge (a click), the cross-prompt heatmap.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--rows 10000000] [--keep-db] [--db FILE]``
-> ``benchmarks/results/serve.json`` (one entry per store size; ``--db``: time a store an
earlier ``--keep-db`` run left; one of an older revision is upgraded first, its completed run
given the aggregate by migration 0007, timed as ``upgrade_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from bench_query import H, L, T, node_dictionary
from starlette.testclient import TestClient

import pathdb.query.aggregate as aggregate
from pathdb.query.aggregate import (
    _edge_frame,
    _node_frame,
    _selection,
    edges,
    edges_and_nodes,
    nodes,
)
from pathdb.query.tree import ancestry, edge_pairs, node_weights, stored_sums
from pathdb.serve.app import create_app
from pathdb.store.circuit import write_circuit_sums
from pathdb.store.db import current_revision, head_revision, open_store
from pathdb.store.writer import RunWriter

META = {
    "model_name": "gpt2-like", "model_fingerprint": "0" * 64, "n_layers": L, "n_heads": H,
    "d_model": 768, "method": "hybrid", "strategy": "threshold", "metric": "logit_diff",
    "patch_type": "counterfactual", "prompt_mode": "per-prompt", "positional": True,
    "root_position": T - 1, "params": {"min_contribution": 0.01}, "baseline": 3.2,
    "package_version": "bench",
}  # fmt: skip
SHARES = np.array([0.002, 0.10, 0.18, 0.2, 0.2, 0.16, 0.1, 0.058])  # rows per depth, as bench_query


def build(path: Path, rows: int, n_prompts: int, seed: int = 0) -> dict[str, int]:
    """Write one per-prompt run of about ``rows`` evaluated paths through ``RunWriter``."""
    rng = np.random.default_rng(seed)
    stats = {"rows": 0, "complete_kept": 0}
    with open_store(path) as store:
        w = RunWriter.create(store, name="bench", meta=META)
        nodes = node_dictionary()
        ids = np.array([w.node_id(n) for n in nodes])
        kinds = np.array([str(n.kind) for n in nodes])
        embed_ids, inner_ids = ids[kinds == "embed"], ids[(kinds == "attn") | (kinds == "mlp")]
        w.add_prompts([
            {"prompt_idx": p, "clean": f"prompt {p}", "target": "t", "target_id": 0,
             "tokens": list(range(T)), "token_strs": ["t"] * T}
            for p in range(n_prompts)
        ])  # fmt: skip
        per_prompt = rows // n_prompts
        for prompt in range(n_prompts):
            frontier = w.add_paths([-1], [ids[0]], [0], prompt, [np.nan], "root", [False], [True])
            stats["rows"] += 1
            for d, share in enumerate(SHARES, start=1):
                n = max(int(per_prompt * share), len(frontier))
                parent = frontier[rng.integers(0, len(frontier), n)]
                complete = rng.random(n) < 0.05
                node = np.where(complete, rng.choice(embed_ids, n), rng.choice(inner_ids, n))
                contrib = rng.standard_normal(n) * np.exp(-0.3 * d)
                kept = np.where(complete, rng.random(n) < 0.4, rng.random(n) < 2500 / n)
                method = np.where(complete, "exact", "attribution")
                new = w.add_paths(parent, node, d, prompt, contrib, method, complete, kept)
                frontier = new[kept & ~complete]
                stats["rows"] += n
                stats["complete_kept"] += int((kept & complete).sum())
                if len(frontier) == 0:
                    break
            w.flush()
        w.finish("completed")
    return stats


CPU: dict[str, float] = {}  # CPU seconds (all threads of this process) of the best call, by label


def timed(fn: Callable[[], Any], repeat: int = 3, label: str | None = None) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls, and the last result; with a ``label``, also record
    that call's CPU seconds (on a loaded machine the wall time mostly measures the queue)."""
    best, res = float("inf"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        res = fn()
        wall = time.perf_counter() - t
        if wall < best:
            best = wall
            if label:
                CPU[label] = round(time.process_time() - c, 3)
    return best, res


FRESH = """
import json, sys, time
from starlette.testclient import TestClient
from pathdb.serve.app import create_app
with TestClient(create_app(sys.argv[1])) as c:
    t, cpu = time.perf_counter(), time.process_time()
    c.get("/api/runs/bench/edges?sign=both").raise_for_status()
    print(json.dumps([time.perf_counter() - t, time.process_time() - cpu]))
"""


def fresh_process_paint(db: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the first ``/edges`` answer of a fresh Python process (the app
    module imported, nothing else: the request pays the lazy imports and the store's first open)."""
    out = subprocess.run(
        [sys.executable, "-c", FRESH, str(db)], capture_output=True, text=True, check=True
    )
    wall, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return wall, cpu


def stored_stats(db: Path) -> dict[str, int]:
    """What :func:`build` reports, read back from a store it wrote (``--db``)."""
    with open_store(db, read_only=True) as store:
        rows, ck = store.con.execute(
            "SELECT count(*), count(*) FILTER (WHERE complete AND kept) FROM paths"
        ).fetchall()[0]
    return {"rows": int(rows), "complete_kept": int(ck)}


@contextmanager
def without_aggregate() -> Iterator[None]:
    """Inside the block the query layer finds no stored circuit aggregate (the walk of a run
    without one), in this process only: the store is not touched."""
    kept = aggregate.stored_sums
    aggregate.stored_sums = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        aggregate.stored_sums = kept


def upgraded(db: Path) -> float | None:
    """Upgrade a store of an older revision (0007 writes the aggregate); seconds, or None."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        if current_revision(con) == head_revision():
            return None
    finally:
        con.close()
    t = time.perf_counter()
    open_store(db).close()
    return time.perf_counter() - t


def aggregate_write_s(db: Path) -> float:
    """Seconds to write the run's aggregate once more (in a transaction rolled back)."""
    with open_store(db) as store:
        con = store.con
        con.begin()
        try:
            t = time.perf_counter()
            write_circuit_sums(con, 1)
            return time.perf_counter() - t
        finally:
            con.rollback()


def level_walk_once(con: Any, run: str) -> Any:
    """What ``edges_and_nodes()`` computed before the NumPy walk: one level-by-level
    :func:`ancestry` in DuckDB shared by the edge and node tables (timed side by side)."""
    sel = _selection(con, run, complete_only=True, kept_only=True, prompt=None, sign=None)
    anc = ancestry(con, sel)
    return (
        _edge_frame(con, edge_pairs(con, anc, by_prompt=False), False),
        _node_frame(con, node_weights(con, anc, by_prompt=False), False),
    )


def get(client: TestClient, url: str) -> Any:
    """GET ``url``; the JSON answer (raises on an error answer)."""
    res = client.get(url)
    res.raise_for_status()
    return res.json()


def main() -> None:
    """Build the store, time the explorer's answers, print and write the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--db", type=Path, help="time this store (left by --keep-db) instead")
    args = ap.parse_args()
    t0 = time.perf_counter()
    upgrade_s = None
    if args.db is not None:
        upgrade_s = upgraded(args.db)
        db, stats = args.db, stored_stats(args.db)
    else:
        db = Path(tempfile.mkdtemp()) / "serve.duckdb"
        stats = build(db, args.rows, args.prompts)
    res: dict[str, Any] = {
        **stats,
        "prompts": args.prompts,
        "build_s": None if args.db else round(time.perf_counter() - t0, 1),
        "upgrade_s": None if upgrade_s is None else round(upgrade_s, 1),
        "aggregate_write_s": round(aggregate_write_s(db), 3),
    }
    walls, cpus = zip(*(fresh_process_paint(db) for _ in range(3)), strict=True)
    res["circuit_first_paint_fresh_process_s"] = round(min(walls), 3)
    res["circuit_first_paint_fresh_process_cpu_s"] = round(cpus[walls.index(min(walls))], 3)
    with open_store(db, read_only=True) as store:
        con = store.con
        t, _ = timed(lambda: (edges(con, "bench"), nodes(con, "bench")), 2, "query_two_walks_cpu_s")
        res["query_edges_plus_nodes_s"] = round(t, 3)
        t, _ = timed(lambda: level_walk_once(con, "bench"), 2, "query_level_walk_once_cpu_s")
        res["query_level_walk_once_s"] = round(t, 3)
        with without_aggregate():
            t, _ = timed(lambda: edges_and_nodes(con, "bench"), 2, "query_one_walk_cpu_s")
        res["query_edges_and_nodes_one_walk_s"] = round(t, 3)
        assert stored_sums(con, [1], None) is not None, "the run has no circuit aggregate"
        t, _ = timed(lambda: edges_and_nodes(con, "bench"), 2, "query_aggregate_cpu_s")
        res["query_edges_and_nodes_aggregate_s"] = round(t, 3)
    with TestClient(create_app(db)) as warm:
        get(warm, "/api/runs")  # first request of a process: imports and DuckDB start-up

        def cold_paint() -> Any:
            with TestClient(create_app(db)) as fresh:  # a new server: nothing cached
                return get(fresh, "/api/runs/bench/edges?sign=both")

        t, body = timed(cold_paint, label="circuit_first_paint_cold_cpu_s")
        res["circuit_first_paint_cold_s"] = round(t, 3)
        with without_aggregate():
            t, walked = timed(cold_paint, label="circuit_first_paint_cold_walk_cpu_s")
        res["circuit_first_paint_cold_walk_s"] = round(t, 3)
        assert [e["edge"] for e in walked["edges"]] == [e["edge"] for e in body["edges"]]

        def cold_positional() -> Any:
            with TestClient(create_app(db)) as fresh:
                return get(fresh, "/api/runs/bench/edges?sign=both&positional=true")

        t, pos = timed(cold_positional, repeat=2, label="circuit_positional_cold_cpu_s")
        res["circuit_positional_first_paint_cold_s"] = round(t, 3)
        res["circuit_positional_total_edges"] = pos["total_edges"]
        res["circuit_positional_edges_sent"] = len(pos["edges"])
        res["circuit_edges_sent"] = len(body["edges"])
        res["circuit_total_edges"] = body["total_edges"]

        def cold_node_scores() -> float:
            with TestClient(create_app(db)) as fresh:
                get(fresh, "/api/runs/bench/edges?sign=both")
                t = time.perf_counter()
                get(fresh, "/api/runs/bench/nodes?sign=both")
                return time.perf_counter() - t

        res["node_scores_after_paint_cold_s"] = round(min(cold_node_scores() for _ in range(2)), 3)
        get(warm, "/api/runs/bench/edges?sign=both")
        t, _ = timed(lambda: get(warm, "/api/runs/bench/edges?sign=both"))
        res["circuit_first_paint_warm_s"] = round(t, 3)
        t, roots = timed(lambda: get(warm, "/api/runs/bench/tree"))
        res["tree_roots_s"] = round(t, 3)
        root = roots["children"][0]["path_id"]
        t, level = timed(
            lambda: get(warm, f"/api/runs/bench/tree?parent={root}"), label="tree_expand_root_cpu_s"
        )
        res["tree_expand_root_s"] = round(t, 3)
        res["tree_root_children_total"] = level["total"]
        res["tree_root_children_sent"] = len(level["children"])
        inner = next(c for c in level["children"] if c["n_children"])
        t, level2 = timed(lambda: get(warm, f"/api/runs/bench/tree?parent={inner['path_id']}"))
        res["tree_expand_depth1_s"] = round(t, 3)
        res["tree_depth1_children"] = level2["total"]
        edge = body["edges"][0]["edge"]
        t, _ = timed(lambda: get(warm, f"/api/runs/bench/paths?edge={edge}&k=20"))
        res["paths_through_top_edge_s"] = round(t, 3)
        t, _ = timed(lambda: get(warm, "/api/runs/bench/crossprompt?top=30"), repeat=1)
        res["crossprompt_heatmap_cold_s"] = round(t, 3)
    res.update(CPU)
    res["machine"] = f"{platform.machine()} cpus={os.cpu_count()} load1={os.getloadavg()[0]:.1f}"
    print(json.dumps(res, indent=1))
    out = Path(__file__).parent / "results" / "serve.json"
    out.parent.mkdir(exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    by_rows = old.get("by_rows", {})  # one entry per store size: a run replaces its own size
    by_rows[str(res["rows"])] = res
    out.write_text(json.dumps({"by_rows": by_rows}, indent=1) + "\n")
    if args.keep_db or args.db is not None:
        print("store kept at", db)
    else:
        for p in (db, db.with_name(db.name + ".wal")):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
