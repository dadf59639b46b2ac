"""Ad-hoc SQL over the store, read-only unless asked, with clean error messages."""

from __future__ import annotations

import duckdb
import pandas as pd

from pathdb.query.common import QueryError

_READ_TYPES = {"SELECT", "EXPLAIN", "PRAGMA", "RELATION"}


def sql(con: duckdb.DuckDBPyConnection, query: str, *, read_only: bool = True) -> pd.DataFrame:
    """Run ``query`` (one or more statements) and return the last result as a DataFrame.

    With ``read_only`` (the default) any statement that is not a query (INSERT, UPDATE, DELETE,
    CREATE, DROP, ALTER, COPY, ATTACH, SET, ...) is refused before anything runs.
    """
    if not query.strip():
        raise QueryError("empty SQL query")
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(f"invalid SQL: {e}") from None
    if not statements:
        raise QueryError("empty SQL query")
    if read_only:
        for st in statements:
            kind = str(st.type).rsplit(".", 1)[-1]
            if kind not in _READ_TYPES or (kind == "PRAGMA" and "=" in st.query):
                raise QueryError(
                    f"{kind} statements are not allowed in read-only mode ({st.query.strip()[:60]!r}); "
                    "pass read_only=False (CLI: --write) to modify the store"
                )
    result: pd.DataFrame = pd.DataFrame()
    try:
        for st in statements:
            rel = con.execute(st.query)
            result = rel.df() if rel.description is not None else pd.DataFrame()
    except duckdb.Error as e:
        raise QueryError(f"SQL error: {e}") from None
    return result
