"""Benchmark of the query layer on a synthetic store with >= 10 million evaluated paths.

The store looks like a real backward search tree over a GPT-2-small-like positional node
dictionary (12 layers, 12 heads, 15 positions; q and kv heads): per prompt a root [FINAL], then
per depth a few kept frontier paths expanded into many evaluated children, most of them pruned,
about 5 % complete (starting at the embedding). Times top-100 paths, the position-free edge circuit
and cross-prompt edge statistics, prints them and writes ``benchmarks/results/query.json``.

Run: ``.venv/bin/python benchmarks/bench_query.py [--rows 10000000] [--keep-db]``
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import sqlalchemy

from pathdb.graph import Node, Site
from pathdb.query import circuit, cross_prompt_edges, top_paths
from pathdb.store.nodes import NODE_COLUMNS, node_row
from pathdb.store.schema import metadata

L, H, T = 12, 12, 15
ROLES = ["BOS", "S1", "x", "IO", "x", "x", "S2", "x", "x", "x", "x", "x", "x", "x", "END"]


def node_dictionary() -> list[Node]:
    """Every positional node of the GPT-2-small-like graph (FINAL first)."""
    out = [Node.final(L, T - 1)]
    for p in range(T):
        out.append(Node.embed(p))
        for layer in range(L):
            for h in range(H):
                out.append(Node.attn(layer, h, Site.Q, p))
                out.extend(Node.attn(layer, h, Site.KV, p, k) for k in range(p + 1))
            out.append(Node.mlp(layer, p))
    return out


def build(path: Path, rows: int, n_prompts: int, seed: int = 0) -> dict[str, int]:
    """Create the store at ``path`` with about ``rows`` evaluated paths over ``n_prompts`` prompts."""
    rng = np.random.default_rng(seed)
    engine = sqlalchemy.create_engine(f"duckdb:///{path}")
    metadata.create_all(engine)
    engine.dispose()
    con = duckdb.connect(str(path))
    con.execute(
        "INSERT INTO runs (run_id, name, status, created_at, model_name, model_fingerprint, n_layers, n_heads, "
        'd_model, method, strategy, metric, patch_type, prompt_mode, "positional", params, package_version) '
        f"VALUES (1, 'bench', 'completed', now(), 'gpt2-like', 'x', {L}, {H}, 768, 'hybrid', 'threshold', "
        "'logit_diff', 'counterfactual', 'per-prompt', true, '{}', '0')"
    )
    nodes = node_dictionary()
    node_rows = [
        {"run_id": 1, **dict(zip(NODE_COLUMNS, node_row(i, n), strict=True))}
        for i, n in enumerate(nodes)
    ]
    con.register("n_in", pa.Table.from_pylist(node_rows))
    con.execute("INSERT INTO nodes BY NAME SELECT * FROM n_in")
    for p in range(n_prompts):
        con.execute(
            "INSERT INTO prompts (run_id, prompt_idx, clean, target, target_id, tokens, token_strs, roles) "
            "VALUES (1, ?, 'x', 't', 0, ?, ?, ?)",
            [p, list(range(T)), ["t"] * T, ROLES],
        )
    kinds = np.array([str(n.kind) for n in nodes])
    embed_ids = np.flatnonzero(kinds == "embed")
    inner_ids = np.flatnonzero((kinds == "attn") | (kinds == "mlp"))
    per_prompt = rows // n_prompts
    shares = np.array([0.002, 0.10, 0.18, 0.2, 0.2, 0.16, 0.1, 0.058])
    next_id = 0
    stats = {"rows": 0, "complete_kept": 0}
    for prompt in range(n_prompts):
        root = next_id
        next_id += 1
        cols: dict[str, list[np.ndarray]] = {
            k: []
            for k in (
                "path_id",
                "parent_id",
                "node_id",
                "depth",
                "contribution",
                "complete",
                "kept",
            )
        }
        cols["path_id"].append(np.array([root]))
        cols["parent_id"].append(np.array([-1]))
        cols["node_id"].append(np.array([0]))
        cols["depth"].append(np.array([0]))
        cols["contribution"].append(np.array([np.nan]))
        cols["complete"].append(np.array([False]))
        cols["kept"].append(np.array([True]))
        frontier = np.array([root])
        for d, share in enumerate(shares, start=1):
            n = max(int(per_prompt * share), len(frontier))
            parent = frontier[rng.integers(0, len(frontier), n)]
            complete = rng.random(n) < 0.05
            node = np.where(complete, rng.choice(embed_ids, n), rng.choice(inner_ids, n))
            contrib = rng.standard_normal(n) * np.exp(-0.3 * d)
            kept = np.where(complete, rng.random(n) < 0.4, rng.random(n) < 2500 / n)
            ids = np.arange(next_id, next_id + n)
            next_id += n
            for k, v in (
                ("path_id", ids),
                ("parent_id", parent),
                ("node_id", node),
                ("depth", np.full(n, d)),
                ("contribution", contrib),
                ("complete", complete),
                ("kept", kept),
            ):
                cols[k].append(v)
            frontier = ids[kept & ~complete]
            stats["complete_kept"] += int((kept & complete).sum())
            if len(frontier) == 0:
                break
        cat = {k: np.concatenate(v) for k, v in cols.items()}
        m = len(cat["path_id"])
        stats["rows"] += m
        tab = pa.table(
            {
                "run_id": pa.array(np.ones(m, dtype=np.int32)),
                "path_id": pa.array(cat["path_id"].astype(np.int64)),
                "parent_id": pa.array(cat["parent_id"].astype(np.int64), mask=cat["parent_id"] < 0),
                "node_id": pa.array(cat["node_id"].astype(np.int32)),
                "depth": pa.array(cat["depth"].astype(np.int16)),
                "prompt_idx": pa.array(np.full(m, prompt, dtype=np.int32)),
                "contribution": pa.array(cat["contribution"], mask=np.isnan(cat["contribution"])),
                "method": pa.array(np.where(cat["complete"], "exact", "attribution")),
                "complete": pa.array(cat["complete"]),
                "kept": pa.array(cat["kept"]),
                "batch_id": pa.array(np.zeros(m, dtype=np.int64)),
            }
        )
        con.register("p_in", tab)
        con.execute("INSERT INTO paths BY NAME SELECT * FROM p_in")
        con.unregister("p_in")
    con.close()
    return stats


def timed(fn, repeat: int = 3) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    """Best wall time of ``repeat`` calls and the last result."""
    best, res = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def main() -> None:
    """Build the store, time the three queries, print and write the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--keep-db", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    db = tmp / "bench.duckdb"
    t0 = time.perf_counter()
    stats = build(db, args.rows, args.prompts)
    build_s = time.perf_counter() - t0
    con = duckdb.connect(str(db), read_only=True)
    res: dict[str, object] = {**stats, "prompts": args.prompts, "build_s": round(build_s, 2)}
    t, _df = timed(lambda: top_paths(con, 1, k=100, kept=True))
    res["top100_paths_s"] = round(t, 3)
    t, c = timed(lambda: circuit(con, 1, top_k=200, positional=False))
    res["edge_circuit_position_free_s"] = round(t, 3)
    res["edge_circuit_edges"] = len(c.edges)  # type: ignore[attr-defined]
    t, x = timed(lambda: cross_prompt_edges(con, 1, align="none"))
    res["cross_prompt_edges_position_free_s"] = round(t, 3)
    res["cross_prompt_edges_rows"] = len(x)  # type: ignore[arg-type]
    t, x = timed(lambda: cross_prompt_edges(con, 1, align="roles"))
    res["cross_prompt_edges_roles_s"] = round(t, 3)
    res["cross_prompt_edges_roles_rows"] = len(x)  # type: ignore[arg-type]
    res["machine"] = (
        f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}"
    )
    con.close()
    print(json.dumps(res, indent=1))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "query.json").write_text(json.dumps(res, indent=1) + "\n")
    if not args.keep_db:
        db.unlink()
    else:
        print("store kept at", db)


if __name__ == "__main__":
    main()
