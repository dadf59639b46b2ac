"""The Python part of ``benchmarks/gpu_check.sh``: CUDA-vs-CPU parity, engine rates, demo search.

Usage: ``python benchmarks/gpu_check.py [--device cuda] [--pytest-summary TEXT] [--out FILE]``;
``--device cpu`` is a smoke mode for machines without a GPU (small shapes, short timings: it
checks that the script runs, its numbers mean nothing). Writes ``benchmarks/results/gpu.json``:

- ``parity``: the default demo search (toy-ioi, toy-ioi-small, exact threshold 0.05, positional,
  counterfactual) on the device in float32 vs CPU float64, path for path within 1e-4 (``tests.test_cuda.search_parity``; the full method x patch x positional matrix is
  ``pytest -m cuda``, whose summary line the shell script passes in);
- ``engine``: exact candidates/s (and attribution) at frontier depths 0-3 on a random
  GPT-2-small-shaped model (12L/12H/d768, vocab 50257, 8 prompts x 15 tokens, counterfactual,
  logit difference), float32 and bfloat16 (``benchmarks/bench_engine.py``'s ``bench``);
- ``demo``: the default demo search end to end (``find_paths``) per dtype, with its path count;
- ``targets``: issue 20's depth-3 rates (>= 100k/s float32, >= 250k/s bfloat16), met or not;
- ``stored``: the default *stored* search (``pathdb search``'s code path, float32) on the device
  and on the CPU: both must complete with group effects and the refined edge rule stored; the
  largest group-effect difference and the overlap of the refined top-75 edges are recorded.

Exit status: 1 when a parity check fails (the rates are reported, never enforced).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_engine import bench, random_model  # noqa: E402

from pathdb.models import load, move_model, resolve_device  # noqa: E402
from pathdb.prompts import load_prompts  # noqa: E402
from search.api import find_paths  # noqa: E402
from search.strategies import SearchParams  # noqa: E402
from tests.test_cuda import search_parity  # noqa: E402

DTYPES = ("float32", "bfloat16")
TARGETS = {"float32": 100_000.0, "bfloat16": 250_000.0}  # exact candidates/s at depth 3


def parity(device: str, smoke: bool) -> list[dict[str, Any]]:
    """The default demo search on ``device`` (float32) against CPU float64, path for path."""
    params = SearchParams(min_contribution=0.5 if smoke else 0.05)
    try:
        return [search_parity(params, patch="counterfactual", positional=True, device=device)]
    except AssertionError as e:
        return [{"failed": str(e) or traceback.format_exc(limit=2)}]


def engine(device: str, smoke: bool) -> list[dict[str, Any]]:
    """bench_engine's rates on the GPT-2-small shape (a 4-layer toy shape in smoke mode)."""
    rows = []
    for dtype in DTYPES:
        shape = (4, 4, 64, 256, 1000) if smoke else (12, 12, 768, 3072, 50257)
        model = move_model(random_model(*shape), device, dtype)
        for r in bench(
            model, f"{'smoke' if smoke else 'GPT-2-small shape'} {dtype}", 8, 15, quick=True
        ):
            rows.append({"dtype": dtype, **r})
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def demo(device: str, smoke: bool) -> list[dict[str, Any]]:
    """The default demo search end to end per dtype (model load and caching excluded)."""
    rows = []
    for dtype in DTYPES:
        model = load("toy-ioi", device=device, dtype=dtype)
        prompts = load_prompts("toy-ioi-small", model)
        params = SearchParams(min_contribution=0.5 if smoke else 0.05)
        find_paths(model, prompts, params)  # warm-up (kernels, allocator)
        t0 = time.perf_counter()
        paths = find_paths(model, prompts, params)
        dt = time.perf_counter() - t0
        kept = sum(p.complete and p.kept for p in paths)
        rows.append(
            {"dtype": dtype, "seconds": dt, "evaluated": len(paths) - 1, "complete_kept": kept}
        )
        print(
            f"demo search {dtype:9s} {dt:7.2f} s  {len(paths) - 1} evaluated, {kept} complete kept",
            flush=True,
        )
    return rows


def stored(device: str, smoke: bool) -> dict[str, Any]:
    """The default stored search on ``device`` and on the CPU (float32 both): its default edge
    rule, group effects and refined top-75 edges, and the wall time of each."""
    from pathdb.query import edges
    from pathdb.store.db import open_store
    from pathdb.store.effects import default_edge_rule
    from search import SearchRequest, run_loaded

    runs: dict[str, Any] = {}
    for where in dict.fromkeys((device, "cpu")):
        model = load("toy-ioi", device=where)
        prompts = load_prompts("toy-ioi-small", model)
        req = SearchRequest(params=SearchParams(min_contribution=0.5 if smoke else 0.05))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = run_loaded(req, model, prompts, Path(tmp) / "s.duckdb", run_name="d", quiet=True)
            seconds = time.perf_counter() - t0
            with open_store(Path(tmp) / "s.duckdb", read_only=True) as store:
                rule = default_edge_rule(store.con, res.run_id)
                table = edges(store.con, res.run_id, rule=rule.rule, effects=rule.effects,
                              refined=rule.refined)  # fmt: skip
        runs[where] = (rule, set(table["edge"].head(75)), seconds, res.wall_s)
    (rule, top, seconds, wall), (cpu_rule, cpu_top, cpu_seconds, _) = runs[device], runs["cpu"]
    diff = max(
        (
            abs(v - (cpu_rule.effects or {}).get(k, float("nan")))
            for k, v in (rule.effects or {}).items()
        ),
        default=float("nan"),
    )
    row = {
        "rule": rule.rule, "cpu_rule": cpu_rule.rule, "refined_edges": len(rule.refined or {}),
        "max_abs_diff_group_effects": diff, "top75_jaccard": len(top & cpu_top) / len(top | cpu_top),
        "seconds": seconds, "wall_s": wall, "cpu_seconds": cpu_seconds,
    }  # fmt: skip
    print(f"stored search: {json.dumps(row)}", flush=True)
    return row


def main() -> int:
    """Run the three parts, write the JSON, return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (smoke mode)")
    ap.add_argument(
        "--pytest-summary", default="", help="the `pytest -m cuda` summary line, recorded"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default benchmarks/results/gpu.json; smoke mode: a temporary file",
    )
    args = ap.parse_args()
    device = resolve_device(args.device)
    smoke = device == "cpu"
    default = (
        Path(tempfile.gettempdir()) / "pathdb-gpu-smoke.json"
        if smoke
        else ROOT / "benchmarks" / "results" / "gpu.json"
    )
    out_path: Path = args.out or default
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    par = parity(device, smoke)
    print(f"parity: {json.dumps(par)}", flush=True)
    eng = engine(device, smoke)
    dem = demo(device, smoke)
    sto = stored(device, smoke)
    depth3 = {r["dtype"]: r["exact_batched"] for r in eng if r["path"].startswith("depth3")}
    targets = {
        d: {"rate": depth3.get(d), "target": t, "met": (depth3.get(d) or 0) >= t}
        for d, t in TARGETS.items()
    }
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    meta = {
        "device": device, "gpu": gpu, "smoke": smoke, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "seconds": time.perf_counter() - t0,
        "pytest_cuda": args.pytest_summary,
    }  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "meta": meta,
        "parity": par,
        "engine": eng,
        "demo": dem,
        "targets": targets,
        "stored": sto,
    }
    out_path.write_text(json.dumps(out, indent=2))
    print(f"targets (depth 3, exact candidates/s): {json.dumps(targets)}")
    print(f"wrote {out_path}")
    complete = sto["rule"] == sto["cpu_rule"] == "refined"
    return 1 if any("failed" in p for p in par) or not complete else 0


if __name__ == "__main__":
    sys.exit(main())
