"""Per-prompt searches sharded over Ray workers: throughput with 1 and 2 workers, the driver's
store share, and the driver's ingest rate (the single writer's ceiling).

A per-prompt threshold search of the 96 ``toy-ioi-large`` prompts (exact, positional,
counterfactual, logit difference, torch at 1 thread) runs in one process (no workers) and with
``workers`` = 1 and 2 on a local Ray cluster. Actor start-up (process + model load) is timed
apart: each pool is warmed on 2 prompts first, then the 96-prompt run is timed. "Driver store
share" = time the driver spends writing finished prompts (one checkpoint each) / run wall time.
The driver's ingest rate is also measured without workers or models: synthetic prompt results
of 2k, 20k and 90k rows (90k ~ one GPT-2-small prompt at threshold 0.02, BENCHMARKS.md search
table) written one prompt per checkpoint through the same code (``search.distributed.write_prompts``).
``--many``: several batch runs instead (2 prompt sets x 2 models, what ``pathdb search -p A -p B
-m X -m Y`` runs), one after another in one process and as tasks of 2 workers (pool warmed on
the same runs first, so each actor has loaded its models). Usage::

    python benchmarks/bench_distributed.py [--model toy-ioi-2l] [-t 0.1] [--out benchmarks/results/distributed.json]
    python benchmarks/bench_distributed.py --many [-t 0.1] [--out benchmarks/results/distributed_many.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import ray
import torch

from pathdb.models import fingerprint, load
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store
from pathdb.store.writer import RunWriter
from search import distributed
from search.runner import SearchRequest, _prompt_rows, _run_meta, _scorer, run_loaded, run_many
from search.strategies import SearchParams

INGEST_SIZES = (2_000, 20_000, 90_000)
INGEST_PROMPTS = 8
MANY_SETS = ("toy-ioi-small", "toy-ioi-heldout")
MANY_MODELS = ("toy-ioi", "toy-ioi-2l")


def _run(
    req: SearchRequest, model: Any, prompts: Any, db: Path, workers: int | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run_loaded(
        req, model, prompts, db, run_name=f"w{workers or 0}", quiet=True, workers=workers
    )
    wall = time.perf_counter() - t0
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM paths WHERE run_id = ?", [res.run_id]).fetchall()[
            0
        ][0]
    return {
        "workers": workers or 0,
        "wall_s": wall,
        "evaluated": res.n_evaluated,
        "rows": int(rows),
        "paths_per_s": res.n_evaluated / wall,
        "prompts_per_s": len(prompts.records) / wall,
        "driver_write_s": res.write_s,
        "driver_store_share": res.write_s / wall,
        "driver_ingest_rows_per_s": rows / res.write_s if res.write_s else None,
    }


def _ingest(model: Any, req: SearchRequest, prompts: Any, work: Path) -> list[dict[str, Any]]:
    """Rows/s of ``write_prompts`` alone (one prompt per checkpoint), on synthetic results built from a real prompt's nodes."""
    worker = distributed.PromptWorker("cpu", 1)
    nodes, _, _ = worker.search(req, fingerprint(model), "bench", _prompt_rows(prompts), 0)
    rng = np.random.default_rng(0)
    out = []
    for n in INGEST_SIZES:
        idx = np.arange(n)
        paths = pa.table(
            {
                "parent": pa.array(np.where(idx == 0, -1, (idx - 1) // 8), pa.int64()),
                "node": pa.array(rng.integers(0, nodes.num_rows, n), pa.int32()),
                "depth": pa.array(np.minimum(np.log2(idx + 1).astype(np.int16), 6), pa.int16()),
                "contribution": pa.array(np.where(idx == 0, np.nan, rng.normal(size=n))),
                "method": pa.array(["root"] + ["exact"] * (n - 1), pa.string()),
                "complete": pa.array(rng.random(n) < 0.1),
                "kept": pa.array(rng.random(n) < 0.3),
            }
        )
        db = work / f"ingest-{n}.duckdb"
        scorer = _scorer(req, model, prompts.subset(0))
        with open_store(db) as store:
            writer = RunWriter.create(
                store, name="ingest", meta=_run_meta(req, model, "x", 0.0, scorer.root)
            )
            store.detach()
            t0 = time.perf_counter()
            for i in range(INGEST_PROMPTS):
                distributed.write_prompts(writer, [(i, nodes, paths)])
            s = time.perf_counter() - t0
            writer.finish("completed")
        out.append(
            {
                "rows_per_prompt": n,
                "prompts": INGEST_PROMPTS,
                "s": s,
                "rows_per_s": n * INGEST_PROMPTS / s,
                "s_per_prompt": s / INGEST_PROMPTS,
            }
        )
    return out


def _many(t: float, work: Path) -> list[dict[str, Any]]:
    """Wall time, runs/s and driver store share of the 4 batch runs, without and with 2 workers."""
    reqs = [
        SearchRequest(model=m, prompts=p, params=SearchParams(min_contribution=t))
        for p in MANY_SETS
        for m in MANY_MODELS
    ]
    names = [f"{p}/{m}" for p in MANY_SETS for m in MANY_MODELS]
    out = []
    for workers in (None, 2):
        if workers is not None:  # warm: start the actors, each loads the models of its tasks
            run_many(reqs, work / "warm.duckdb", run_names=names, quiet=True, workers=workers)
        t0 = time.perf_counter()
        res = run_many(
            reqs, work / f"many{workers or 0}.duckdb", run_names=names, quiet=True, workers=workers
        )
        wall = time.perf_counter() - t0
        write_s = sum(r.write_s for r in res)
        out.append(
            {
                "workers": workers or 0,
                "runs": len(res),
                "wall_s": wall,
                "evaluated": sum(r.n_evaluated for r in res),
                "paths_per_s": sum(r.n_evaluated for r in res) / wall,
                "driver_write_s": write_s,
                "driver_store_share": write_s / wall,
            }
        )
        print(out[-1], flush=True)
    return out


def main_many(t: float, out: Path) -> None:
    """``--many``: the several-batch-runs benchmark alone."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        try:
            rows = _many(t, Path(tmp))
        finally:
            distributed.release_workers()
            ray.shutdown()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "runs": f"batch threshold/exact -t {t}: ({', '.join(MANY_SETS)}) x ({', '.join(MANY_MODELS)})",
        "torch_threads": 1,
        "ray": ray.__version__,
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--many", action="store_true", help="several batch runs (see module doc)")
    ap.add_argument("--model", default="toy-ioi-2l")
    ap.add_argument("-t", "--min-contribution", type=float, default=0.1)
    ap.add_argument("--prompts", default="toy-ioi-large")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = Path("benchmarks/results")
    if args.many:
        main_many(args.min_contribution, args.out or results / "distributed_many.json")
        return
    args.out = args.out or results / "distributed.json"
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    model = load(args.model)
    prompts = load_prompts(args.prompts, model)
    req = SearchRequest(
        model=args.model,
        prompts=args.prompts,
        prompt_mode="per-prompt",
        params=SearchParams(min_contribution=args.min_contribution),
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ingest = _ingest(model, req, prompts, work)
        print("ingest", ingest, flush=True)
        rows.append(_run(req, model, prompts, work / "w0.duckdb", None))
        print(rows[-1], flush=True)
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        try:
            for w in (1, 2):
                t0 = time.perf_counter()  # warm the pool: start w actors, each loads the model
                run_loaded(
                    req,
                    model,
                    prompts.select(list(range(2 * w))),
                    work / f"warm{w}.duckdb",
                    quiet=True,
                    workers=w,
                )
                row = _run(req, model, prompts, work / f"w{w}.duckdb", w)
                row["pool_start_s"] = time.perf_counter() - t0 - row["wall_s"]
                rows.append(row)
                print(rows[-1], flush=True)
        finally:
            distributed.release_workers()
            ray.shutdown()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "model": args.model,
        "prompts": f"{args.prompts} ({len(prompts.records)} prompts, per-prompt mode)",
        "threshold": args.min_contribution,
        "torch_threads": 1,
        "ray": ray.__version__,
        "runs": rows,
        "driver_ingest": ingest,
        "note": "the machine was shared and busy (see load_average_1min): every figure is slower "
        "than on an idle machine, and 2 workers compete with the driver and other jobs for 2 cores",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
