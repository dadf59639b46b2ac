"""Error of the reduced-precision modes (``--dtype``) against float64 on the default demo search.

Usage: ``.venv/bin/python benchmarks/bench_dtype.py [--device cpu] [--dtypes float32 bfloat16]``.
Writes ``benchmarks/results/dtype.json`` and prints a summary.

The default demo search (``pathdb search`` defaults: toy-ioi, toy-ioi-small, exact threshold 0.05,
counterfactual patching, logit difference, positional) runs once in float64 (the reference). Then,
per dtype:

- **same paths**: the complete kept paths of the float64 run are re-scored exactly in that dtype
  (``score_paths``), so the error is the arithmetic's alone: max relative error
  ``|s - s64| / |s64|``, max absolute error, Spearman rank correlation of the scores and top-k
  overlap of the paths ranked by ``|score|``;
- **own search**: the whole search runs in that dtype (threshold decisions made on its own
  scores); reported: complete kept paths found, the Jaccard overlap of that set with float64's,
  and top-k overlap.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathdb.graph import Path as NodePath
from pathdb.models import load
from pathdb.prompts import load_prompts
from search.api import find_paths
from search.scorer import PromptScorer, build_scorer
from search.sinks import EvaluatedPath
from search.strategies import SearchParams

TOP_K = (10, 50)
THRESHOLD = 0.05


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ranks by argsort; ties are negligible for float scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def top(scores: dict[NodePath, float], k: int) -> set[NodePath]:
    """The ``k`` paths of largest ``|score|`` (ties broken by the path's order in the dict)."""
    return set(sorted(scores, key=lambda p: -abs(scores[p]))[:k])


def kept_complete(paths: list[EvaluatedPath]) -> dict[NodePath, float]:
    """Scores of the complete kept paths of a search."""
    return {
        p.path: float(p.contribution)
        for p in paths
        if p.complete and p.kept and p.contribution is not None
    }


def search(device: str, dtype: str) -> tuple[dict[NodePath, float], float, Any, Any]:
    """The default demo search in ``dtype``: complete kept paths, seconds, model, prompts."""
    model = load("toy-ioi", device=device, dtype=dtype)
    prompts = load_prompts("toy-ioi-small", model)
    t0 = time.perf_counter()
    paths = find_paths(model, prompts, SearchParams(min_contribution=THRESHOLD))
    return kept_complete(paths), time.perf_counter() - t0, model, prompts


def compare(device: str, dtype: str, ref: dict[NodePath, float]) -> dict[str, Any]:
    """Same-path and own-search agreement of ``dtype`` with the float64 reference ``ref``."""
    own, seconds, model, prompts = search(device, dtype)
    scorer = build_scorer(model, prompts)
    assert isinstance(scorer, PromptScorer), "toy-ioi-small is an equal-length prompt set"
    order = list(ref)
    s64 = np.array([ref[p] for p in order])
    s = scorer.exact.score_paths(order).mean.double().numpy()
    err = np.abs(s - s64)
    rel = err / np.abs(s64)
    strongest = np.argsort(-np.abs(s64))[: TOP_K[0]]
    same = {p: float(v) for p, v in zip(order, s, strict=True)}
    union = set(own) | set(ref)
    return {
        "dtype": dtype,
        "same_paths": {
            "n_paths": len(order),
            "max_relative_error": float(rel.max()),
            f"max_relative_error_top{TOP_K[0]}": float(rel[strongest].max()),
            "max_abs_error": float(err.max()),
            "spearman": spearman(s, s64),
            **{f"top{k}_overlap": len(top(same, k) & top(ref, k)) / k for k in TOP_K},
        },
        "own_search": {
            "seconds": seconds,
            "complete_kept": len(own),
            "jaccard_with_float64": len(set(own) & set(ref)) / len(union) if union else 1.0,
            **{f"top{k}_overlap": len(top(own, k) & top(ref, k)) / k for k in TOP_K},
        },
    }


def main() -> None:
    """Run the reference and every dtype, print a summary and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dtype.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, ref_s, _, _ = search(args.device, "float64")
    print(f"float64 reference: {len(ref)} complete kept paths in {ref_s:.1f} s", flush=True)
    rows = []
    for dtype in args.dtypes:
        r = compare(args.device, dtype, ref)
        sp, own = r["same_paths"], r["own_search"]
        print(
            f"{dtype:9s} same paths: max rel err {sp['max_relative_error']:.2e} (top-10 paths "
            f"{sp['max_relative_error_top10']:.2e}), max abs err "
            f"{sp['max_abs_error']:.2e}, Spearman {sp['spearman']:.4f}, top-10 {sp['top10_overlap']:.2f}, "
            f"top-50 {sp['top50_overlap']:.2f} | own search: {own['complete_kept']} kept complete, "
            f"Jaccard {own['jaccard_with_float64']:.3f}, top-10 {own['top10_overlap']:.2f}, "
            f"{own['seconds']:.1f} s",
            flush=True,
        )
        rows.append(r)
    meta = {
        "search": "pathdb search defaults: toy-ioi, toy-ioi-small, exact threshold 0.05, "
        "counterfactual, logit difference, positional",
        "device": args.device,
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "reference": {"dtype": "float64", "complete_kept": len(ref), "seconds": ref_s},
        "relative_error": "over the float64 run's complete kept paths (|score| >= 0.05)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
