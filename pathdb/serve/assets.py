"""Where the explorer's files are: its own page, script and stylesheet (``static/``), and the
plotly.js bundle shipped inside the ``plotly`` Python package (found without importing plotly)."""

from __future__ import annotations

from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path

from pathdb.store.errors import StoreError

STATIC = Path(str(files("pathdb.serve") / "static"))


def plotly_js() -> Path:
    """The plotly.js bundle of the installed ``plotly`` package: the page's only third-party
    code, served by ``pathdb serve`` and inlined by the HTML export (never fetched from a CDN)."""
    spec = find_spec("plotly")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise StoreError(
        "plotly.js not found: the explorer needs the `plotly` package (pip install plotly)"
    )
