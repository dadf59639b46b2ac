"""The README's Python example runs end to end and writes what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quickstart_example(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "examples" / "quickstart.py"
    res = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--max-depth", "3"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "complete paths kept" in res.stdout and "-> logits@14" in res.stdout
    assert "custom metric" in res.stdout
    eap = json.loads((tmp_path / "circuit.json").read_text())
    assert set(eap) == {"cfg", "nodes", "edges"} and eap["cfg"]["n_layers"] == 4
    assert (tmp_path / "circuit.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (tmp_path / "circuit.graphml").stat().st_size > 0
