"""How many CPU threads torch uses during a search: one default for the CLI and the Python API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The engine issues many small tensor operations; on shared or loaded CPUs extra threads mostly
# add synchronisation (measured: find_paths 28 s at torch's default vs 2.9 s at 1 thread on a busy
# 2-core machine), so 1 is the default everywhere. Large models on an idle machine may gain from more.
DEFAULT_THREADS = 1


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)`` and restore the previous count afterwards
    (``None`` leaves torch's setting alone; anything but an integer >= 1 is refused first)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(
            f"threads must be an integer >= 1, or None to keep torch's setting (got {n!r})"
        )
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
