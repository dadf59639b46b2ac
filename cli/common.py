"""Shared CLI plumbing: consoles, clean error reporting, table rendering and file output."""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import duckdb

# Not a terminal (pipes, CI logs): a wide fixed width instead of rich's 80 columns, so tables don't fold.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

F = TypeVar("F", bound=Callable[..., Any])

DB_OPTION = typer.Option(
    "--db", help="DuckDB store file (created on first search).", envvar="PATHDB_DB"
)
FORCE_OPTION = typer.Option("--force", help="Overwrite the output file if it exists.")
# Options shared by the commands that run a model on prompts and store a run (search, attribute).
PROMPTS = "Prompts"
PROMPT_OPTION = typer.Option(
    "--prompt", help="A single clean prompt instead of a prompt set.", rich_help_panel=PROMPTS
)
STORE = "Store"
RUN_NAME_OPTION = typer.Option(
    "--run-name", "-n", help="Name of the run (default run-<id>).", rich_help_panel=STORE
)
REPLACE_OPTION = typer.Option(
    "--replace",
    help="Overwrite an existing run of the same --run-name.",
    rich_help_panel=STORE,
)

STDOUT = "-"


# (defining module, class) of every exception type that means bad input.
_USER_ERRORS = (
    ("pathdb.export.common", "ExportError"), ("pathdb.graph", "GraphError"),
    ("pathdb.metrics", "MetricError"), ("pathdb.models.loading", "ModelLoadError"),
    ("pathdb.models.loading", "UnsupportedModelError"), ("pathdb.prompts", "PromptFileError"),
    ("pathdb.query.common", "QueryError"), ("pathdb.store.errors", "StoreError"),
    ("search.activations", "UnsupportedModelError"), ("search.runner", "SearchError"),
)  # fmt: skip


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: shown as one clean line, never a traceback.

    Only those whose module is already imported: an exception of a class never imported cannot
    be in flight, and importing them all (search.* loads torch) would cost seconds on every error
    and on every Ctrl-C of a read command.
    """
    return tuple(
        getattr(sys.modules[mod], name) for mod, name in _USER_ERRORS if mod in sys.modules
    )


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


_NUMERIC_TYPES = {
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
    "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL",
}  # fmt: skip


@dataclass(frozen=True)
class Rows:
    """A fetched DuckDB result: read commands print it without importing pandas (~0.4 s)."""

    columns: list[str]
    numeric: list[bool]
    rows: list[tuple[Any, ...]]

    @classmethod
    def of(cls, rel: duckdb.DuckDBPyRelation) -> Rows:
        """Fetch all rows of ``rel`` (before its connection closes)."""
        return cls.typed(list(rel.columns), [str(t) for t in rel.types], rel.fetchall())

    @classmethod
    def typed(cls, columns: list[str], types: list[str], rows: list[tuple[Any, ...]]) -> Rows:
        """Rows whose columns have these DuckDB type names (``DOUBLE``, ``DECIMAL(5,2)``, ...)."""
        return cls(columns, [t.split("(")[0] in _NUMERIC_TYPES for t in types], rows)

    @property
    def empty(self) -> bool:
        """True when there are no rows (as ``DataFrame.empty``)."""
        return not self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def has_values(self, column: str) -> bool:
        """True when ``column`` exists and is not NULL in some row."""
        i = self.columns.index(column) if column in self.columns else -1
        return i >= 0 and any(r[i] is not None for r in self.rows)

    def select(self, columns: Sequence[str]) -> Rows:
        """Only ``columns`` (in that order; names that do not exist are skipped)."""
        idx = [self.columns.index(c) for c in columns if c in self.columns]
        return Rows(
            [self.columns[i] for i in idx],
            [self.numeric[i] for i in idx],
            [tuple(r[i] for i in idx) for r in self.rows],
        )


def _print_table(
    title: str | None, columns: Sequence[str], numeric: Sequence[bool],
    rows: Iterable[Sequence[Any]], total: int, max_rows: int, floatfmt: str,
) -> None:  # fmt: skip
    """A rich table: numbers right-aligned, floats compact, NULL/NaN blank; then how many rows were
    cut. Names and values are plain text (``score [group]`` is data, not rich markup)."""
    table = Table(title=title, show_lines=False, header_style="bold")
    for col, num in zip(columns, numeric, strict=True):
        table.add_column(Text(col), justify="right" if num else "left", overflow="fold")
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(Text("" if v != v else floatfmt.format(v)))
            else:
                cells.append(Text("" if v is None else str(v)))
        table.add_row(*cells)
    out.print(table)
    if total > max_rows:
        out.print(f"[dim]... {total - max_rows} more rows (use --output to save all)[/]")


def show_frame(
    df: Any, *, title: str | None = None, max_rows: int = 200, floatfmt: str = "{:.4g}"
) -> None:
    """Print a DataFrame as a rich table (numbers right-aligned, floats compact)."""
    numeric = [str(df[c].dtype).startswith(("float", "int", "Int", "Float")) for c in df.columns]
    rows = (row.tolist() for _, row in df.head(max_rows).iterrows())
    _print_table(title, [str(c) for c in df.columns], numeric, rows, len(df), max_rows, floatfmt)


def show_rows(
    rows: Rows, *, title: str | None = None, max_rows: int = 200, floatfmt: str = "{:.4g}"
) -> None:
    """Print fetched :class:`Rows` like :func:`show_frame`."""
    _print_table(
        title, rows.columns, rows.numeric, rows.rows[:max_rows], len(rows), max_rows, floatfmt
    )


def check_suffix(output: Path, family: str, allowed: tuple[str, ...]) -> None:
    """Refuse an ``-o`` file whose suffix is not one of the chosen format's (``-o c.json -f parquet``)."""
    if str(output) == STDOUT:
        return
    suffix = output.suffix.lower()
    if suffix not in allowed:
        fail(
            f"{output} has suffix {suffix or '(none)'} but the format is {family}; "
            f"name the file {output.with_suffix(allowed[0]).name} or change --format"
        )


@contextmanager
def output_file(output: Path, *, force: bool, suffix: str, text: bool = True) -> Iterator[Path]:
    """The path a command writes to: refuses an existing file without ``--force``; ``-`` means stdout.

    For ``-`` the writer gets a temporary file whose bytes are copied to stdout afterwards, so every
    exporter streams to stdout through one code path (binary formats are refused).
    """
    if str(output) == STDOUT:
        if not text:
            fail(
                f"a {suffix} file is binary and cannot go to stdout; give a file with -o FILE{suffix}"
            )
        with tempfile.TemporaryDirectory(prefix="pathdb-") as tmp:
            path = Path(tmp) / f"stdout{suffix}"
            yield path
            sys.stdout.flush()
            sys.stdout.buffer.write(path.read_bytes())
            sys.stdout.buffer.flush()
        return
    if output.exists() and not force:
        fail(f"{output} already exists; pass --force to overwrite it, or choose another -o file")
    yield output


def describe_output(output: Path) -> str:
    """How a status line names where output went."""
    return "stdout" if str(output) == STDOUT else str(output)


def emit(
    df: Any,
    output: Path | None,
    *,
    title: str | None = None,
    force: bool = False,
    columns: list[str] | None = None,
) -> None:
    """Print ``df`` (a DataFrame, or :class:`Rows` when printing; only ``columns`` if given) or
    write all of it to ``output`` (csv/json/parquet; ``-`` writes CSV to stdout)."""
    if df.empty:
        err.print("no rows: nothing matches these filters (nothing written)")
        raise typer.Exit(1)
    if output is None:
        if isinstance(df, Rows):
            keep = None if columns is None else [c for c in columns if df.has_values(c)]
            show_rows(df if keep is None else df.select(keep), title=title)
            return
        if columns is not None:
            keep = [c for c in columns if c in df.columns and not df[c].isna().all()]
            df = df[keep]
        show_frame(df, title=title)
        return
    from pathdb.export import write_table

    suffix = ".csv" if str(output) == STDOUT else output.suffix.lower()
    with output_file(output, force=force, suffix=suffix) as path:  # stdout is always CSV text
        write_table(df, path)
    err.print(f"wrote {len(df):,} rows to {describe_output(output)}")


def check_one_prompt_source(prompts: object, prompt: str | None) -> None:
    """Refuse a prompt set (``-p``) and a single ``--prompt`` given together."""
    if prompt is not None and prompts is not None:
        fail("give either a prompt set (-p/--prompts) or a single --prompt, not both")


def fail(message: str) -> None:
    """Exit with a clean error message."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)
