"""Live progress on stderr for long searches (rich), silent when asked or when stderr is not a TTY."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.text import Text

from search.strategies import SearchStats


class SearchProgress:
    """A one-line live status: strategy, prompt, depth, frontier, evaluations and rate."""

    def __init__(self, label: str, *, quiet: bool = False, refresh_s: float = 0.25) -> None:
        self.label = label
        self.quiet = quiet
        self.refresh_s = refresh_s
        self.console = Console(stderr=True)
        self.enabled = not quiet and self.console.is_terminal
        self._live: Live | None = None
        self._last = 0.0
        self.prefix = ""

    def __enter__(self) -> SearchProgress:
        if self.enabled:
            self._live = Live(
                Text(self.label), console=self.console, refresh_per_second=8, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(et, ev, tb)
            self._live = None

    def __call__(self, stats: SearchStats) -> None:
        """Update the status line (rate-limited)."""
        now = time.perf_counter()
        if now - self._last < self.refresh_s:
            return
        self._last = now
        text = (
            f"{self.label}{self.prefix}  depth {stats.depth}  frontier {stats.frontier:,}  "
            f"evaluated {stats.evaluated:,} ({stats.rate:,.0f}/s)  complete kept {stats.kept_complete:,}"
        )
        if self._live is not None:
            self._live.update(Text(text, style="cyan"))

    def message(self, text: str) -> None:
        """Print a line above the live status (or plainly to stderr when not a terminal)."""
        if self.quiet:
            return
        if self._live is not None:
            self._live.console.print(text)
        else:
            print(text, file=sys.stderr)
