"""``pathdb query ...`` and ``pathdb sql``: read stored paths without touching the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import DB_OPTION, FORCE_OPTION, Rows, emit, err, fail, friendly

app = typer.Typer(
    help="Top paths, edge/node circuits, positive vs negative sub-circuits, cross-prompt statistics.",
    no_args_is_help=True,
)

RUN = Annotated[str, typer.Argument(help="Run id or name (see `pathdb runs`).")]
DB = Annotated[Path, DB_OPTION]
OUTPUT = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Write all rows to a .csv, .json or .parquet file instead of printing ('-': CSV to stdout). An existing file needs --force.",
    ),
]
FORCE = Annotated[bool, FORCE_OPTION]
POSITIONAL = Annotated[
    bool,
    typer.Option(
        "--positional/--position-free",
        help="Keep positions in node names (a3.h0<q>@10) or drop them (MIB-style a3.h0<q>).",
    ),
]
PROMPT = Annotated[
    int | None, typer.Option("--prompt", help="Only paths of this prompt index (per-prompt runs).")
]


AGG_COLUMNS = ["edge", "node", "score", "abs_score", "pos_score", "neg_score", "n_paths"]


def warn_if_partial(con: Any, run: str, db: Path) -> None:
    """Warn on stderr when ``run`` is not a finished, exhaustive search (running, interrupted,
    failed, or stopped early by --max-time), so an export of it is not mistaken for the whole result."""
    from pathdb.query.common import resolve_run

    info = resolve_run(con, run)
    ((status, reason),) = con.execute(
        "SELECT status, stop_reason FROM runs WHERE run_id = ?", [info.run_id]
    ).fetchall()
    if status != "completed":
        err.print(
            f"[yellow]warning[/]: run {info.name!r} is {status}: this is a partial result up to its "
            "last checkpoint"
            + (
                ""
                if status == "running"
                else f" (continue it with `pathdb resume {info.name} --db {db}`)"
            )
        )
    elif reason == "max_time":
        err.print(
            f"[yellow]warning[/]: run {info.name!r} was stopped by --max-time: the search is not exhaustive"
        )


@contextmanager
def reader(db: Path, *, read_only: bool = True) -> Iterator[Any]:
    """A connection to the store, read-only unless asked (clear error when the file does not exist)."""
    from pathdb.store.db import open_store

    if not db.exists():
        fail(f"no store at {db}: run `pathdb search` first, or pass --db PATH")
    with open_store(db, read_only=read_only) as store:
        yield store.con


@app.command()
@friendly
def paths(
    run: RUN,
    db: DB = Path("pathdb.duckdb"),
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="How many paths.")] = 20,
    order: Annotated[
        str, typer.Option("--order", help="abs, signed, positive or negative.")
    ] = "abs",
    all_paths: Annotated[
        bool, typer.Option("--all", help="Include partial (incomplete) paths.")
    ] = False,
    kept: Annotated[
        bool | None,
        typer.Option("--kept/--pruned", help="Only kept / only pruned paths (default both)."),
    ] = None,
    through: Annotated[
        str | None,
        typer.Option(
            "--through",
            help="Only paths through this node label or component (a3.h0, a3.h0<q>@10, m4).",
        ),
    ] = None,
    edge: Annotated[
        str | None,
        typer.Option(
            "--edge", help="Only paths using this edge 'src->dst' (labels or components)."
        ),
    ] = None,
    min_depth: Annotated[int | None, typer.Option("--min-depth")] = None,
    max_depth: Annotated[int | None, typer.Option("--max-depth")] = None,
    prompt: PROMPT = None,
    method: Annotated[
        str | None, typer.Option("--method", help="exact, attribution or confirmed.")
    ] = None,
    output: OUTPUT = None,
    force: FORCE = False,
) -> None:
    """Top paths of a run, printed as readable chains (input@3 -> a3.h0<q>@10 -> logits@14)."""
    from pathdb.query.paths import top_paths_relation

    with reader(db) as con:
        rel = top_paths_relation(
            con, run, k=top, order=order, complete=None if all_paths else True, kept=kept,
            min_depth=min_depth, max_depth=max_depth, through=through, edge=edge, prompt=prompt, method=method,
        )  # fmt: skip
        df = rel.df() if output is not None else Rows.of(rel)  # printing needs no pandas
    emit(
        df,
        output,
        title=f"top {len(df)} paths of {run} (by {order})",
        columns=["path_id", "contribution", "method", "kept", "prompt_idx", "path"],
        force=force,
    )


TOP = Annotated[
    int | None,
    typer.Option(
        "--top",
        "-k",
        min=1,
        help="Show only the k rows with the largest |signed sum| (all rows go to --output).",
    ),
]
SIGN = Annotated[
    str | None, typer.Option("--sign", help="Only paths with positive or negative contribution.")
]


def _aggregate_command(level: str, doc: str) -> None:
    """Register ``pathdb query edges`` or ``nodes``: the same options, paths aggregated onto ``level``."""

    def command(
        run: RUN,
        db: DB = Path("pathdb.duckdb"),
        positional: POSITIONAL = False,
        top: TOP = 30,
        sign: SIGN = None,
        prompt: PROMPT = None,
        output: OUTPUT = None,
        force: FORCE = False,
    ) -> None:
        from pathdb import query

        fn = query.edges if level == "edges" else query.nodes
        with reader(db) as con:
            df = fn(con, run, positional=positional, prompt=prompt, sign=sign)
        if top is not None and output is None:
            df = df.reindex(df["score"].abs().sort_values(ascending=False).index).head(top)
        emit(df, output, title=f"{level} of {run}", columns=AGG_COLUMNS, force=force)

    command.__doc__ = doc
    app.command(level)(friendly(command))


_aggregate_command(
    "edges",
    "Complete kept paths aggregated onto edges: signed, absolute, positive, negative sums and counts.",
)
_aggregate_command("nodes", "Complete kept paths aggregated onto nodes.")


@app.command()
@friendly
def circuit(
    run: RUN,
    db: DB = Path("pathdb.duckdb"),
    top_k: Annotated[
        int | None, typer.Option("--top-k", "-k", min=1, help="Keep the k best edges.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Keep edges whose score >= this.")
    ] = None,
    by: Annotated[str, typer.Option("--by", help="Rank edges by abs or signed score.")] = "abs",
    sign: Annotated[
        str | None,
        typer.Option("--sign", help="positive or negative: the circuit of those paths only."),
    ] = None,
    positional: POSITIONAL = False,
    prompt: PROMPT = None,
    output: OUTPUT = None,
    force: FORCE = False,
) -> None:
    """A circuit: selected edges (top-k or threshold) with nodes not on a path to the logits pruned."""
    from pathdb.query import circuit as q_circuit

    with reader(db) as con:
        c = q_circuit(
            con,
            run,
            top_k=top_k,
            threshold=threshold,
            by=by,
            positional=positional,
            sign=sign,
            prompt=prompt,
        )
    if c.edges.empty:
        fail(
            "the selected edges form no input -> logits chain, so the pruned circuit is empty; raise --top-k or lower --threshold"
        )
    emit(
        c.edges,
        output,
        title=f"circuit of {run}: {len(c.edges)} edges, {len(c.nodes)} nodes",
        columns=AGG_COLUMNS,
        force=force,
    )


@app.command()
@friendly
def signed(
    run: RUN,
    db: DB = Path("pathdb.duckdb"),
    top: Annotated[
        int | None, typer.Option("--top", "-k", min=1, help="Top-k edges of each sub-circuit.")
    ] = 10,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Keep edges whose |score| >= this.")
    ] = None,
    positional: POSITIONAL = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune/--no-prune",
            help="Keep only edges on an input -> logits chain of selected edges (a circuit), or list the strongest edges of each sign.",
        ),
    ] = False,
    prompt: PROMPT = None,
    output: OUTPUT = None,
    force: FORCE = False,
) -> None:
    """Positive vs negative sub-circuits side by side: the strongest edges of the paths that push the
    metric up and of those that push it down (an edge can belong to both)."""
    from pathdb.query import signed_circuits

    with reader(db) as con:
        df = signed_circuits(
            con,
            run,
            top_k=top,
            threshold=threshold,
            positional=positional,
            prompt=prompt,
            prune=prune,
        )
    emit(
        df,
        output,
        title=f"positive vs negative sub-circuits of {run} (top {top} edges each)",
        columns=[
            "edge",
            "positive_score",
            "negative_score",
            "positive_n_paths",
            "negative_n_paths",
        ],
        force=force,
    )


@app.command()
@friendly
def stats(
    runs: Annotated[
        list[str], typer.Argument(help="One or more per-prompt runs (ids or names) to pool.")
    ],
    db: DB = Path("pathdb.duckdb"),
    level: Annotated[str, typer.Option("--level", help="edges, nodes or paths.")] = "edges",
    align: Annotated[
        str,
        typer.Option(
            "--align",
            help="auto (roles when the prompts have them), roles, or none (position-free).",
        ),
    ] = "auto",
    top: Annotated[
        int | None, typer.Option("--top", "-k", min=1, help="Show the k most frequent/strong rows.")
    ] = 30,
    output: OUTPUT = None,
    force: FORCE = False,
) -> None:
    """Cross-prompt statistics of per-prompt runs: mean, std, min, max, frequency, sign consistency."""
    from pathdb.query import cross_prompt_edges, cross_prompt_nodes, cross_prompt_paths

    fns = {"edges": cross_prompt_edges, "nodes": cross_prompt_nodes, "paths": cross_prompt_paths}
    if level not in fns:
        fail(f"--level must be one of {', '.join(fns)} (got {level!r})")
    with reader(db) as con:
        df = fns[level](con, runs, align=align)
    if top is not None and output is None:
        df = df.head(top)
    emit(df, output, title=f"cross-prompt {level} statistics", force=force)


@friendly
def sql_command(
    query: Annotated[
        str,
        typer.Argument(
            help="SQL over the store. Views: v_runs, v_paths, v_path_nodes, v_path_edges, v_path_strings; tables: runs, prompts, nodes, paths."
        ),
    ],
    db: DB = Path("pathdb.duckdb"),
    write: Annotated[
        bool,
        typer.Option(
            "--write",
            help="Unrestricted DuckDB: statements may modify the store, read and write other files, and install or load extensions.",
        ),
    ] = False,
    output: OUTPUT = None,
    force: FORCE = False,
) -> None:
    """Ad-hoc SQL over the store: read-only unless --write (queries only; no file but the store is read, none is written, no extension is loaded).

    Example: pathdb sql "SELECT path, contribution FROM v_path_strings WHERE complete ORDER BY abs(contribution) DESC LIMIT 10"
    """
    from pathdb.query.sql import sql as q_sql
    from pathdb.query.sql import sql_rows

    with reader(db, read_only=not write) as con:
        try:
            if output is None:  # printing needs no pandas
                res = sql_rows(con, query, read_only=not write)
                df: Any = None if res is None else Rows.typed(*res)
            else:
                df = q_sql(con, query, read_only=not write)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: the SQL query was stopped")
            raise typer.Exit(130) from None
    # DuckDB answers CREATE, DROP, SET, ... (--write only) with an empty Count or Success column
    status_only = write and list(df.columns if df is not None else []) in (["Count"], ["Success"])
    if df is None or (df.empty and (len(df.columns) == 0 or status_only)):
        err.print("ok: the statement returned no result set")
        return
    emit(df, output, force=force)


app.command("sql")(sql_command)
