"""Recall of threshold searches against exhaustive ground truth, and what recall mode costs.

On the bundled 2-layer toy (``toy-ioi-2l``, 8 ``toy-ioi-small`` prompts) every complete path is
scored exactly by the exhaustive strategy; thresholds are set at the |score| of the 10th, 50th
and 200th strongest complete path. For each case (patching x positional x metric) it reports the
recall (share of complete paths with |score| >= t found, and share of their |score| mass) of the
plain threshold search and of recall mode at two partial factors, with exact evaluations and wall
times side by side in one run. Usage::

    python benchmarks/bench_recall.py [--out benchmarks/results/recall.json]
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

from pathdb.models import load
from pathdb.prompts import load_prompts
from search.api import find_paths
from search.strategies import SearchParams

RANKS = (10, 50, 200)
FACTORS = (0.25, 0.1)


def _measure(
    model: Any, prompts: Any, params: SearchParams, kw: dict[str, Any]
) -> tuple[list[Any], float]:
    t0 = time.perf_counter()
    paths = find_paths(model, prompts, params, **kw)
    return paths, time.perf_counter() - t0


def _recall(paths: list[Any], truth: dict[Any, float], t: float) -> dict[str, float]:
    want = {k for k, v in truth.items() if abs(v) >= t}
    got = {p.path for p in paths if p.complete and p.kept} & want
    mass = sum(abs(truth[k]) for k in want)
    return {
        "n_above": len(want),
        "recall": len(got) / len(want),
        "mass_recall": sum(abs(truth[k]) for k in got) / mass,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/recall.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    rows: list[dict[str, Any]] = []
    for patch in ("counterfactual", "zero"):
        for positional in (True, False):
            for metric in ("logit_difference", "target_logit_percentage"):
                kw = {"patch_type": patch, "positional": positional, "metric": metric}
                ex, ex_s = _measure(model, prompts, SearchParams(strategy="exhaustive"), kw)
                truth = {p.path: p.contribution for p in ex if p.complete}
                ranked = np.sort(np.abs(np.fromiter(truth.values(), dtype=float)))[::-1]
                for rank in RANKS:
                    t = float(ranked[min(rank, len(ranked) - 1)])
                    if t <= 1e-6:
                        continue
                    plain, plain_s = _measure(model, prompts, SearchParams(min_contribution=t), kw)
                    row: dict[str, Any] = {
                        "patch": patch, "positional": positional, "metric": metric, "rank": rank,
                        "threshold": t, "exhaustive_evals": len(ex), "exhaustive_s": ex_s,
                        "threshold_evals": len(plain), "threshold_s": plain_s,
                        "threshold_recall": _recall(plain, truth, t),
                    }  # fmt: skip
                    for f in FACTORS:
                        params = SearchParams(min_contribution=t, recall=True, partial_factor=f)
                        full, full_s = _measure(model, prompts, params, kw)
                        row[f"recall_{f}"] = {
                            **_recall(full, truth, t), "evals": len(full), "s": full_s,
                            "evals_vs_threshold": len(full) / len(plain),
                        }  # fmt: skip
                    rows.append(row)
                    r = row["recall_0.25"]
                    print(
                        f"{patch:14s} pos={positional!s:5s} {metric:24s} rank {rank:3d}: threshold "
                        f"{row['threshold_recall']['recall']:.3f} | recall mode {r['recall']:.3f} "
                        f"(mass {r['mass_recall']:.4f}) at {r['evals_vs_threshold']:.2f}x evaluations",
                        flush=True,
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "torch_threads": 1,
        "model": "toy-ioi-2l",
        "prompts": "toy-ioi-small",
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
