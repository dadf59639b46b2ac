"""Interrupting searches in tests: a simulated Ctrl-C at a chosen checkpoint opportunity, and a
CLI search slow enough to interrupt for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search.strategies import SearchRun


def interrupt_on_checkpoint(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th checkpoint opportunity raise KeyboardInterrupt (as Ctrl-C would)."""
    calls = {"n": 0}
    original = SearchRun._maybe_checkpoint

    def interrupt(self: SearchRun, frontier: object) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        original(self, frontier)  # type: ignore[arg-type]

    monkeypatch.setattr(SearchRun, "_maybe_checkpoint", interrupt)


PATHDB = [sys.executable, "-m", "cli.app"]
# A CLI search of several seconds on the toy model, checkpointing every 0.2 s.
SLOW_SEARCH = [
    "search",
    "-m",
    "toy-ioi",
    "-p",
    "toy-ioi-small",
    "--split-kv",
    "-t",
    "0.003",
    "--checkpoint-every",
    "0.2",
]


def run_cli(*args: str, db: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``pathdb ARGS --db DB`` in this environment, output captured as text."""
    return subprocess.run(
        [*PATHDB, *args, "--db", str(db)], capture_output=True, text=True, timeout=timeout
    )
