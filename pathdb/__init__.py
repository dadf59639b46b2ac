"""pathdb: find the computational paths that carry a behaviour in transformer LMs and keep them in DuckDB.

The library side (graph model, models, prompts, metrics, store, queries, exports); the search
engine lives in the sibling package ``search`` and the command line in ``cli``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pathdb")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
