"""The README's Python example runs as written (docs must not drift from the code)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_api_block_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has a python code block"
    script = tmp_path / "readme_example.py"
    script.write_text(match.group(1))
    res = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(README.parent)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "pathdb.duckdb").exists() and (tmp_path / "circuit.json").exists()
