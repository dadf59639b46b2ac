"""Render the comparison results as a markdown table (for BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """One row per matched pair: times, speed-up, path counts, overlap, score agreement."""
    m = result["machine"]
    v = m["versions"]
    lines = [
        f"# pathdb vs ipe ({result['model']}, {result['n_prompts']} prompts x "
        f"{result['n_positions']} tokens, metric {result['metric']})",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}), torch threads {m['torch_threads']}, "
        f"load average {m['loadavg_1_5_15']} at the end; torch {v['torch']}, transformer-lens "
        f"{v['transformer-lens']}, ipe {v['ipe']}, pathdb {v['pathdb']}, duckdb {v['duckdb']}.",
        "Times: best of N (ipe: search call; pathdb: `run_loaded` incl. writing every evaluated "
        "path to DuckDB). Paths: complete paths with |score| > "
        f"{result.get('score_floor', 1e-4)} (percent points). Max rel diff over shared paths with "
        "|score| >= 0.01; f64 err: max |score - float64 reference| (pathdb engine, float64 model).",
        "",
        "| case | setting | ipe s | pathdb s | speed-up | ipe paths | pathdb paths | shared | identical | max rel diff | f64 err ipe / pathdb | pathdb evaluated |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in result["cases"]:
        c = row["case"]
        cmp = row["comparison"]
        if c["strategy"] == "threshold":
            setting = f"min_contribution={c['min_contribution']}"
        elif c["strategy"] == "best-first":
            setting = f"top_n={c['top_n']}"
        else:
            setting = f"max_width={c['max_width']}"
        flags = [f for f in ("batch_heads", "batch_positions") if c[f]]
        if flags:
            setting += " " + "+".join(flags)
        lines.append(
            f"| {c['name']} | {setting} | {row['ipe']['best_s']:.2f} | {row['pathdb']['best_s']:.3f} | "
            f"{_fmt(row['speedup_best'], '.0f')}x | {cmp['n_ipe_above_floor']} | {cmp['n_pathdb_above_floor']} | "
            f"{cmp['n_shared']} | {'yes' if cmp['identical'] else 'no'} | "
            f"{_fmt(cmp['max_rel_score_diff'], '.1e')} | {_f64(row)} | {row['pathdb'].get('n_evaluated', '-')} |"
        )
    notes = {row["note"] for row in result["cases"] if row.get("note")}
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in sorted(notes))]
    return "\n".join(lines) + "\n"


def _f64(row: dict[str, Any]) -> str:
    d = row.get("diagnostics")
    if not d:
        return "-"
    return (
        f"{_fmt(d['f64_max_abs_error_ipe'], '.0e')} / {_fmt(d['f64_max_abs_error_pathdb'], '.0e')}"
    )
