"""Store benchmark: rows/s of ``RunWriter.add_paths`` + ``flush`` and the time of ``open_store``.

Run: ``.venv/bin/python benchmarks/bench_store.py [--rows 1000000 10000000]``; prints a table
and writes ``benchmarks/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pathdb.graph import ModelShape, Node, predecessors
from pathdb.store.db import open_store
from pathdb.store.writer import RunWriter

META = {
    "model_name": "bench", "model_fingerprint": "0" * 64, "n_layers": 12, "n_heads": 12,
    "d_model": 768, "method": "hybrid", "strategy": "threshold", "metric": "logit_diff",
    "patch_type": "counterfactual", "prompt_mode": "batch", "positional": True,
    "root_position": 14, "params": {"min_contribution": 0.01}, "baseline": 3.2,
    "package_version": "bench",
}  # fmt: skip
CHUNK = 100_000  # rows per add_paths call (one frontier expansion is typically 10^3..10^5)
CHECKPOINT = 1_000_000  # rows between explicit flushes (search checkpoints)


def write_rows(path: Path, n_rows: int, seed: int = 0) -> dict[str, float]:
    """Write ``n_rows`` realistic path rows (tree-shaped parents, gpt2-sized node dictionary)."""
    rng = np.random.default_rng(seed)
    with open_store(path) as store:
        w = RunWriter.create(store, name=None, meta=META)
        shape = ModelShape(12, 12, 15)
        final = Node.final(12, 14)
        node_ids = np.array([w.node_id(n) for n in [final, *predecessors(final, shape)]])
        t0 = time.perf_counter()
        w.add_paths([-1], [0], 0, None, [np.nan], "root", False, True)
        done = 1
        methods = np.array(["attribution", "exact", "confirmed"])
        while done < n_rows:
            n = min(CHUNK, n_rows - done)
            parents = rng.integers(0, done, n)
            w.add_paths(
                parents,
                rng.choice(node_ids[1:], n),
                rng.integers(1, 25, n),
                None,
                rng.normal(size=n),
                methods[rng.integers(0, 3, n)],
                rng.random(n) < 0.1,
                rng.random(n) < 0.3,
            )
            done += n
            if done % CHECKPOINT < CHUNK:
                w.flush(frontier_add=(np.arange(done - 1000, done), rng.random(1000)))
        w.finish("completed")
        wall = time.perf_counter() - t0
        (count,) = store.con.execute("SELECT count(*) FROM paths").fetchall()[0]
        assert count == n_rows, (count, n_rows)
    return {
        "rows": n_rows,
        "wall_s": wall,
        "rows_per_s": n_rows / wall,
        "writer_write_s": w.write_seconds,
        "write_rows_per_s": n_rows / w.write_seconds,
        "file_mb": path.stat().st_size / 1e6,
    }


def time_open(path: Path) -> float:
    """Seconds for one ``open_store`` + close of ``path``."""
    t0 = time.perf_counter()
    open_store(path).close()
    return time.perf_counter() - t0


def main() -> None:
    """Run the benchmark and write ``benchmarks/results/store.json``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.json")
    args = ap.parse_args()
    results: dict[str, object] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "open.duckdb"
        results["open_fresh_s"] = time_open(fresh)  # creates the file, migrates 0001 -> 0002
        results["open_existing_s"] = min(time_open(fresh) for _ in range(3))
        writes = []
        for n in args.rows:
            r = write_rows(Path(tmp) / f"w{n}.duckdb", n)
            writes.append(r)
            print(
                f"{n:>11,d} rows: {r['rows_per_s']:>12,.0f} rows/s end-to-end "
                f"({r['write_rows_per_s']:,.0f} rows/s in the writer), {r['file_mb']:.0f} MB"
            )
        results["writes"] = writes
    print(
        f"open_store fresh: {results['open_fresh_s']:.3f} s, existing: {results['open_existing_s']:.3f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
