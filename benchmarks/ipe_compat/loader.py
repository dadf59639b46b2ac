"""Import the reference ``ipe`` package under transformer-lens 3.9 without editing its files.

ipe 0.0.1 does ``from transformer_lens.HookedTransformerConfig import HookedTransformerConfig``;
that module moved in transformer-lens 3.x (the class now lives in ``transformer_lens.config``).
We register an alias module in ``sys.modules`` before the first ipe import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Any

_ALIAS = "transformer_lens.HookedTransformerConfig"


def _install_alias() -> None:
    """Make ``transformer_lens.HookedTransformerConfig`` importable as a module."""
    try:
        importlib.import_module(_ALIAS)
        return
    except ModuleNotFoundError:
        pass
    from transformer_lens import HookedTransformerConfig

    mod = types.ModuleType(_ALIAS)
    mod.HookedTransformerConfig = HookedTransformerConfig  # type: ignore[attr-defined]
    sys.modules[_ALIAS] = mod


def import_ipe() -> types.SimpleNamespace:
    """Import ipe's graph search, nodes and metrics; raise ImportError naming the set-up script."""
    _install_alias()
    try:
        graph_search = importlib.import_module("ipe.graph_search")
        nodes = importlib.import_module("ipe.nodes")
        metrics = importlib.import_module("ipe.metrics")
    except ModuleNotFoundError as e:
        raise ImportError(
            f"cannot import the reference package 'ipe' ({e}); create the benchmark environment "
            "with `bash benchmarks/setup_ipe_env.sh` and run with benchmarks/.venv-ipe/bin/python"
        ) from e
    return types.SimpleNamespace(graph_search=graph_search, nodes=nodes, metrics=metrics)


def ipe_version() -> str:
    """Installed ipe distribution version, or ``'source'`` when imported from a source tree."""
    try:
        return importlib.metadata.version("ipe")
    except importlib.metadata.PackageNotFoundError:
        return "source"


def versions() -> dict[str, Any]:
    """Versions of the packages that decide the numbers (for the results file)."""
    out: dict[str, Any] = {}
    for dist in ("torch", "transformer-lens", "pathdb", "duckdb"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["ipe"] = ipe_version()
    out["python"] = sys.version.split()[0]
    return out
