"""The explorer's web application (Starlette): the page, its static files, and a JSON API over a
pathdb store opened read-only for each request.

The store file is opened per request and closed right after, so a search writing the store
gets the file back between requests (and the page sees every checkpoint on refresh). Requests
take turns on one lock; answers that aggregate a whole run (the circuit's edges, cross-prompt
statistics) are cached until the run's status, path count or last batch changes.

API (``RUN`` is a run id or name; errors answer ``{"error": "one line"}``):

``GET /api/runs``                                  the runs listing (``pathdb runs``)
``GET /api/runs/RUN/edges?sign=&positional=&limit=``  strongest edges + the nodes they touch
``GET /api/runs/RUN/nodes?sign=&positional=``        those nodes' scores (after the first paint)
``GET /api/runs/RUN/paths?edge=|through=&k=&order=``   top complete paths through an edge / node
``GET /api/runs/RUN/tree?parent=&limit=``           one level of the search tree
``GET /api/runs/RUN/crossprompt?top=``              edge x prompt heatmap of a per-prompt run
``GET /api/runs/RUN/faithfulness``                  the latest stored evaluation's curves
``GET /api/compare?a=RUN&b=RUN&k=``                 two runs' ``pathdb compare`` numbers and curves
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pathdb.query.common import QueryError, resolve_run
from pathdb.serve import data
from pathdb.serve.assets import STATIC, plotly_js
from pathdb.store.db import open_store
from pathdb.store.errors import StoreError

_CACHE_SIZE = 64


class Explorer:
    """The application state: the store path, a lock and a small cache of run aggregates."""

    def __init__(self, db: Path) -> None:
        self.db = Path(db)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def answer(
        self, fn: Callable[..., Any], run: str | int | None, key: tuple[Any, ...] | None, **kw: Any
    ) -> Any:
        """Open the store read-only, compute ``fn(con, run, **kw)`` (or ``fn(con)``) and close it;
        with a ``key``, reuse the answer while the run's state is unchanged."""
        with self._lock, open_store(self.db, read_only=True) as store:
            con = store.con
            if run is None:
                return fn(con, **kw)
            info = resolve_run(con, run)
            full = None if key is None else (*key, *data.run_state(con, info))
            if full is not None and full in self._cache:
                self._cache.move_to_end(full)
                return self._cache[full]
            result = fn(con, info.run_id, **kw)
            if full is not None:
                self._cache[full] = result
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            return result

    def _tables(
        self, con: duckdb.DuckDBPyConnection, run_id: int, sign: str, positional: bool
    ) -> data.Tables:
        """A circuit view's strongest edges, edge count and nodes (:func:`data.circuit_tables`, one
        walk of the path tree), cached per run state: the edges paint first, the node scores
        reuse them."""
        key = ("tables", sign, positional, *data.run_state(con, resolve_run(con, run_id)))
        if key not in self._cache:
            self._cache[key] = data.circuit_tables(con, run_id, sign=sign, positional=positional)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        tables: data.Tables = self._cache[key]
        return tables

    def edges(
        self, run: str | int, sign: str, positional: bool, limit: int = data.MAX_EDGES
    ) -> Any:
        """The circuit view's edges (:func:`data.edge_view`), cached per run state."""
        return self.answer(
            lambda con, rid: data.edge_view(
                con, rid, sign=sign, positional=positional, limit=limit,
                tables=self._tables(con, rid, sign, positional),
            ),
            run, ("edges", sign, positional, limit),
        )  # fmt: skip

    def node_scores(self, run: str | int, sign: str, positional: bool) -> Any:
        """Scores of the nodes the circuit view draws (:func:`data.node_view`), cached."""
        names = sorted(n["node"] for n in self.edges(run, sign, positional)["nodes"])
        return self.answer(
            lambda con, rid: data.node_view(
                con, rid, sign=sign, positional=positional, names=names,
                tables=self._tables(con, rid, sign, positional),
            ),
            run, ("nodes", sign, positional, *names),
        )  # fmt: skip

    def warm(self) -> None:
        """Compute every run's first circuit answers (edges, then node scores) ahead of the
        first page view (the server starts this in the background); runs that cannot be
        aggregated are left alone."""
        try:
            run_ids = self.answer(lambda con: [r["run_id"] for r in data.runs(con)], None, None)
        except StoreError:
            return
        for rid in run_ids:
            try:
                self.edges(rid, "both", False)
                self.node_scores(rid, "both", False)
            except (QueryError, StoreError):
                continue


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _int(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise QueryError(f"{name}={raw!r} is not an integer") from None


def _bool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise QueryError(f"{name}={raw!r}: use 0/1 or true/false")
    return raw in ("1", "true")


def create_app(db: Path, *, warm: bool = False) -> Starlette:
    """The explorer application over the store at ``db`` (checked by the caller); ``warm``
    computes each run's first circuit answer in a background thread right away."""
    ex = Explorer(db)
    if warm:
        threading.Thread(target=ex.warm, name="pathdb-serve-warm", daemon=True).start()

    def api(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """Run ``handler`` in a worker thread and turn its failures into one-line JSON errors."""

        async def endpoint(request: Request) -> Response:
            from starlette.concurrency import run_in_threadpool

            try:
                return JSONResponse(await run_in_threadpool(handler, request))
            except QueryError as e:
                return _error(404 if str(e).startswith("unknown run") else 400, str(e))
            except StoreError as e:
                return _error(503, str(e))
            except Exception as e:  # an unexpected failure still answers one line, no traceback
                return _error(500, f"{type(e).__name__}: {e}")

        return endpoint

    def runs(request: Request) -> Any:
        return {"db": str(ex.db), "runs": ex.answer(data.runs, None, None)}

    def edges(request: Request) -> Any:
        q = request.query_params
        limit = _int(request, "limit", data.MAX_EDGES)
        assert limit is not None
        return ex.edges(
            request.path_params["run"], q.get("sign", "both"), _bool(request, "positional"), limit
        )

    def node_scores(request: Request) -> Any:
        q = request.query_params
        return ex.node_scores(
            request.path_params["run"], q.get("sign", "both"), _bool(request, "positional")
        )

    def paths(request: Request) -> Any:
        q = request.query_params
        if (q.get("edge") is None) == (q.get("through") is None):
            raise QueryError("give exactly one of edge=SRC->DST or through=NODE")
        return ex.answer(
            data.paths_view, request.path_params["run"], None, edge=q.get("edge"),
            through=q.get("through"), k=_int(request, "k", 20), order=q.get("order", "abs"),
        )  # fmt: skip

    def tree(request: Request) -> Any:
        return ex.answer(
            data.tree_level, request.path_params["run"], None, parent=_int(request, "parent", None),
            limit=_int(request, "limit", data.MAX_CHILDREN),
        )  # fmt: skip

    def crossprompt(request: Request) -> Any:
        top = _int(request, "top", 30)
        return ex.answer(
            data.cross_prompt_view, request.path_params["run"], ("cross", top), top=top
        )

    def faithfulness(request: Request) -> Any:
        return ex.answer(data.faithfulness_view, request.path_params["run"], None)

    def compare(request: Request) -> Any:
        q = request.query_params
        if not q.get("a") or not q.get("b"):
            raise QueryError("give two runs: /api/compare?a=RUN&b=RUN (ids or names)")
        return ex.answer(
            data.compare_view, None, None, a=q["a"], b=q["b"], top_k=_int(request, "k", 50)
        )

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def plotly(request: Request) -> Response:
        return FileResponse(plotly_js(), media_type="text/javascript")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ("app.js", "style.css"):
            return _error(404, f"no static file {name!r}")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return FileResponse(STATIC / name, media_type=kind)

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no page {request.url.path!r}; the explorer starts at /")

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/static/plotly.min.js", plotly),
        Route("/static/{name}", asset),
        Route("/api/runs", api(runs)),
        Route("/api/runs/{run}/edges", api(edges)),
        Route("/api/runs/{run}/nodes", api(node_scores)),
        Route("/api/runs/{run}/paths", api(paths)),
        Route("/api/runs/{run}/tree", api(tree)),
        Route("/api/runs/{run}/crossprompt", api(crossprompt)),
        Route("/api/runs/{run}/faithfulness", api(faithfulness)),
        Route("/api/compare", api(compare)),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found})
