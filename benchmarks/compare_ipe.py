"""Side-by-side benchmark of pathdb against the reference ``ipe`` package (pathdb issue 6).

Runs matched searches with both tools in one process on the same model, prompts, metric and
root, and reports per pair: wall time of each tool (ipe: the search call; pathdb: ``run_loaded``
including writing every evaluated path to a fresh DuckDB store), the speed-up, the number of
complete paths each found, their overlap by node-label sequence and the score agreement.

    bash benchmarks/setup_ipe_env.sh
    benchmarks/.venv-ipe/bin/python benchmarks/compare_ipe.py            # all cases
    benchmarks/.venv-ipe/bin/python benchmarks/compare_ipe.py --only threshold --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ipe_compat.compare import SCORE_FLOOR, compare_sets  # noqa: E402
from ipe_compat.diagnose import (  # noqa: E402
    embed_estimates,
    float64_reference,
    max_abs_error,
    to_float64,
    twin_ties,
)
from ipe_compat.loader import import_ipe, versions  # noqa: E402
from ipe_compat.report import markdown_table  # noqa: E402
from ipe_compat.runners import Case, Method, ToolRun, run_ipe, run_pathdb  # noqa: E402

RESULTS = HERE / "results"

# Thresholds / widths chosen so each ipe run takes seconds to a couple of minutes on a 2-core CPU
# while finding tens to hundreds of complete paths (target_logit_percentage is in percent).
# key: (patch_type, positional) -> (exact threshold, attribution threshold, top_n, max_width)
SETTINGS: dict[tuple[str, bool], tuple[float, float, int, int]] = {
    ("counterfactual", True): (0.05, 0.05, 30, 10),
    ("counterfactual", False): (0.1, 0.05, 30, 10),
    ("zero", True): (0.05, 0.05, 30, 10),
    ("zero", False): (0.1, 0.05, 30, 10),
}


def default_cases() -> list[Case]:
    """Every matched pair: 2 patch types x 2 roots x {exact, attribution} x 3 strategies (+ batching)."""
    cases: list[Case] = []
    for patch in ("counterfactual", "zero"):
        for positional in (True, False):
            thr_e, thr_a, top_n, width = SETTINGS[(patch, positional)]
            root = "pos" if positional else "nonpos"
            method_thresholds: tuple[tuple[Method, float], ...] = (
                ("exact", thr_e),
                ("attribution", thr_a),
            )
            for method, thr in method_thresholds:
                tag = f"{method}/{patch}/{root}"
                cases += [
                    Case(
                        f"threshold/{tag}",
                        method,
                        "threshold",
                        patch,
                        positional,
                        min_contribution=thr,
                    ),
                    Case(f"best-first/{tag}", method, "best-first", patch, positional, top_n=top_n),
                    Case(
                        f"level-width/{tag}",
                        method,
                        "level-width",
                        patch,
                        positional,
                        max_width=width,
                    ),
                ]
            if positional:
                cases.append(
                    Case(
                        f"threshold+batch/exact/{patch}/{root}",
                        "exact",
                        "threshold",
                        patch,
                        positional,
                        min_contribution=thr_e,
                        batch_heads=True,
                        batch_positions=True,
                    )
                )
                if patch == "counterfactual":  # shows ipe's best-first batch_positions defect
                    cases.append(
                        Case(
                            f"best-first+batch_positions/exact/{patch}/{root}",
                            "exact",
                            "best-first",
                            patch,
                            positional,
                            top_n=top_n,
                            batch_positions=True,
                        )
                    )
    return cases


def machine() -> dict[str, Any]:
    """Where the numbers were taken (CPU count, load, torch threads, versions)."""
    import torch

    load = os.getloadavg()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "versions": versions(),
    }


def _timed_runs(fn: Any, repeats: int) -> tuple[ToolRun, list[float]]:
    """Run ``fn`` ``repeats`` times; keep the first result and every wall time."""
    first: ToolRun | None = None
    times: list[float] = []
    for _ in range(repeats):
        r = fn()
        times.append(r.wall_s)
        first = first or r
    assert first is not None
    return first, times


NOTES: dict[tuple[str, str], str] = {
    ("best-first", "attribution"): (
        "ipe queues an EMBED candidate with its first-order estimate and scores it exactly only "
        "when popped; pathdb scores EMBED candidates exactly when they are generated and queues "
        "them by that exact score. Different queue priorities give different top-n sets; see "
        "diagnostics.embed_estimates (estimate vs exact of every differing path)."
    ),
    ("best-first+batch_positions", "exact"): (
        "ipe defect: in PathMessagePatching_BestFirstSearch the split test "
        "`cur_path_start.keyvalue_position and (cur_path_start.patch_key or "
        "cur_path_start.patch_value) is None` is never true (`(a or b) is None` is False for "
        "booleans), so a key/value pre-screen node (kv position None, label `<kv>@p:*`) is never "
        "split into sources: ipe returns paths through unsplit `:*` nodes, and because it then "
        "expands them with target_position = keyvalue_position = None their predecessors lose "
        "their position (e.g. `input -> a0.h3<q> -> m0 -> a1.h2<kv>@14:* -> logits@14`, not a "
        "path of the positional graph: diagnostics.n_paths_not_in_graph). pathdb splits the "
        "pre-screen node into sources as batch_positions specifies."
    ),
    ("level-width", "exact"): (
        "tie order: without a key/value position, the query side and the key/value side of a "
        "head start a path with the same message (the head's whole output), so `a{l}.h{h}<q> -> "
        "...` and `a{l}.h{h}<kv> -> ...` score exactly the same (diagnostics.twin_ties). When such "
        "a tie straddles the max_width cut-off, ipe keeps whichever twin Python's set order puts "
        "first (varies between processes), pathdb the one first in candidate order (q); the "
        "frontiers then differ from that depth on."
    ),
    ("level-width", "attribution"): (
        "tie order: without a key/value position, the query side and the key/value side of a "
        "head start a path with the same message (the head's whole output), so their "
        "attribution estimates are identical (diagnostics.twin_ties). When such a tie straddles "
        "the max_width cut-off, ipe keeps whichever twin Python's set order puts first (varies "
        "between processes), pathdb the first in candidate order (q)."
    ),
}


def _diagnostics(
    model: Any, model64: Any, prompts: Any, case: Case, ipe_run: ToolRun, pdb_run: ToolRun
) -> dict[str, Any]:
    """Float64 reference errors of both tools, plus estimate-vs-exact for attribution best-first."""
    keys = {k for k, v in {**ipe_run.paths, **pdb_run.paths}.items() if abs(v) > SCORE_FLOOR}
    ref = float64_reference(model64, prompts, case.patch_type, case.positional, case.metric, keys)
    invalid = sorted(" -> ".join(k) for k in keys if k not in ref)
    out: dict[str, Any] = {
        "f64_max_abs_error_ipe": max_abs_error(ipe_run.paths, ref),
        "f64_max_abs_error_pathdb": max_abs_error(pdb_run.paths, ref),
        "n_paths_not_in_graph": len(invalid),
        "paths_not_in_graph": invalid[:10],
    }
    differing = (set(ipe_run.paths) ^ set(pdb_run.paths)) & keys
    if differing and case.strategy == "best-first" and case.method == "attribution":
        rows = embed_estimates(
            model, prompts, case.patch_type, case.positional, case.metric, sorted(differing)
        )
        for r in rows:
            r["found_by"] = "ipe" if tuple(r["path"].split(" -> ")) in ipe_run.paths else "pathdb"
        out["embed_estimates"] = sorted(rows, key=lambda r: -abs(r["exact"]))
    if differing and case.strategy == "level-width":
        out["twin_ties"] = twin_ties(
            model,
            prompts,
            case.patch_type,
            case.positional,
            case.metric,
            case.method,
            sorted(differing),
        )
    return out


def run_case(
    ipe: Any, model: Any, model64: Any, prompts: Any, case: Case, args: argparse.Namespace
) -> dict[str, Any]:
    """Run one pair with both tools and compare them."""
    load_before = os.getloadavg()[0]
    ipe_run, ipe_times = _timed_runs(lambda: run_ipe(ipe, model, prompts, case), args.ipe_repeats)
    pdb_run, pdb_times = _timed_runs(
        lambda: run_pathdb(model, prompts, case, model_name=args.model, prompts_name=args.prompts),
        args.repeats,
    )
    cmp = compare_sets(ipe_run.paths, pdb_run.paths)
    ipe_s, pdb_s = min(ipe_times), min(pdb_times)
    row: dict[str, Any] = {
        "case": case.to_json(),
        "ipe": {
            "times_s": ipe_times,
            "best_s": ipe_s,
            "median_s": statistics.median(ipe_times),
            **ipe_run.extra,
        },
        "pathdb": {
            "times_s": pdb_times,
            "best_s": pdb_s,
            "median_s": statistics.median(pdb_times),
            **pdb_run.extra,
        },
        "speedup_best": ipe_s / pdb_s if pdb_s > 0 else None,
        "speedup_median": statistics.median(ipe_times) / statistics.median(pdb_times),
        "comparison": cmp.to_json(),
        "loadavg_1m_before": round(load_before, 2),
    }
    if model64 is not None:
        row["diagnostics"] = _diagnostics(model, model64, prompts, case, ipe_run, pdb_run)
    if not cmp.identical:
        key = case.strategy + (
            "+batch_positions" if case.batch_positions and case.strategy == "best-first" else ""
        )
        note = NOTES.get((key, case.method))
        if note:
            row["note"] = note
    print(
        f"{case.name:42s} ipe {ipe_s:8.2f}s  pathdb {pdb_s:7.3f}s  x{row['speedup_best']:7.1f}  "
        f"paths {cmp.n_ipe_above_floor:4d}/{cmp.n_pathdb_above_floor:4d} shared {cmp.n_shared:4d}  "
        f"identical={cmp.identical} maxrel={cmp.max_rel_score_diff}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="toy-ioi", help="bundled model name or local directory")
    ap.add_argument("--prompts", default="toy-ioi-small", help="bundled prompt set or JSONL path")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this text")
    ap.add_argument("--repeats", type=int, default=5, help="pathdb repetitions (best is reported)")
    ap.add_argument("--ipe-repeats", type=int, default=1, help="ipe repetitions (best is reported)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ipe_comparison.json")
    ap.add_argument(
        "--md", type=Path, default=None, help="markdown table (default: --out with .md)"
    )
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 reference re-scoring")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads for both tools (1: see BENCHMARKS.md)"
    )
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TQDM_DISABLE", "1")  # ipe's progress bars
    import torch

    from pathdb.models import load
    from pathdb.prompts import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ipe = import_ipe()
    except ImportError as e:
        ap.exit(2, f"error: {e}\n")
    model = load(args.model)
    prompts = load_prompts(args.prompts, model)
    model64 = None if args.no_f64 else to_float64(model)
    cases = [c for c in default_cases() if args.only is None or args.only in c.name]
    if not cases:
        ap.error(f"--only {args.only!r} matches no case")
    started = time.time()
    rows = [run_case(ipe, model, model64, prompts, c, args) for c in cases]
    result = {
        "machine": machine(),
        "model": args.model,
        "prompts": args.prompts,
        "n_prompts": int(prompts.clean_tokens.shape[0]),
        "n_positions": int(prompts.clean_tokens.shape[1]),
        "metric": "target_logit_percentage",
        "score_floor": SCORE_FLOOR,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_unix": started,
        "total_s": time.time() - started,
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = args.md or args.out.with_suffix(".md")
    md.write_text(markdown_table(result))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
