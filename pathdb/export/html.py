"""A self-contained interactive HTML circuit (``pathdb export RUN -o circuit.html``): one file
with the explorer's circuit view, its data, and plotly.js inlined, so it opens from disk with
no server and no network (to attach to a paper or send to a colleague).

The file carries the strongest edges of each sign (as the explorer's ``/edges`` answer) and the
top paths (by |score|) through the strongest edges and their nodes, so hovering and clicking work
offline; other clicks name the ``pathdb query paths`` command that lists them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from pathdb.export.common import output_path, write_text

#: edges (and the nodes they touch) whose top paths the file embeds (both signs, by |score|)
PATHS_EDGES = 15
#: top paths embedded per edge or node
PATHS_PER_ITEM = 20


def export_data(con: duckdb.DuckDBPyConnection, run: str | int, *, k: int = 30) -> dict[str, Any]:
    """Everything the offline circuit view needs: edges and node scores per sign, top paths."""
    from pathdb.query.common import resolve_run
    from pathdb.serve.data import (
        MAX_EDGES,
        SIGNS,
        edge_view,
        node_view,
        paths_view,
        run_summary,
    )  # fmt: skip

    info = resolve_run(con, run)
    views = {s: edge_view(con, info.run_id, sign=s, limit=MAX_EDGES) for s in SIGNS}
    node_stats = {
        s: node_view(con, info.run_id, sign=s, names=[n["node"] for n in v["nodes"]])["nodes"]
        for s, v in views.items()
    }
    top = views["both"]["edges"][:PATHS_EDGES]
    items = [("edge", e["edge"]) for e in top]
    items += [("through", n) for n in dict.fromkeys(x for e in top for x in (e["src"], e["dst"]))]
    paths = {
        "both": {
            f"{what}:{spec}": paths_view(con, info.run_id, k=PATHS_PER_ITEM, **{what: spec})[
                "paths"
            ]
            for what, spec in items
        }
    }
    return {
        "run": run_summary(con, info),
        "k": k,
        "views": views,
        "node_stats": node_stats,
        "paths": paths,
        "paths_edges": PATHS_EDGES,
    }


def _script(code: str) -> str:
    """``code`` inside a <script> element (a literal ``</script`` would end it early)."""
    return (
        "<script>" + code.replace("</script", "<\\/script").replace("<!--", "<\\!--") + "</script>"
    )


def to_html(payload: dict[str, Any], *, title: str | None = None) -> str:
    """The explorer page with its stylesheet, plotly.js, ``payload`` and app.js inlined."""
    from pathdb.serve.assets import STATIC, plotly_js

    page = (STATIC / "index.html").read_text(encoding="utf-8")
    css = (STATIC / "style.css").read_text(encoding="utf-8")
    data = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    heading = title or f"pathdb circuit: run {payload['run'].get('name')}"
    replacements = {
        '<link rel="stylesheet" href="static/style.css">': f"<style>{css}</style>",
        '<script src="static/plotly.min.js"></script>': _script(
            plotly_js().read_text(encoding="utf-8")
        ),
        '<script src="static/app.js"></script>': _script(f"window.PATHDB_EXPORT = {data};")
        + _script((STATIC / "app.js").read_text(encoding="utf-8")),
        "<title>pathdb explorer</title>": f"<title>{_escape(heading)}</title>",
        '<a id="home" href="#/">pathdb explorer</a>': f'<span id="home">{_escape(heading)}</span>',
    }
    for old, new in replacements.items():
        if old not in page:
            raise RuntimeError(f"static/index.html lost its {old!r} line; the export needs it")
        page = page.replace(old, new)
    return page


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def write_html(
    con: duckdb.DuckDBPyConnection,
    run: str | int,
    path: str | Path,
    *,
    k: int = 30,
    title: str | None = None,
) -> Path:
    """Write the self-contained interactive circuit of ``run`` to ``path`` (``.html``), with
    the slider starting at ``k`` edges."""
    p, _ = output_path(path, {".html": "html", ".htm": "html"})
    write_text(p, to_html(export_data(con, run, k=k), title=title))
    return p
