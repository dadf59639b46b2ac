"""Open a pathdb DuckDB store: create it, migrate it to the current schema, install views.

One :func:`open_store` gives one DuckDB connection (and, for writable opens, the file's write
lock). Alembic runs on that same connection through a borrowed SQLAlchemy engine, so migrating
never opens a second connection. DuckDB allows one writing *process* per file, and no other
process may open the file, not even read-only, while a writer holds it. A search therefore
detaches its store (:meth:`Store.detach`) between checkpoints: it reopens the file only to commit a
checkpoint (:meth:`Store.attach`), so other processes can read the store in between. Opens that
meet a lock wait briefly with backoff (:data:`LOCK_WAIT_S`) while a search holds the file, then
give up with a one-line message. A searching process also holds an advisory lock file beside the
store (:func:`search_lock`): a second search into the same file is refused before it loads a
model, and writable opens by other processes never mark the live search's run interrupted.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb

from pathdb.store import views
from pathdb.store.errors import StoreError

DEFAULT_PATH = "pathdb.duckdb"
_DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file
_PID_RE = re.compile(r"PID (\d+)")
LOCK_WAIT_S = 10.0  # how long an open waits for a search to finish committing a checkpoint
LOCK_GRACE_S = 0.5  # how long it waits when no search holds the file (a plain open holder)
WRITER_WAIT_S = 120.0  # how long a search waits to get the file back from readers
LINGER_S = 0.2  # a detached store closes the file this long after its last use...
MAX_HOLD_S = 1.0  # ...or at once when it has been open this long (frequent checkpoints),
REST_S = 0.3  # and then stays closed this long (optional checkpoints wait) so readers get a turn

# DuckDB settings of every read-only connection: it reads the store file (and its .wal, and
# spills large intermediates to <store>.tmp/, removed on close) and nothing else: no other file,
# no network, no extension install or load, no secrets, and no setting can be changed back.
READ_ONLY_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "allow_persistent_secrets": False,
    "lock_configuration": True,
}
_REVISION_LINE = re.compile(r"^(down_revision|revision)\b[^=\n]*=\s*[\"'](\w+)[\"']", re.M)

# Runs with a live RunWriter in *this* process, per database file: never marked interrupted.
_LIVE_RUNS: dict[str, set[int]] = {}


def register_live_run(store: Store, run_id: int) -> None:
    """Record that this process is writing ``run_id`` (so a second open does not interrupt it)."""
    _LIVE_RUNS.setdefault(str(store.path), set()).add(run_id)


def unregister_live_run(store: Store, run_id: int) -> None:
    """Forget a run registered with :func:`register_live_run` (it finished or its writer died)."""
    _LIVE_RUNS.get(str(store.path), set()).discard(run_id)


class Store:
    """An open pathdb database: the raw DuckDB connection plus schema/revision helpers.

    A writer may :meth:`detach` the store: the connection is then closed whenever nobody holds
    it (:meth:`attach` / :meth:`release`, or :meth:`attached`), so other processes can open the
    file between checkpoints. Reopening costs tens of milliseconds, so a released connection
    lingers :data:`LINGER_S` for a quick re-attach (and the connection open when the store is
    detached stays until :data:`MAX_HOLD_S` after its open), but is never kept past
    :data:`MAX_HOLD_S` of use, after which it rests :data:`REST_S` (:meth:`resting`): readers
    get the file within about a second even when checkpoints come back to back.
    """

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        self.path = path
        self._con: duckdb.DuckDBPyConnection | None = con
        self.read_only = read_only
        self._closed = False
        self._detached = False
        self._holds = 0
        self._opened_at = time.monotonic()
        self._rest_until = 0.0
        self._lock = threading.RLock()  # the linger timer closes the file from its own thread
        self._timer: threading.Timer | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection (only while attached, for a detached store)."""
        if self._con is None:
            raise StoreError(
                f"the store {self.path} is detached (a search releases it between checkpoints); "
                "use `with store.attached() as con:`"
            )
        return self._con

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (releases the write lock); idempotent."""
        with self._lock:
            if not self._closed:
                self._cancel_timer()
                self._close_con()
                self._closed = True

    def _close_con(self) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            con.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_in(self, seconds: float) -> None:
        """Start the timer that closes the file in ``seconds`` unless someone holds it then."""
        self._timer = threading.Timer(seconds, self._close_idle)
        self._timer.daemon = True
        self._timer.start()

    def _close_idle(self) -> None:
        """Linger timer: close the file of a detached store nobody holds."""
        with self._lock:
            self._timer = None
            if self._detached and self._holds == 0:
                self._close_con()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def detach(self) -> None:
        """From now on keep the file closed whenever no one holds it (see :meth:`attach`). A file
        opened less than :data:`MAX_HOLD_S` ago stays open until then (closed by a timer), so a
        search that ends within it commits on the connection it opened, with no reopen."""
        with self._lock:
            self._detached = True
            if self._holds or self._con is None:
                return
            left = self._opened_at + MAX_HOLD_S - time.monotonic()
            if left <= 0:
                self._close_con()
                return
            self._cancel_timer()
            self._close_in(left)

    def attach(self, wait_s: float = WRITER_WAIT_S) -> duckdb.DuckDBPyConnection:
        """Hold the connection, reopening the file of a detached store (waiting up to
        ``wait_s`` seconds for other processes to close it); pair with :meth:`release`."""
        with self._lock:
            if self._closed:
                raise StoreError(f"the store {self.path} is closed")
            self._cancel_timer()
            if self._con is None:
                self._con = _connect_waiting(self.path, self.read_only, wait_s, reopening=True)
                self._opened_at = time.monotonic()
            self._holds += 1
            return self._con

    def release(self) -> None:
        """Drop a hold taken by :meth:`attach`; a detached store closes the file after the
        last one (at once past :data:`MAX_HOLD_S` of use, else after :data:`LINGER_S`)."""
        with self._lock:
            self._holds = max(self._holds - 1, 0)
            if not self._detached or self._holds or self._con is None:
                return
            if time.monotonic() - self._opened_at >= MAX_HOLD_S:
                self._close_con()
                self._rest_until = time.monotonic() + REST_S
            elif self._timer is None:
                self._close_in(LINGER_S)

    def resting(self) -> bool:
        """True just after a detached store closed the file past :data:`MAX_HOLD_S`: postpone
        optional writes (a checkpoint) so that waiting readers can open it."""
        return time.monotonic() < self._rest_until

    @contextmanager
    def attached(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The connection for the duration of a ``with`` block (see :meth:`attach`)."""
        con = self.attach()
        try:
            yield con
        finally:
            self.release()

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
def revision_graph() -> dict[str, str | None]:
    """Every shipped revision id -> its down revision, read from the ``revision =`` and
    ``down_revision =`` lines of ``migrations/versions/*.py``: read commands check the schema
    without importing Alembic (~0.4 s); a test checks this against Alembic's own reading."""
    from migrations import PACKAGE_DIR

    graph: dict[str, str | None] = {}
    for file in sorted((PACKAGE_DIR / "versions").glob("*.py")):
        text = file.read_text(encoding="utf-8")
        found = {m.group(1): m.group(2) for m in _REVISION_LINE.finditer(text)}
        if "revision" in found:
            graph[found["revision"]] = found.get("down_revision")
    return graph


def head_revision() -> str:
    """The newest schema revision this version of pathdb knows."""
    graph = revision_graph()
    heads = set(graph) - set(graph.values())
    if len(heads) != 1:
        raise RuntimeError(f"migrations/versions must form one chain; heads found: {sorted(heads)}")
    return heads.pop()


def known_revisions() -> set[str]:
    """Every revision id shipped with this version of pathdb."""
    return set(revision_graph())


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
                f"mode (or run `pathdb db upgrade --db {path}`) to create the schema"
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
            f"and read-only opens never migrate; run `pathdb db upgrade --db {path}` first"
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


class StoreLockedError(StoreError):
    """Another process holds DuckDB's lock on the file (``pid`` when DuckDB names it)."""

    def __init__(self, path: Path, read_only: bool, pid: int | None) -> None:
        self.path, self.read_only, self.pid = path, read_only, pid
        who = f" (PID {pid})" if pid else ""
        if read_only:  # a read-only open only conflicts with a writer
            what = (
                f"another pathdb process{who} is writing to it, and DuckDB lets no other process "
                "open the file meanwhile, not even read-only; wait for it to finish"
            )
        else:
            what = (
                f"another pathdb process{who} has it open (reading or writing), and DuckDB lets "
                "a process write only while no other process has the file open; wait for it "
                "to finish, or write to another --db file (read-only opens can share the file)"
            )
        super().__init__(f"{path} is locked: {what}.")


def _lock_file(path: Path) -> Path:
    """The advisory lock file a searching process holds beside the store ``path``."""
    return path.with_name(path.name + ".lock")


# Search locks this process holds: store path -> (fd, nesting depth).
_SEARCH_LOCKS: dict[str, tuple[int, int]] = {}


def search_holder(path: str | Path) -> int | None:
    """The PID of a *live* search in another process that holds ``path``'s search lock."""
    p = Path(path).expanduser().absolute()
    if str(p) in _SEARCH_LOCKS:
        return None
    try:
        fd = os.open(_lock_file(p), os.O_RDONLY)
    except OSError:
        return None  # no lock file: no search ever ran here, or the last one ended cleanly
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def search_lock(path: str | Path) -> Iterator[None]:
    """Hold ``path``'s search lock (re-entrant in one process): one search per store file.

    Refuses with :class:`StoreError` when another process searches into the same file. Taken
    before the model is loaded, so a refused search costs nothing. The lock file
    (``<store>.lock``) holds the owner's PID and is removed when the search ends.
    """
    p = Path(path).expanduser().absolute()
    key = str(p)
    if key in _SEARCH_LOCKS:
        fd, depth = _SEARCH_LOCKS[key]
        _SEARCH_LOCKS[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _SEARCH_LOCKS[key]
            _SEARCH_LOCKS[key] = (fd, depth - 1)
        return
    _check_path(p, read_only=False, create=True)
    fd = _acquire_lock_file(_lock_file(p), p)
    _SEARCH_LOCKS[key] = (fd, 1)
    try:
        yield
    finally:
        del _SEARCH_LOCKS[key]
        with suppress(OSError):
            _lock_file(p).unlink()
        os.close(fd)


def _acquire_lock_file(lock: Path, store: Path) -> int:
    """Open and exclusively flock ``lock``; the file must still be the one at ``lock`` after
    locking (an ending search unlinks it). Readers probe it with a shared lock for
    microseconds, so a few quick retries tell them apart from a search."""
    deadline = time.monotonic() + 0.3
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot create the search lock {lock}: {exc.strerror}; choose a writable --db"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            who = f" (PID {text})" if text.isdigit() else ""
            raise StoreError(
                f"{store} is being written by another search{who}; one search writes a store "
                f"at a time: wait for it to finish (watch it with `pathdb runs --db {store}`) "
                "or search into another --db file"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def _connect_waiting(
    path: Path, read_only: bool, wait_s: float, *, reopening: bool = False
) -> duckdb.DuckDBPyConnection:
    """:func:`_connect`, retrying with backoff while another process holds the file: up to
    ``wait_s`` seconds while a search holds it (it releases the file between checkpoints), up
    to :data:`LOCK_GRACE_S` otherwise. A search ``reopening`` its own store for a checkpoint
    waits the full ``wait_s`` for readers to let go (a first open still fails fast)."""
    start = time.monotonic()
    delay = 0.01
    while True:
        try:
            return _connect(path, read_only)
        except StoreLockedError as exc:
            waited = time.monotonic() - start
            searcher = search_holder(path)
            # the search itself (it holds the search lock) waits out readers for the full wait_s
            searching_here = reopening and str(path.expanduser().absolute()) in _SEARCH_LOCKS
            busy = searcher is not None or searching_here
            if waited >= (wait_s if busy else LOCK_GRACE_S):
                if searching_here:
                    raise StoreError(
                        f"{path} stayed open in another process for {waited:.0f} s, so the search "
                        f"could not commit its checkpoint ({exc}); close it and resume"
                    ) from exc
                if searcher is None:
                    raise
                raise StoreError(
                    f"{path} is busy: a search (PID {searcher}) has kept it open for "
                    f"{waited:.0f} s (it opens the file only to commit a checkpoint; a large "
                    "checkpoint can take a while); try again in a moment"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.05)  # short polls: a search closes the file only briefly


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` with its failures turned into :class:`StoreError` messages."""
    try:
        return duckdb.connect(
            str(path), read_only=read_only, config=READ_ONLY_CONFIG if read_only else {}
        )
    except duckdb.IOException as exc:
        msg = str(exc)
        if "lock" in msg.lower():
            pid = _PID_RE.search(msg)
            raise StoreLockedError(path, read_only, int(pid.group(1)) if pid else None) from None
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
    """Runs left ``running`` by a dead process become ``interrupted``; return how many.

    Nothing is marked while a search in another process holds the store's search lock: its
    run is alive even though it keeps the file closed between checkpoints.
    """
    if search_holder(store.path) is not None:
        return 0
    live = sorted(_LIVE_RUNS.get(str(store.path), set()))
    exclude = f"AND run_id NOT IN ({', '.join(map(str, live))})" if live else ""
    rows = store.con.execute(
        "UPDATE runs SET status = 'interrupted', stop_reason = 'interrupted', finished_at = ?, "
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
    con = _connect_waiting(p, read_only, LOCK_WAIT_S)
    store = Store(p, con, read_only)
    try:
        current = _check_revision(con, p, read_only)
        if not read_only:
            migrating = current != head_revision()
            if migrating:
                migrate(con, "head")
            views.install(con, force=migrating)
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
    con = _connect_waiting(p, False, LOCK_WAIT_S)
    try:
        before = _check_revision(con, p, read_only=False)
    finally:
        con.close()
    with open_store(p, create=False) as store:
        return before, store.revision() or ""
