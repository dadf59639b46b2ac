"""Shared CLI plumbing: consoles, clean error reporting, table rendering and file output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

# Not a terminal (pipes, CI logs): a wide fixed width instead of rich's 80 columns, so tables don't fold.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

F = TypeVar("F", bound=Callable[..., Any])

DB_OPTION = typer.Option(
    "--db", help="DuckDB store file (created on first search).", envvar="PATHDB_DB"
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: shown as one clean line, never a traceback."""
    from pathdb.export import ExportError
    from pathdb.graph import GraphError
    from pathdb.metrics import MetricError
    from pathdb.models import ModelLoadError, UnsupportedModelError
    from pathdb.prompts import PromptFileError
    from pathdb.query import QueryError
    from pathdb.store.errors import StoreError
    from search.activations import UnsupportedModelError as EngineUnsupported
    from search.runner import SearchError

    return (
        ExportError, GraphError, MetricError, ModelLoadError, UnsupportedModelError,
        PromptFileError, QueryError, StoreError, EngineUnsupported, SearchError,
    )  # fmt: skip


def friendly(fn: F) -> F:
    """Turn known user errors into ``error: ...`` on stderr with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def show_frame(df: Any, *, title: str | None = None, max_rows: int = 200, floatfmt: str = "{:.4g}") -> None:
    """Print a DataFrame as a rich table (numbers right-aligned, floats compact)."""
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in df.columns:
        numeric = str(df[col].dtype).startswith(("float", "int", "Int", "Float"))
        table.add_column(str(col), justify="right" if numeric else "left", overflow="fold")
    for _, row in df.head(max_rows).iterrows():
        cells = []
        for v in row.tolist():
            if isinstance(v, float):
                cells.append("" if v != v else floatfmt.format(v))
            else:
                cells.append("" if v is None else str(v))
        table.add_row(*cells)
    out.print(table)
    if len(df) > max_rows:
        out.print(f"[dim]... {len(df) - max_rows} more rows (use --output to save all)[/]")


def emit(
    df: Any, output: Path | None, *, title: str | None = None, fmt: str | None = None,
    columns: list[str] | None = None,
) -> None:
    """Print ``df`` (only ``columns`` if given) or write all of it to ``output`` (csv/json/parquet)."""
    if output is None:
        if columns is not None:
            keep = [c for c in columns if c in df.columns and not df[c].isna().all()]
            df = df[keep]
        show_frame(df, title=title)
        return
    from pathdb.export import write_table

    path = write_table(df, output, fmt)
    err.print(f"wrote {len(df):,} rows to {path}")


def fail(message: str) -> None:
    """Exit with a clean error message."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)

