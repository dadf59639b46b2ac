"""Simulated Ctrl-C for resume tests: interrupt a search at a chosen checkpoint opportunity."""

from __future__ import annotations

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
