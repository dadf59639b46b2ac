"""Ad-hoc SQL over the store, read-only unless asked, with clean one-line error messages.

Read-only mode has two layers. Here, every statement is classified before anything runs: only
queries (SELECT and its forms, PIVOT, EXPLAIN of a query, read-only PRAGMAs) pass; EXPLAIN
ANALYZE executes its inner statement, so that statement is classified too. Underneath, a store
opened with ``open_store(path, read_only=True)`` has a DuckDB connection that cannot write the
file, read or write any other file, install or load extensions, or change settings
(:data:`pathdb.store.db.READ_ONLY_CONFIG`), whatever the SQL says.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

from pathdb.query.common import QueryError

if TYPE_CHECKING:
    import pandas as pd

_QUERY_TYPES = {"SELECT", "RELATION"}
# Statements DuckDB splits into several (PIVOT creates a type, then selects): allowed when they
# start with one of these words, so CREATE TABLE ... AS PIVOT stays refused.
_MULTI_READ_WORDS = {"PIVOT", "PIVOT_WIDER", "UNPIVOT", "PIVOT_LONGER", "WITH", "FROM", "SELECT", "("}  # fmt: skip
# PRAGMAs that only report; the others change settings or the database.
_READ_PRAGMAS = {
    "table_info", "storage_info", "show", "show_tables", "show_tables_expanded", "show_databases",
    "database_list", "database_size", "version", "platform", "functions", "collations",
    "metadata_info", "user_agent",
}  # fmt: skip
_EXPLAIN_OPTION_WORDS = {"ANALYZE", "ANALYSE", "FORMAT"}
_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)  # whitespace and comments
_WORD = re.compile(r"\(|[A-Za-z_]+")
_OPTIONS = re.compile(r"\(([^()]*)\)")
_WRITE_HINT = "pass read_only=False (CLI: --write) to run it"
T = TypeVar("T")


def _skip_noise(text: str, pos: int) -> int:
    """The index of the first character at or after ``pos`` that is not whitespace or comment."""
    m = _NOISE.match(text, pos)
    return m.end() if m else pos


def _first_word(text: str, pos: int = 0) -> tuple[str, int]:
    """The first keyword (or '(') at or after ``pos``, skipping comments; and the index after it."""
    pos = _skip_noise(text, pos)
    m = _WORD.match(text, pos)
    return (m.group(0).upper(), m.end()) if m else ("", pos)


def _explained(text: str) -> str:
    """The statement inside ``EXPLAIN [ANALYZE] [(options)] statement``."""
    _, pos = _first_word(text)  # EXPLAIN
    word, after = _first_word(text, pos)
    if word in ("ANALYZE", "ANALYSE"):
        pos = after
        word = _first_word(text, pos)[0]
    if word == "(":
        opts = _OPTIONS.match(text, _skip_noise(text, pos))
        if opts and _first_word(opts.group(1))[0] in _EXPLAIN_OPTION_WORDS:
            pos = opts.end()
    return text[pos:]


def _refuse_writes(con: duckdb.DuckDBPyConnection, statement: duckdb.Statement, text: str) -> None:
    """Raise :class:`QueryError` unless ``statement`` (source ``text``) only reads."""
    word = _first_word(text)[0]
    try:
        kind = str(statement.type).rsplit(".", 1)[-1]
    except ValueError:  # a type the Python client cannot name (UPDATE EXTENSIONS is 29)
        raise _refusal(word, text) from None
    if kind == "EXPLAIN" or (kind == "MULTI" and word == "EXPLAIN"):  # EXPLAIN PIVOT is MULTI
        inner = _explained(text)
        try:
            inner_statements = con.extract_statements(inner)
        except (duckdb.Error, ValueError):
            inner_statements = []
        if len(inner_statements) != 1:
            raise QueryError(
                f"cannot tell what this EXPLAIN runs ({_snippet(text)}); {_WRITE_HINT}"
            )
        _refuse_writes(con, inner_statements[0], inner)
        return
    if kind in _QUERY_TYPES or (kind == "MULTI" and word in _MULTI_READ_WORDS):
        return
    if kind == "PRAGMA":
        name = _first_word(text, _first_word(text)[1])[0].lower()
        if name in _READ_PRAGMAS:
            return
    raise _refusal(kind, text)


def _refusal(kind: str, text: str) -> QueryError:
    return QueryError(
        f"{kind} statements are not allowed in read-only mode ({_snippet(text)}); "
        "read-only SQL runs queries only (SELECT, WITH, PIVOT, DESCRIBE, SUMMARIZE, EXPLAIN of a "
        f"query); {_WRITE_HINT}"
    )


def _snippet(text: str) -> str:
    return repr(" ".join(text.split())[:60])


def _one_line(exc: BaseException) -> str:
    """DuckDB's message without its multi-line source excerpt."""
    return next(
        (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )


def _interruptible(con: duckdb.DuckDBPyConnection, work: Callable[[], T]) -> T:
    """Run ``work`` (DuckDB calls on ``con``) in a helper thread, so that Ctrl-C stops the query.

    DuckDB does not poll for signals while a query runs and Python runs signal handlers only on
    the main thread between bytecodes, so a query on the main thread would ignore Ctrl-C until
    it finished. Waiting on the helper thread instead lets KeyboardInterrupt arrive at once; the
    query is then cancelled with ``con.interrupt()`` and the KeyboardInterrupt re-raised.
    """
    if threading.current_thread() is not threading.main_thread():
        return work()
    box: dict[str, T] = {}
    errors: list[BaseException] = []
    done = threading.Event()  # not Thread.join: an interrupted join marks a live thread stopped

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # handed to the waiting thread
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=target, name="pathdb-sql", daemon=True).start()
    try:
        done.wait()
    except KeyboardInterrupt:
        while not done.is_set():  # more Ctrl-C while the query winds down: keep waiting
            con.interrupt()
            with contextlib.suppress(KeyboardInterrupt):
                done.wait()
        raise
    if errors:
        raise errors[0]
    return box["value"]


def sql(con: duckdb.DuckDBPyConnection, query: str, *, read_only: bool = True) -> pd.DataFrame:
    """Run ``query`` (one or more statements) and return the last result as a DataFrame.

    With ``read_only`` (the default) any statement that is not a query (INSERT, UPDATE, DELETE,
    CREATE, DROP, ALTER, COPY, ATTACH, SET, INSTALL, EXPLAIN ANALYZE of any of those, ...) is
    refused before anything runs. Ctrl-C (KeyboardInterrupt) stops a running query. That a query
    cannot read other files or load extensions comes from the connection: use one from
    ``open_store(path, read_only=True)`` (as ``pathdb sql`` does).
    """
    import pandas as pd

    df = _execute(con, query, read_only, lambda cur: cur.df())
    return pd.DataFrame() if df is None else df


def sql_rows(
    con: duckdb.DuckDBPyConnection, query: str, *, read_only: bool = True
) -> tuple[list[str], list[str], list[tuple[Any, ...]]] | None:
    """:func:`sql` without pandas: column names, DuckDB type names and rows of the last result
    (None when the last statement returns no result set)."""

    def fetch(cur: duckdb.DuckDBPyConnection) -> tuple[list[str], list[str], list[tuple[Any, ...]]]:
        desc = cur.description or []
        return [d[0] for d in desc], [str(d[1]) for d in desc], cur.fetchall()

    return _execute(con, query, read_only, fetch)


def _execute(
    con: duckdb.DuckDBPyConnection,
    query: str,
    read_only: bool,
    fetch: Callable[[duckdb.DuckDBPyConnection], T],
) -> T | None:
    """Check ``query``, run its statements in order and ``fetch`` the last one's result."""
    if not query.strip():
        raise QueryError("empty SQL query")
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(f"invalid SQL: {_one_line(e)}") from None
    if not statements:
        raise QueryError("empty SQL query")
    if read_only:
        for st in statements:
            _refuse_writes(con, st, st.query)

    def run(text: str) -> T | None:
        cur = con.execute(text)
        return fetch(cur) if cur.description is not None else None

    result: T | None = None
    try:
        for st in statements:
            result = _interruptible(con, functools.partial(run, st.query))
    except duckdb.PermissionException as e:
        if not read_only:
            raise QueryError(f"SQL error: {_one_line(e)}") from None
        raise QueryError(
            f"read-only SQL may read only the store, not other files or extensions "
            f"({_one_line(e)}); {_WRITE_HINT} with full DuckDB access"
        ) from None
    except duckdb.Error as e:
        raise QueryError(f"SQL error: {_one_line(e)}") from None
    return result
