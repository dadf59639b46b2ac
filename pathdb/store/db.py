"""Open a pathdb DuckDB store: create it, migrate it to the current schema, install views.

One :func:`open_store` gives one DuckDB connection (and, for writable opens, the file's write
lock). Alembic runs on that same connection through a borrowed SQLAlchemy engine, so migrating
never opens a second connection. DuckDB allows one writing *process* per file; readers in the
same process share the writer's database through :meth:`Store.cursor`. Another process can open
the file read-only only while no process holds it for writing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import duckdb

from pathdb.store import views
from pathdb.store.errors import StoreError

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

DEFAULT_PATH = "pathdb.duckdb"
_DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file
_PID_RE = re.compile(r"PID (\d+)")

# Runs with a live RunWriter in *this* process, per database file: never marked interrupted.
_LIVE_RUNS: dict[str, set[int]] = {}


def register_live_run(store: Store, run_id: int) -> None:
    """Record that this process is writing ``run_id`` (so a second open does not interrupt it)."""
    _LIVE_RUNS.setdefault(str(store.path), set()).add(run_id)


def unregister_live_run(store: Store, run_id: int) -> None:
    """Forget a run registered with :func:`register_live_run` (it finished or its writer died)."""
    _LIVE_RUNS.get(str(store.path), set()).discard(run_id)


class Store:
    """An open pathdb database: the raw DuckDB connection plus schema/revision helpers."""

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        self.path = path
        self.con = con
        self.read_only = read_only
        self._closed = False

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (releases the write lock); idempotent."""
        if not self._closed:
            self.con.close()
            self._closed = True

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"Store({str(self.path)!r}, {mode}{', closed' if self._closed else ''})"

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database in this process (its own transaction)."""
        return self.con.cursor()

    # ---- schema -----------------------------------------------------------------------------
    def revision(self) -> str | None:
        """The Alembic revision stored in the database (None for an empty database)."""
        return current_revision(self.con)

    def info(self) -> dict[str, Any]:
        """Summary for ``pathdb db info``: file, size, revision, head and per-run counts."""
        con = self.con
        runs = con.execute(
            """
            SELECT r.run_id, r.name, r.status, r.created_at, r.finished_at,
                   coalesce(p.n_paths, 0), coalesce(p.n_complete, 0), coalesce(p.n_kept, 0),
                   coalesce(n.n_nodes, 0), coalesce(q.n_prompts, 0)
            FROM runs r
            LEFT JOIN (SELECT run_id, count(*) AS n_paths,
                              count(*) FILTER (WHERE complete) AS n_complete,
                              count(*) FILTER (WHERE kept) AS n_kept
                       FROM paths GROUP BY run_id) p USING (run_id)
            LEFT JOIN (SELECT run_id, count(*) AS n_nodes FROM nodes GROUP BY run_id) n
                   USING (run_id)
            LEFT JOIN (SELECT run_id, count(*) AS n_prompts FROM prompts GROUP BY run_id) q
                   USING (run_id)
            ORDER BY r.run_id
            """
        ).fetchall()
        keys = (
            "run_id", "name", "status", "created_at", "finished_at",
            "n_paths", "n_complete", "n_kept", "n_nodes", "n_prompts",
        )  # fmt: skip
        run_dicts = [dict(zip(keys, row, strict=True)) for row in runs]
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size if self.path.exists() else 0,
            "read_only": self.read_only,
            "revision": self.revision(),
            "head": head_revision(),
            "n_runs": len(run_dicts),
            "n_paths": sum(r["n_paths"] for r in run_dicts),
            "runs": run_dicts,
        }


# ---- revisions -------------------------------------------------------------------------------
@cache
def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    from migrations import make_config

    return ScriptDirectory.from_config(make_config())


def head_revision() -> str:
    """The newest schema revision this version of pathdb knows."""
    head = _script().get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    """Every revision id shipped with this version of pathdb."""
    return {rev.revision for rev in _script().walk_revisions()}


def fetch_one(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """The first row of ``cur``'s result, consuming it all.

    DuckDB 2 refuses new work on a connection whose result was not fetched to the end, so a
    bare ``fetchone()`` on a shared connection would break the next query.
    """
    rows = cur.fetchall()
    return rows[0] if rows else None


def _table_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = 'main' AND table_type = 'BASE TABLE'"
    ).fetchall()
    return {r[0] for r in rows}


def current_revision(con: duckdb.DuckDBPyConnection) -> str | None:
    """The revision in ``alembic_version``, or None when the table is missing or empty."""
    if "alembic_version" not in _table_names(con):
        return None
    row = fetch_one(con.execute("SELECT version_num FROM alembic_version"))
    return None if row is None else str(row[0])


@contextmanager
def _alembic_connection(con: duckdb.DuckDBPyConnection) -> Iterator[Any]:
    """A SQLAlchemy connection (in a transaction) that borrows ``con`` without closing it."""
    import sqlalchemy as sa
    from duckdb_engine import ConnectionWrapper
    from sqlalchemy.pool import NullPool

    class _Borrowed(ConnectionWrapper):
        def close(self) -> None:  # the Store owns the DuckDB connection
            pass

    engine = sa.create_engine("duckdb://", creator=lambda: _Borrowed(con), poolclass=NullPool)
    try:
        with engine.begin() as sa_con:
            yield sa_con
    finally:
        engine.dispose()


def migrate(con: duckdb.DuckDBPyConnection, revision: str = "head", *, down: bool = False) -> None:
    """Run Alembic ``upgrade`` (or ``downgrade`` when ``down``) to ``revision`` on ``con``.

    Views are dropped before a downgrade (they may reference dropped columns); writable opens
    reinstall them.
    """
    from alembic import command

    from migrations import make_config

    if down:
        views.drop(con)
    with _alembic_connection(con) as sa_con:
        cfg = make_config(connection=sa_con)
        if down:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)


def stamp(con: duckdb.DuckDBPyConnection, revision: str) -> None:
    """Write ``revision`` into ``alembic_version`` without migrating (tests, repairs)."""
    con.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL)")
    con.execute("DELETE FROM alembic_version")
    con.execute("INSERT INTO alembic_version VALUES (?)", [revision])


def _check_revision(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> str | None:
    """Refuse unknown (newer) revisions, and older ones when read-only; return the current one."""
    current = current_revision(con)
    if current is None:
        if _table_names(con) - {"alembic_version"}:
            raise StoreError(
                f"{path} is a DuckDB database but not a pathdb store (it has tables but no "
                "alembic_version); choose another --db file"
            )
        if read_only:
            raise StoreError(
                f"{path} is not an initialised pathdb store; open it once without read-only "
                "mode (or run `pathdb db upgrade`) to create the schema"
            )
        return None
    if current not in known_revisions():
        raise StoreError(
            f"{path} was written by a newer pathdb (schema revision {current!r}; this version "
            f"knows up to {head_revision()!r}); upgrade the package: pip install -U pathdb"
        )
    if read_only and current != head_revision():
        raise StoreError(
            f"{path} has an older schema (revision {current!r}, current {head_revision()!r}) "
            f"and read-only opens never migrate; run `pathdb db upgrade {path}` first"
        )
    return current


# ---- opening ---------------------------------------------------------------------------------
def _check_path(path: Path, read_only: bool, create: bool) -> bool:
    """Validate ``path`` before DuckDB touches it; return True when the file already exists."""
    if path.is_dir():
        raise StoreError(
            f"{path} is a directory, not a database file; give a file path such as "
            f"{path / DEFAULT_PATH}"
        )
    if path.exists():
        if path.stat().st_size > 0:
            with path.open("rb") as fh:
                header = fh.read(12)
            if header[8:12] != _DUCKDB_MAGIC:
                raise StoreError(
                    f"{path} is not a DuckDB database (wrong file header); choose another "
                    "--db path or move the file away"
                )
        if not read_only and not os.access(path, os.W_OK):
            raise StoreError(f"{path} is not writable; open it read-only or fix its permissions")
        return True
    if read_only or not create:
        raise StoreError(f"no pathdb store at {path}; run a search first or check the --db path")
    parent = path.parent
    if not parent.is_dir():
        raise StoreError(
            f"cannot create {path}: directory {parent} does not exist; create it first "
            f"(mkdir -p {parent}) or choose another --db path"
        )
    if not os.access(parent, os.W_OK):
        raise StoreError(
            f"cannot create {path}: directory {parent} is not writable; choose another --db path"
        )
    return False


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` with its failures turned into :class:`StoreError` messages."""
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        msg = str(exc)
        if "lock" in msg.lower():
            pid = _PID_RE.search(msg)
            who = f" (PID {pid.group(1)})" if pid else ""
            hint = (
                "wait for it to finish"
                if read_only
                else "wait for it to finish, or write to another --db file"
            )
            raise StoreError(
                f"{path} is locked: another pathdb process{who} is writing to it. DuckDB lets "
                f"no other process open the file meanwhile, not even read-only; {hint}. "
                "Once no writer holds it, any number of processes can read it with read-only "
                "mode."
            ) from None
        if "Permission denied" in msg or "Read-only file system" in msg:
            raise StoreError(
                f"cannot {'read' if read_only else 'write'} {path}: permission denied (a "
                "read-only location?); choose a writable --db path"
                + ("" if read_only else " or open an existing store read-only")
            ) from None
        if "not a valid DuckDB database" in msg or "invalid" in msg.lower():
            raise StoreError(f"{path} is not a DuckDB database: {msg}") from None
        raise StoreError(f"cannot open {path}: {msg}") from None
    except duckdb.ConnectionException as exc:
        raise StoreError(
            f"cannot open {path}: this process already has it open in another mode ({exc}); "
            "share the open Store (store.cursor()) instead of opening it twice"
        ) from None
    except duckdb.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None


def _mark_interrupted(store: Store) -> int:
    """Runs left ``running`` by a dead process become ``interrupted``; return how many."""
    live = sorted(_LIVE_RUNS.get(str(store.path), set()))
    exclude = f"AND run_id NOT IN ({', '.join(map(str, live))})" if live else ""
    rows = store.con.execute(
        "UPDATE runs SET status = 'interrupted', finished_at = ?, "
        "error = coalesce(error, 'the writing process ended without finishing the run') "
        f"WHERE status = 'running' {exclude} RETURNING run_id",
        [datetime.now(UTC).replace(tzinfo=None)],
    ).fetchall()
    return len(rows)


def _remove_new_file(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)


def open_store(
    path: str | Path = DEFAULT_PATH, *, read_only: bool = False, create: bool = True
) -> Store:
    """Open (and on writable opens create/migrate) the store at ``path``; see the module doc."""
    p = Path(path).expanduser().absolute()
    existed = _check_path(p, read_only, create)
    con = _connect(p, read_only)
    store = Store(p, con, read_only)
    try:
        current = _check_revision(con, p, read_only)
        if not read_only:
            if current != head_revision():
                migrate(con, "head")
            views.install(con)
            _mark_interrupted(store)
    except BaseException as exc:
        store.close()
        if not existed:
            _remove_new_file(p)
        if isinstance(exc, StoreError | KeyboardInterrupt):
            raise
        raise StoreError(f"cannot prepare the store {p}: {exc}") from exc
    return store


def upgrade(path: str | Path = DEFAULT_PATH) -> tuple[str | None, str]:
    """``pathdb db upgrade``: migrate an existing store to the current schema; (before, after)."""
    p = Path(path).expanduser().absolute()
    _check_path(p, read_only=False, create=False)
    con = _connect(p, read_only=False)
    try:
        before = _check_revision(con, p, read_only=False)
    finally:
        con.close()
    with open_store(p, create=False) as store:
        return before, store.revision() or ""
