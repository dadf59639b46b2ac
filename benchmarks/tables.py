"""Render the benchmark result files under ``benchmarks/results/`` as markdown tables.

Usage: ``python benchmarks/tables.py`` (prints the engine, search, store and query tables that
BENCHMARKS.md quotes; the ipe table is written by ``compare_ipe.py`` itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _k(x: float) -> str:
    return f"{x / 1000:,.1f}k" if x >= 1000 else f"{x:,.0f}"


def engine() -> str:
    """Candidates per second: exact batched vs one at a time, attribution."""
    d = _load("engine.json")
    if d is None:
        return ""
    rows = [
        "| model | frontier path | candidates | exact dense (before) /s | exact batched /s | after/before | exact one-at-a-time /s | ratio | attribution incl. gradient /s | attribution scoring /s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["results"]:
        dense = r.get("exact_dense")
        gain = f"{r['exact_batched'] / dense:.2f}x" if dense else "-"
        rows.append(
            f"| {r['model']} | {r['path']} | {r['n_candidates']} | {_k(dense) if dense else '-'} | "
            f"{_k(r['exact_batched'])} | {gain} | "
            f"{_k(r['exact_one_at_a_time'])} | {r['speedup']:.1f}x | {_k(r['attribution_with_gradient'])} | "
            f"{_k(r['attribution_scoring'])} |"
        )
    e2e = d.get("end_to_end") or []
    if e2e:
        rows += [
            "",
            "| end to end (`find_paths`, toy-ioi, threshold 0.05) | root | evaluated paths | s | paths/s |",
            "|---|---|---:|---:|---:|",
        ]
        for r in e2e:
            label = f"{r['method']}{' (dense, before)' if r.get('dense') else ''}"
            root = "positional" if r.get("positional", True) else "non-positional"
            rows.append(
                f"| {label} | {root} | {r['evaluated']:,} | {r['evaluated'] / r['evaluations_per_s']:.2f} | "
                f"{_k(r['evaluations_per_s'])} |"
            )
    return "\n".join(rows)


def search() -> str:
    """Search wall time per strategy x method and the store's share of it."""
    d = _load("search.json")
    if d is None:
        return ""
    rows = [
        "| model | strategy/method | wall s | evaluated | complete kept | evaluations/s | rows/s in writer | store share |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["results"]:
        rows.append(
            f"| {r['model']} | {r['setting']} | {r['wall_s']:.2f} | {r['evaluated']:,} | {r['complete_kept']:,} | "
            f"{_k(r['evals_per_s'])} | {_k(r['rows_written_per_s_in_writer'] or 0)} | {r['store_share_pct']:.1f}% |"
        )
    return "\n".join(rows)


def store() -> str:
    """Bulk insert rates into the store."""
    d = _load("store.json")
    if d is None:
        return ""
    rows = [
        "| rows | wall s | rows/s end to end | rows/s inside the writer | file MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in d["writes"]:
        rows.append(
            f"| {r['rows']:,} | {r['wall_s']:.2f} | {_k(r['rows_per_s'])} | {_k(r['write_rows_per_s'])} | {r['file_mb']:.0f} |"
        )
    rows.append(
        f"\nopen_store: fresh file (create + migrate) {d['open_fresh_s']:.2f} s, existing file {d['open_existing_s']:.2f} s"
    )
    return "\n".join(rows)


def query() -> str:
    """Query latency on a store of 10M evaluated paths."""
    d = _load("query.json")
    if d is None:
        return ""
    return "\n".join(
        [
            f"Store: {d['rows']:,} evaluated paths, {d['complete_kept']:,} complete kept, {d['prompts']} prompts.",
            "",
            "| query | seconds | target |",
            "|---|---:|---:|",
            f"| top-100 paths | {d['top100_paths_s']:.2f} | < 2 |",
            f"| position-free edge circuit | {d['edge_circuit_position_free_s']:.2f} | < 2 |",
            f"| cross-prompt edge statistics (position-free) | {d['cross_prompt_edges_position_free_s']:.2f} | < 2 |",
            f"| cross-prompt edge statistics (role-aligned) | {d['cross_prompt_edges_roles_s']:.2f} | < 2 |",
        ]
    )


def main() -> None:
    for title, fn in (("Engine", engine), ("Search", search), ("Store", store), ("Query", query)):
        print(f"### {title}\n\n{fn()}\n")


if __name__ == "__main__":
    main()
