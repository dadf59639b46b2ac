"""Mixed-length batch search vs the same prompts as equal-length groups vs one search per prompt.

``toy-ioi`` on the 96 ``toy-ioi-large`` prompts (token lengths 15-18, 12 role layouts), threshold
searches (exact and attribution), position-free and positional (the mixed batch then aligns
positions by role; each equal-length group uses its token indices), counterfactual patching,
logit difference, torch at 1 thread. One mixed batch search is timed beside the four
equal-length groups searched separately (the target: mixed <= 1.3x the groups' summed
evaluation time) and beside per-prompt searches of ``--per-prompt-sample`` prompts (scaled to
all 96). Each search is timed in wall and process CPU seconds after a full garbage collection
(on a shared machine the CPU ratio is the steadier of the two). ``--only MODE`` runs one mode
and replaces just its rows in ``--out`` (the other mode's rows are kept). Usage::

    python benchmarks/bench_mixed.py [--per-prompt-sample 12] [--only positional] [--repeats 3] [--out benchmarks/results/mixed.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts
from search.api import find_paths
from search.strategies import SearchParams


def _timed(
    model: Any, prompts: PromptSet, params: SearchParams, positional: bool
) -> tuple[int, float, float]:
    """Paths evaluated, wall seconds and process CPU seconds of one search, started after a full
    garbage collection (so no search pays for the garbage of the one before)."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    n = len(find_paths(model, prompts, params, positional=positional))
    return n, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-prompt-sample", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed.json"))
    ap.add_argument(
        "--only", choices=["position-free", "positional"], help="run one of the two modes"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time mixed and groups alternately N times; the ratio is the median of the N ratios",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load("toy-ioi")
    prompts = load_prompts("toy-ioi-large", model, require_equal_length=False)
    rows: list[dict[str, Any]] = []
    modes = {"position-free": (False,), "positional": (True,), None: (False, True)}[args.only]
    for positional, method in [(p, m) for p in modes for m in ("exact", "attribution")]:
        params = SearchParams(method=method, min_contribution=0.05)  # type: ignore[arg-type]
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        for _ in range(args.repeats):  # alternate, so load changes hit both sides alike
            n_mixed, s_mixed, c_mixed = _timed(model, prompts, params, positional)
            groups = [
                (len(ix), *_timed(model, g, params, positional)) for ix, g in prompts.by_length()
            ]
            s_groups = sum(s for _, _, s, _ in groups)
            c_groups = sum(c for _, _, _, c in groups)
            ratios.append(s_mixed / s_groups)
            cpu_ratios.append(c_mixed / c_groups)
        sample = list(range(0, len(prompts), max(1, len(prompts) // args.per_prompt_sample)))
        per = [_timed(model, prompts.subset(i), params, positional) for i in sample]
        s_per = sum(s for _, s, _ in per) * len(prompts) / len(sample)
        row = {
            "positional": positional,
            "method": method,
            "mixed": {
                "evaluated": n_mixed,
                "s": s_mixed,
                "cpu_s": c_mixed,
                "per_s": n_mixed / s_mixed,
            },
            "groups": [
                {"n_prompts": n, "evaluated": e, "s": s, "cpu_s": c} for n, e, s, c in groups
            ],
            "groups_total_s": s_groups,
            "groups_total_cpu_s": c_groups,
            "mixed_vs_groups": statistics.median(ratios),
            "mixed_vs_groups_each": ratios,
            "mixed_vs_groups_cpu": statistics.median(cpu_ratios),
            "mixed_vs_groups_cpu_each": cpu_ratios,
            "per_prompt_estimated_s": s_per,
            "per_prompt_sample": len(sample),
        }
        rows.append(row)
        print(
            f"{'positional' if positional else 'position-free'} {method}: mixed batch {s_mixed:.1f} s ({n_mixed} paths) | equal-length groups "
            f"{s_groups:.1f} s -> mixed/groups {statistics.median(ratios):.2f}x, CPU {statistics.median(cpu_ratios):.2f}x (medians of {len(ratios)}) | per-prompt (est. 96) {s_per:.0f} s",
            flush=True,
        )
    if args.only is not None and args.out.exists():  # keep the rows of the mode not rerun
        kept = [r for r in json.loads(args.out.read_text())["rows"] if r["positional"] != modes[0]]
        rows = sorted(kept + rows, key=lambda r: (r["positional"], r["method"] != "exact"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "torch_threads": 1,
        "model": "toy-ioi",
        "prompts": "toy-ioi-large",
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
