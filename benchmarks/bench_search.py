"""Search wall time per strategy x evaluator, rows written per second, and the store's share of time.

Runs real searches through ``search.runner.run_loaded`` (the code path of ``pathdb search``) into a
fresh DuckDB file with ``--store all`` and reads the timings the run recorded: ``wall_s`` (whole
search), ``write_s`` (time inside the store writer). Models: the bundled ``toy-ioi`` and a randomly
initialised GPT-2-small-shaped model (12 layers, 12 heads, d_model 768, 15-token prompts, 8
prompts). Usage::

    python benchmarks/bench_search.py [--quick] [--out benchmarks/results/search.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_arch import random_prompts

from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, run_loaded


def gpt2_shaped(seed: int = 0) -> tuple[Any, PromptSet]:
    """A random GPT-2-small-shaped model and 8 random 15-token prompts."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=64, d_vocab=1000,
        act_fn="gelu", normalization_type="LN", seed=seed,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    return model, random_prompts(seed, batch=8, seq=15, name="random-gpt2-shape")


def settings(model_name: str, quick: bool) -> list[tuple[str, SearchParams]]:
    """Strategy x evaluator settings that finish in about a minute each on 2 CPU cores."""
    t = 0.01 if model_name == "toy-ioi" else 0.02
    mt = 30.0 if quick else 120.0
    return [
        ("threshold/exact", SearchParams(strategy="threshold", method="exact", min_contribution=t, max_time=mt)),
        ("threshold/attribution", SearchParams(strategy="threshold", method="attribution", min_contribution=t, max_time=mt)),
        ("threshold/hybrid", SearchParams(strategy="threshold", method="hybrid", min_contribution=t, max_time=mt)),
        ("threshold/exact+screens", SearchParams(strategy="threshold", method="exact", min_contribution=t, batch_heads=True, batch_positions=True, max_time=mt)),
        ("best-first/exact", SearchParams(strategy="best-first", method="exact", top_n=50, max_time=mt)),
        ("best-first/attribution", SearchParams(strategy="best-first", method="attribution", top_n=50, max_time=mt)),
        ("level-width/exact", SearchParams(strategy="level-width", method="exact", max_width=20 if quick else 50, max_time=mt)),
        ("level-width/attribution", SearchParams(strategy="level-width", method="attribution", max_width=20 if quick else 50, max_time=mt)),
    ]  # fmt: skip


def bench(
    model_name: str, model: Any, prompts: PromptSet, quick: bool, db: Path
) -> list[dict[str, Any]]:
    rows = []
    for label, params in settings(model_name, quick):
        req = SearchRequest(
            model=model_name, prompts=prompts.source, params=params, metric="logit_difference"
        )
        t0 = time.perf_counter()
        res = run_loaded(req, model, prompts, db, run_name=f"{model_name}:{label}", quiet=True)
        total = time.perf_counter() - t0
        with open_store(db, read_only=True) as store:
            (n_rows,) = store.con.execute(
                "SELECT count(*) FROM paths WHERE run_id = ?", [res.run_id]
            ).fetchone()  # type: ignore[misc]
        row = {
            "model": model_name,
            "setting": label,
            "wall_s": round(res.wall_s, 3),
            "total_s_incl_cache": round(total, 3),
            "evaluated": res.n_evaluated,
            "rows_stored": int(n_rows),
            "complete_kept": res.n_kept_complete,
            "evals_per_s": round(res.n_evaluated / res.wall_s, 1) if res.wall_s else None,
            "write_s": round(res.write_s, 3),
            "rows_written_per_s_in_writer": round(n_rows / res.write_s) if res.write_s else None,
            "store_share_pct": round(100 * res.write_s / res.wall_s, 2) if res.wall_s else None,
            "hit_max_time": res.wall_s >= (params.max_time or 1e9) * 0.99,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller settings (max 30 s per search)")
    ap.add_argument("--models", default="toy-ioi,gpt2-shape")
    ap.add_argument("--out", default="benchmarks/results/search.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        for name in args.models.split(","):
            if name == "toy-ioi":
                model = load("toy-ioi")
                prompts = load_prompts("toy-ioi-small", model)
            else:
                model, prompts = gpt2_shaped()
            results += bench(name, model, prompts, args.quick, db)
    out = {
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "command": "python benchmarks/bench_search.py" + (" --quick" if args.quick else ""),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
