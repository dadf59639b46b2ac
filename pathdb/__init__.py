"""pathdb: find the computational paths that carry a behaviour in transformer LMs and keep them in DuckDB.

The library side (graph model, models, prompts, metrics, store, queries, exports); the search
engine lives in the sibling package ``search`` and the command line in ``cli``.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``__version__``, read from the installed metadata on first use (not on every import)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("pathdb")
    except PackageNotFoundError:  # running from a source tree without installation
        value = "0.0.0+source"
    globals()["__version__"] = value
    return value
