"""Start-up latency of the read commands: wall time of a whole `pathdb` process, as a user sees it.

Makes a store once with a small search of the bundled toy model, then runs each command 10 times
in fresh subprocesses (the console script in ``.venv/bin/pathdb``) and reports the median, min and
max wall seconds, and the median CPU seconds (user + system; on a shared, loaded machine the wall
time is inflated by waiting for a core, the CPU time much less). ``pathdb --help`` is the floor
every command pays (Python, Typer and its pydantic coercion, rich). Prints a table and writes
``benchmarks/results/startup.json``.

Run: ``.venv/bin/python benchmarks/bench_startup.py [--repeats 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHDB = str(Path(sys.executable).with_name("pathdb"))
RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"


def commands(db: str) -> dict[str, list[str]]:
    """The measured command lines (label -> argv after ``pathdb``)."""
    return {
        "pathdb --help": ["--help"],
        "pathdb runs": ["runs", "--db", db],
        "pathdb query paths RUN --top 10": ["query", "paths", "demo", "--top", "10", "--db", db],
        'pathdb sql "SELECT count(*) FROM paths"': [
            "sql",
            "SELECT count(*) FROM paths",
            "--db",
            db,
        ],
    }


def child_cpu() -> float:
    """CPU seconds used so far by this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timings(argv: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``repeats`` runs of ``pathdb argv`` (each must exit 0)."""
    wall, cpu = [], []
    for _ in range(repeats):
        cpu0, start = child_cpu(), time.perf_counter()
        proc = subprocess.run([PATHDB, *argv], capture_output=True, text=True)
        wall.append(time.perf_counter() - start)
        cpu.append(child_cpu() - cpu0)
        if proc.returncode != 0:
            raise SystemExit(f"pathdb {' '.join(argv)} failed: {proc.stderr}")
    return wall, cpu


def main() -> None:
    """Build the store, time every command, print and save the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "startup.duckdb")
        subprocess.run(
            [PATHDB, "search", "--run-name", "demo", "-t", "0.1", "-q", "--db", db],
            check=True, capture_output=True,
        )  # fmt: skip
        load_before = os.getloadavg()[0]
        rows = {}
        for label, argv in commands(db).items():
            wall, cpu = timings(argv, args.repeats)
            row = {
                "median_s": round(statistics.median(wall), 3),
                "min_s": round(min(wall), 3),
                "max_s": round(max(wall), 3),
                "median_cpu_s": round(statistics.median(cpu), 3),
            }
            rows[label] = row
            print(
                f"{label:42s} wall median {row['median_s']:.3f} s (min {row['min_s']:.3f}, "
                f"max {row['max_s']:.3f}); CPU median {row['median_cpu_s']:.3f} s"
            )
    result = {
        "repeats": args.repeats,
        "commands": rows,
        "machine": f"{platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
