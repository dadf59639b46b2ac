"""Run the real ``pathdb`` CLI in a subprocess with a clean environment (no user config, no GPU vars)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pathdb(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cli.app ARGS`` in ``cwd``; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "cli.app", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )
