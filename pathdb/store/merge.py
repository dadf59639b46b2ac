"""Merge pathdb stores written on different machines into one store (``pathdb merge``).

Each input is ATTACHed read-only to the output's DuckDB connection and copied table by table
with ``INSERT ... SELECT`` (bulk, inside DuckDB; never row by row), in ONE transaction per
input, so a failed merge leaves the output as it was before that input. Which tables to copy is
read from the schema (:mod:`pathdb.store.schema`): every table with a ``run_id`` column, with
run ids remapped to fresh ids of the output; a table that owns its own integer id beside
``run_id`` (``evaluations.evaluation_id``) gets new ids, and tables keyed by that id without a
``run_id`` (``evaluation_points``) follow the remap. Path and node ids are per run, so they are
copied unchanged.

A run is identified by (name, ``created_at``, ``model_fingerprint``): a run already in the
output is not copied again (merging the same store twice adds nothing), except that a copy
which has since progressed in its input (more paths evaluated, or completed) replaces the older
copy. A *different* run whose name is taken in the output is renamed ``NAME@STEM`` (``STEM``:
the input file's name without extension), then ``NAME@STEM-2``, ``-3``... Inputs of an older
schema revision are copied column by column (columns they lack get their defaults); inputs of a
newer revision and files that are not pathdb stores are refused. A completed run copied without
its circuit aggregate (:mod:`pathdb.store.circuit`; inputs older than revision 0007) gets it in
the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from sqlalchemy import Table

from pathdb.store import schema
from pathdb.store.circuit import backfill_circuit_sums
from pathdb.store.db import (
    _DUCKDB_MAGIC,
    fetch_one,
    head_revision,
    known_revisions,
    open_store,
    search_lock,
)
from pathdb.store.errors import StoreError

_SRC = "pathdb_merge_src"  # the catalog name an input is attached under
_MAP = "_pathdb_merge_runs"  # registered Arrow table: src_run_id -> dst_run_id
_RUN_IDENTITY = ("name", "created_at", "model_fingerprint")


@dataclass
class InputReport:
    """What merging one input did."""

    path: str
    added: list[str] = field(default_factory=list)  # run names as stored in the output
    skipped: list[str] = field(default_factory=list)  # already in the output
    refreshed: list[str] = field(default_factory=list)  # older copy replaced by a newer one
    renamed: dict[str, str] = field(default_factory=dict)  # input name -> output name
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows copied


@dataclass(frozen=True)
class _OwnedIds:
    """A table that owns integer ids beside ``run_id`` (``evaluations``), and its children."""

    table: Table
    id_column: str
    children: tuple[Table, ...]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _run_tables() -> list[Table]:
    """Tables with a ``run_id`` column whose rows are copied per run (not ``runs`` itself and
    not id-owning tables), discovered from the schema so new tables are merged too."""
    owners = {o.table.name for o in _owned_ids()}
    return [
        t
        for t in schema.metadata.sorted_tables
        if "run_id" in t.c and t.name != "runs" and t.name not in owners
    ]


def _owned_ids() -> list[_OwnedIds]:
    """Tables with ``run_id`` and a single-column integer primary key of their own."""
    found = []
    for t in schema.metadata.sorted_tables:
        pk = list(t.primary_key.columns)
        if "run_id" not in t.c or t.name == "runs" or len(pk) != 1 or pk[0].name == "run_id":
            continue
        id_col = pk[0].name
        children = tuple(
            c for c in schema.metadata.sorted_tables if id_col in c.c and "run_id" not in c.c
        )
        found.append(_OwnedIds(t, id_col, children))
    return found


def _is_duckdb_file(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as fh:
        return fh.read(12)[8:12] == _DUCKDB_MAGIC


def _is_pathdb_store(path: Path) -> bool | None:
    """True when ``path`` is a DuckDB file with pathdb's ``alembic_version`` table; None when
    it cannot be read now (another process holds it: opening it says so)."""
    if not _is_duckdb_file(path):
        return False
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return None
    try:
        return bool(
            con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'alembic_version'"
            ).fetchall()[0][0]
        )
    finally:
        con.close()


def _prepare_out(out: Path, force: bool) -> None:
    """Refuse (or with ``force`` remove) an existing output that is not a pathdb store."""
    if out.is_dir():
        raise StoreError(
            f"OUT {out} is a directory; give a store file path such as {out / 'merged.duckdb'}"
        )
    if not out.exists() or out.stat().st_size == 0 or _is_pathdb_store(out) is not False:
        return
    if not force:
        raise StoreError(
            f"OUT {out} exists and is not a pathdb store; choose another OUT, or pass --force to "
            "overwrite it"
        )
    for p in (out, out.with_name(out.name + ".wal")):
        p.unlink(missing_ok=True)


def merge_stores(
    out: str | Path, inputs: Sequence[str | Path], *, force: bool = False
) -> list[InputReport]:
    """Merge the runs of ``inputs`` (opened read-only) into the store ``out`` (created when
    missing, added to when it is a pathdb store); one transaction per input. See the module doc."""
    if not inputs:
        raise StoreError("give at least one input store: pathdb merge OUT IN...")
    out_p = Path(out).expanduser().absolute()
    in_ps = [Path(p).expanduser().absolute() for p in inputs]
    for p in in_ps:
        if p == out_p:
            raise StoreError(f"input {p} is the output store; merge into another OUT file")
        if not p.is_file():
            raise StoreError(f"input {p} does not exist (or is not a file); check the path")
        if not _is_duckdb_file(p):
            raise StoreError(
                f"input {p} is not a pathdb store (not a DuckDB file); drop it from the inputs"
            )
    _prepare_out(out_p, force)
    with search_lock(out_p), open_store(out_p) as store:
        return [_merge_one(store.con, p) for p in in_ps]


def _attach(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """ATTACH ``path`` read-only as :data:`_SRC` and check it is a pathdb store we can read."""
    try:
        con.execute(f"ATTACH {_sql_str(str(path))} AS {_SRC} (READ_ONLY)")
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        raise StoreError(f"cannot open input {path} read-only: {first}") from None
    tables = _src_tables(con)
    if "alembic_version" not in tables:
        con.execute(f"DETACH {_SRC}")
        raise StoreError(
            f"input {path} is a DuckDB file but not a pathdb store (no alembic_version table)"
        )
    row = fetch_one(con.execute(f"SELECT version_num FROM {_SRC}.alembic_version"))
    rev = None if row is None else str(row[0])
    if rev not in known_revisions():
        con.execute(f"DETACH {_SRC}")
        raise StoreError(
            f"input {path} was written by a newer pathdb (schema revision {rev!r}; this version "
            f"knows up to {head_revision()!r}); upgrade pathdb (pip install -U pathdb) to merge it"
        )


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _src_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [_SRC]
    ).fetchall()
    return {r[0] for r in rows}


def _src_columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND table_name = ?",
        [_SRC, table],
    ).fetchall()
    return {r[0] for r in rows}


def _merge_one(con: duckdb.DuckDBPyConnection, path: Path) -> InputReport:
    """Copy one input's runs into the output in one transaction (see the module doc)."""
    _attach(con, path)
    report = InputReport(str(path))
    try:
        con.begin()
        try:
            _copy(con, path, report)
            con.commit()
        except BaseException:
            con.rollback()
            raise
    except duckdb.Error as exc:
        raise StoreError(f"merging {path} failed (nothing of it was merged): {exc}") from None
    finally:
        con.execute(f"DETACH {_SRC}")
    return report


def _plan(
    con: duckdb.DuckDBPyConnection, path: Path, report: InputReport
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Decide per input run: new (fresh id, maybe renamed), skipped, or refreshed (its older
    output copy deleted, same id). Returns (new/refreshed src->dst ids, skipped src->dst ids)."""
    src = con.execute(
        f"SELECT run_id, name, created_at, model_fingerprint, status, n_evaluated FROM {_SRC}.runs ORDER BY run_id"
    ).fetchall()
    copy: list[tuple[int, int]] = []
    kept: list[tuple[int, int]] = []
    renames: dict[int, str] = {}
    for run_id, name, created_at, fp, status, n_eval in src:
        # the same run: same created_at + fingerprint, under its name or a merge rename of it
        same = fetch_one(
            con.execute(
                "SELECT run_id, status, n_evaluated, name FROM runs WHERE created_at = ? AND model_fingerprint = ? "
                "AND (name = ? OR starts_with(name, ? || '@'))",
                [created_at, fp, name, name],
            )
        )
        if same is not None:
            dst, out_status, out_eval = int(same[0]), same[1], int(same[2])
            newer = int(n_eval) > out_eval or (status == "completed" and out_status != "completed")
            if not newer:
                kept.append((int(run_id), dst))
                report.skipped.append(name)
                continue
            _delete_run(con, dst)
            renames[dst] = str(same[3])  # keep the name it has in the output
            copy.append((int(run_id), dst))
            report.refreshed.append(name)
            continue
        dst = int(fetch_one(con.execute("SELECT nextval('runs_run_id_seq')"))[0])  # type: ignore[index]
        new_name = _free_name(con, name, path.stem)
        if new_name != name:
            renames[dst] = new_name
            report.renamed[name] = new_name
        report.added.append(new_name)
        copy.append((int(run_id), dst))
    _copy_runs(con, copy, renames)
    return copy, kept


def _free_name(con: duckdb.DuckDBPyConnection, name: str, stem: str) -> str:
    """``name`` if no output run has it, else ``name@stem``, ``name@stem-2``, ..."""
    candidates = [name, f"{name}@{stem}"]
    k = 2
    while True:
        for c in candidates:
            if fetch_one(con.execute("SELECT 1 FROM runs WHERE name = ?", [c])) is None:
                return c
        candidates = [f"{name}@{stem}-{k}"]
        k += 1


def _delete_run(con: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Delete every row of run ``run_id`` from the output (all run tables, owned ids, runs)."""
    for o in _owned_ids():
        for child in o.children:
            con.execute(
                f"DELETE FROM {_q(child.name)} WHERE {_q(o.id_column)} IN "
                f"(SELECT {_q(o.id_column)} FROM {_q(o.table.name)} WHERE run_id = ?)",
                [run_id],
            )
        con.execute(f"DELETE FROM {_q(o.table.name)} WHERE run_id = ?", [run_id])
    for t in _run_tables():
        con.execute(f"DELETE FROM {_q(t.name)} WHERE run_id = ?", [run_id])
    con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])


def _register_map(
    con: duckdb.DuckDBPyConnection,
    pairs: Sequence[tuple[int, int]],
    names: dict[int, str] | None = None,
) -> None:
    dst = [d for _, d in pairs]
    con.register(
        _MAP,
        pa.table(
            {
                "src_run_id": pa.array([s for s, _ in pairs], pa.int64()),
                "dst_run_id": pa.array(dst, pa.int64()),
                "new_name": pa.array([(names or {}).get(d) for d in dst], pa.string()),
            }
        ),
    )


def _common_columns(con: duckdb.DuckDBPyConnection, table: Table) -> list[str]:
    have = _src_columns(con, table.name)
    return [c.name for c in table.columns if c.name in have]


def _copy_runs(
    con: duckdb.DuckDBPyConnection, pairs: Sequence[tuple[int, int]], renames: dict[int, str]
) -> None:
    if not pairs:
        return
    cols = _common_columns(con, schema.runs)
    select = {"run_id": "m.dst_run_id", "name": "coalesce(m.new_name, s.name)"}
    _register_map(con, pairs, renames)
    try:
        con.execute(
            f"INSERT INTO runs ({', '.join(map(_q, cols))}) SELECT "
            + ", ".join(select.get(c, f"s.{_q(c)}") for c in cols)
            + f" FROM {_SRC}.runs s JOIN {_MAP} m ON s.run_id = m.src_run_id"
        )
    finally:
        con.unregister(_MAP)


def _copy(con: duckdb.DuckDBPyConnection, path: Path, report: InputReport) -> None:
    """Plan the runs, then bulk-copy every run table and the id-owning tables; a completed run
    copied without its circuit aggregate (an input older than revision 0007) gets it here."""
    copy, kept = _plan(con, path, report)
    present = _src_tables(con)
    if copy:
        _register_map(con, copy)
        try:
            for t in _run_tables():
                if t.name not in present:
                    continue
                cols = _common_columns(con, t)
                n = _insert(
                    con,
                    t.name,
                    cols,
                    ", ".join("m.dst_run_id" if c == "run_id" else f"s.{_q(c)}" for c in cols),
                    f"{_SRC}.{_q(t.name)} s JOIN {_MAP} m ON s.run_id = m.src_run_id",
                )
                report.rows[t.name] = n
        finally:
            con.unregister(_MAP)
        backfill_circuit_sums(con, [dst for _, dst in copy])
    for owned in _owned_ids():
        if owned.table.name in present:
            _copy_owned(con, owned, [*copy, *kept], present, report)


def _insert(
    con: duckdb.DuckDBPyConnection, table: str, cols: Sequence[str], select: str, source: str
) -> int:
    row = fetch_one(
        con.execute(
            f"INSERT INTO {_q(table)} ({', '.join(map(_q, cols))}) SELECT {select} FROM {source}"
        )
    )
    return int(row[0]) if row else 0


def _copy_owned(
    con: duckdb.DuckDBPyConnection,
    owned: _OwnedIds,
    pairs: Sequence[tuple[int, int]],
    present: set[str],
    report: InputReport,
) -> None:
    """Copy the rows of an id-owning table (and its children) for the mapped runs, with fresh
    ids (max + 1 ...); rows already in the output (same run and ``created_at``) are skipped."""
    if not pairs:
        return
    t, idc = owned.table.name, owned.id_column
    cols = _common_columns(con, owned.table)
    dedupe = (
        f"AND NOT EXISTS (SELECT 1 FROM {_q(t)} o WHERE o.run_id = m.dst_run_id AND o.created_at = s.created_at)"
        if "created_at" in cols
        else ""
    )
    base = fetch_one(con.execute(f"SELECT coalesce(max({_q(idc)}), 0) FROM {_q(t)}"))
    offset = int(base[0]) if base else 0
    _register_map(con, pairs)
    try:
        con.execute(
            f"CREATE TEMP TABLE _pathdb_merge_ids AS SELECT s.{_q(idc)} AS src_id, "
            f"{offset} + row_number() OVER (ORDER BY s.{_q(idc)}) AS dst_id, m.dst_run_id "
            f"FROM {_SRC}.{_q(t)} s JOIN {_MAP} m ON s.run_id = m.src_run_id WHERE true {dedupe}"
        )
    finally:
        con.unregister(_MAP)
    try:
        select = {idc: "i.dst_id", "run_id": "i.dst_run_id"}
        report.rows[t] = _insert(
            con,
            t,
            cols,
            ", ".join(select.get(c, f"s.{_q(c)}") for c in cols),
            f"{_SRC}.{_q(t)} s JOIN _pathdb_merge_ids i ON s.{_q(idc)} = i.src_id",
        )
        for child in owned.children:
            if child.name not in present:
                continue
            ccols = _common_columns(con, child)
            report.rows[child.name] = _insert(
                con,
                child.name,
                ccols,
                ", ".join("i.dst_id" if c == idc else f"s.{_q(c)}" for c in ccols),
                f"{_SRC}.{_q(child.name)} s JOIN _pathdb_merge_ids i ON s.{_q(idc)} = i.src_id",
            )
    finally:
        con.execute("DROP TABLE _pathdb_merge_ids")


def summary(reports: Sequence[InputReport]) -> list[dict[str, Any]]:
    """One plain dict per input (for the CLI's table)."""
    return [
        {
            "input": r.path,
            "added": len(r.added),
            "skipped": len(r.skipped),
            "refreshed": len(r.refreshed),
            "renamed": ", ".join(f"{a} -> {b}" for a, b in r.renamed.items()),
            "paths": r.rows.get("paths", 0),
        }
        for r in reports
    ]
