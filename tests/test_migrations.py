"""Alembic migrations of the store: 0001 -> head keeps data, head == schema.py, downgrade, newer refused."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import sqlalchemy as sa
from alembic import command

import migrations
from pathdb.graph import Node
from pathdb.store import schema
from pathdb.store.db import (
    Store,
    _alembic_connection,
    current_revision,
    head_revision,
    known_revisions,
    migrate,
    open_store,
    stamp,
    upgrade,
)
from pathdb.store.errors import StoreError

TABLES = (
    "runs", "prompts", "nodes", "paths", "frontier", "evaluations", "evaluation_points",
    "edge_scores", "node_scores", "positions", "circuit_pairs", "circuit_nodes", "group_effects",
    "refined_edges",
)  # fmt: skip


def _columns(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str, str, str]]:
    """(table, column, normalised type, nullable) of every base-table column but alembic's."""
    rows = con.execute(
        """
        SELECT c.table_name, c.column_name, c.data_type, c.is_nullable
        FROM information_schema.columns c
        JOIN information_schema.tables t USING (table_schema, table_name)
        WHERE t.table_type = 'BASE TABLE' AND c.table_name <> 'alembic_version'
        """
    ).fetchall()
    return {(t, c, re.sub(r"\(\d+(,\s*\d+)?\)", "", ty).upper(), n) for t, c, ty, n in rows}


def _constraints(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str, tuple[str, ...]]]:
    rows = con.execute(
        "SELECT table_name, constraint_type, constraint_column_names FROM duckdb_constraints() "
        "WHERE table_name <> 'alembic_version' AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')"
    ).fetchall()
    return {(t, k, tuple(cols)) for t, k, cols in rows}


def _defaults(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str, str]]:
    rows = con.execute(
        "SELECT table_name, column_name, column_default FROM information_schema.columns "
        "WHERE column_default IS NOT NULL AND table_name <> 'alembic_version'"
    ).fetchall()
    return {(t, c, d.strip("'")) for t, c, d in rows}


def _metadata_db(path: Path) -> None:
    engine = sa.create_engine(f"duckdb:///{path}")
    with engine.begin() as conn:
        schema.metadata.create_all(conn)
    engine.dispose()


def _insert_0001_data(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """INSERT INTO runs (name, status, created_at, model_name, model_fingerprint, n_layers,
           n_heads, d_model, method, strategy, metric, patch_type, prompt_mode, "positional",
           root_position, params, baseline, package_version)
           VALUES ('old', 'completed', TIMESTAMP '2026-01-02 03:04:05', 'toy', 'f', 2, 2, 8,
           'exact', 'threshold', 'logit_diff', 'zero', 'batch', true, 3, '{"a": 1}', 0.5, '0.0.1')"""
    )
    con.execute(
        "INSERT INTO prompts VALUES (1, 0, 'a b', NULL, 'x', NULL, 7, NULL, [1, 2], ['a', 'b'], NULL)"
    )
    nodes = [Node.final(2, 3), Node.attn(1, 0, "kv", 3, 1), Node.attn(0, None, "q", 3),
             Node.mlp(1, 3), Node.embed(3)]  # fmt: skip
    for i, n in enumerate(nodes):
        con.execute(
            "INSERT INTO nodes VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
            [i, str(n.kind), n.layer, n.head, n.site and str(n.site), n.position,
             n.kv_position, n.label],
        )  # fmt: skip
    con.execute(
        "INSERT INTO paths VALUES (1, 0, NULL, 0, 0, NULL, NULL, 'root', false, true),"
        " (1, 1, 0, 1, 1, NULL, 0.25, 'exact', false, true),"
        " (1, 2, 1, 4, 2, NULL, -0.5, 'exact', true, true)"
    )


def test_upgrade_from_0001_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    # The literal Alembic API, on our connection (what open_store does internally).
    with _alembic_connection(con) as sa_con:
        command.upgrade(migrations.make_config(connection=sa_con), "0001")
    assert current_revision(con) == "0001"
    assert "frontier" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    _insert_0001_data(con)
    before = con.execute("SELECT * FROM paths ORDER BY path_id").fetchall()
    con.close()

    with open_store(db) as store:
        assert store.revision() == head_revision() == "0009"
        after = store.con.execute(
            "SELECT * EXCLUDE (batch_id) FROM paths ORDER BY path_id"
        ).fetchall()
        assert after == before
        assert store.con.execute("SELECT DISTINCT batch_id FROM paths").fetchall() == [(0,)]
        comps = store.con.execute("SELECT label, component FROM nodes ORDER BY node_id").fetchall()
        assert comps == [
            ("logits@3", "logits"), ("a1.h0<kv>@3:1", "a1.h0"), ("a0<q>@3", "a0"),
            ("m1@3", "m1"), ("input@3", "input"),
        ]  # fmt: skip
        run = store.con.execute(
            "SELECT name, status, params, wall_s, error, stop_reason, replaces FROM runs"
        ).fetchall()
        # 0003 backfills stop_reason where it is known (no --max-time, not best-first)
        assert run == [("old", "completed", '{"a": 1}', None, None, "completed", None)]
        assert store.con.execute("SELECT roles FROM prompts").fetchall() == [(None,)]
        # views work on upgraded data
        paths = store.con.execute("SELECT path FROM v_path_strings WHERE path_id = 2").fetchall()
        assert paths == [("input@3 -> a1.h0<kv>@3:1 -> logits@3",)]
        # 0007 backfills the circuit aggregate of the completed run: its one complete kept path
        # (-0.5) on both of its tree edges (node ids 4 -> 1 -> 0) and its three nodes
        sums = "s, a, pos, neg, n, n_pos, n_neg"
        one = (-0.5, 0.5, 0.0, -0.5, 1, 0, 1)
        pairs = store.con.execute(
            f"SELECT run_id, src_id, dst_id, {sums} FROM circuit_pairs ORDER BY src_id"
        ).fetchall()
        assert pairs == [(1, 1, 0, *one), (1, 4, 1, *one)]
        nodes = store.con.execute(
            f"SELECT run_id, node_id, {sums} FROM circuit_nodes ORDER BY node_id"
        ).fetchall()
        assert nodes == [(1, 0, *one), (1, 1, *one), (1, 4, *one)]


def test_migrated_schema_equals_metadata(tmp_path: Path) -> None:
    migrated, reference = tmp_path / "m.duckdb", tmp_path / "r.duckdb"
    open_store(migrated).close()
    _metadata_db(reference)
    a, b = duckdb.connect(str(migrated)), duckdb.connect(str(reference))
    try:
        cols_a, cols_b = _columns(a), _columns(b)
        assert {c[0] for c in cols_b} == set(TABLES) == set(schema.metadata.tables)
        assert cols_a == cols_b
        assert _constraints(a) == _constraints(b)
        assert _defaults(a) == _defaults(b)
        seq = "SELECT sequence_name FROM duckdb_sequences()"
        assert a.execute(seq).fetchall() == b.execute(seq).fetchall() == [("runs_run_id_seq",)]
    finally:
        a.close()
        b.close()


def test_downgrade_to_0001_and_base_then_up_again(tmp_path: Path) -> None:
    db = tmp_path / "d.duckdb"
    open_store(db).close()
    con = duckdb.connect(str(db))
    try:
        migrate(con, "0001", down=True)
        assert current_revision(con) == "0001"
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        assert tables == {"runs", "prompts", "nodes", "paths", "alembic_version"}
        cols = {r[0] for r in con.execute("DESCRIBE paths").fetchall()}
        assert "batch_id" not in cols
        migrate(con, "base", down=True)
        assert {r[0] for r in con.execute("SHOW TABLES").fetchall()} == {"alembic_version"}
        assert current_revision(con) is None
        migrate(con, "head")
        assert current_revision(con) == "0009"
    finally:
        con.close()


def test_newer_revision_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.duckdb"
    open_store(db).close()
    con = duckdb.connect(str(db))
    stamp(con, "9999_future")
    con.close()
    for ro in (False, True):
        with pytest.raises(
            StoreError, match=r"written by a newer pathdb.*'9999_future'.*upgrade the package"
        ):
            open_store(db, read_only=ro)
    assert "9999_future" not in known_revisions()


def test_read_only_open_of_old_db_asks_for_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    migrate(con, "0001")
    con.close()
    with pytest.raises(StoreError, match=r"pathdb db upgrade"):
        open_store(db, read_only=True)
    con = duckdb.connect(str(db))
    assert current_revision(con) == "0001"  # the read-only open did not migrate
    con.close()
    assert upgrade(db) == ("0001", "0009")
    with open_store(db, read_only=True) as store:
        assert store.revision() == "0009"


def test_migrations_package_is_self_contained() -> None:
    pkg = Path(migrations.__file__).parent
    assert (pkg / "alembic.ini").is_file() and (pkg / "script.py.mako").is_file()
    assert (pkg / "versions" / "__init__.py").is_file()
    cfg = migrations.make_config()
    assert Path(cfg.get_main_option("script_location") or "") == pkg
    assert known_revisions() == {
        "0001",
        "0002",
        "0003",
        "0004",
        "0005",
        "0006",
        "0007",
        "0008",
        "0009",
    }


def _two_runs(db: Path) -> None:
    """A completed run and an interrupted one, written through the store's writer."""
    from pathdb.store.writer import RunWriter

    meta = {
        "model_name": "toy", "model_fingerprint": "f", "n_layers": 2, "n_heads": 2,
        "d_model": 8, "method": "exact", "strategy": "threshold", "metric": "logit_diff",
        "patch_type": "zero", "prompt_mode": "batch", "positional": True, "root_position": 3,
        "params": {}, "baseline": 0.5, "package_version": "test",
    }  # fmt: skip
    nodes = [Node.final(2, 3), Node.attn(1, 0, "q", 3), Node.mlp(0, 3), Node.embed(3),
             Node.embed(2)]  # fmt: skip
    with open_store(db) as store:
        for name, status in (("done", "completed"), ("cut", "interrupted")):
            w = RunWriter.create(store, name=name, meta=meta)
            f, a, m, e3, e2 = (w.node_id(n) for n in nodes)
            root = w.add_paths([-1], [f], 0, None, [float("nan")], "root", [False], [True])
            mid = w.add_paths([root[0]] * 2, [a, m], 1, None, [0.5, -0.25], "exact",
                              [False, False], [True, True])  # fmt: skip
            w.add_paths([mid[0], mid[0], mid[1], mid[1]], [e3, e2, e3, e2], 2, None,
                        [1.0, -2.0, 0.75, 3.0], "exact", [True, True, True, True],
                        [True, True, True, False])  # fmt: skip
            w.flush()
            if status == "completed":
                w.finish(status)
            else:
                w.abandon(status)


def test_0007_backfills_the_circuit_sums_of_completed_runs(tmp_path: Path) -> None:
    """A store written at 0006 (no aggregate) upgrades with the aggregate of its completed run
    written (equal to what completing it at 0007 writes and to the walk of its paths), none for
    its interrupted run, and every other row unchanged; downgrading drops the two tables."""
    from pathdb.query.tree import stored_sums
    from tests.test_serve_cold import assert_kept_sums_are_the_walk

    db = tmp_path / "s.duckdb"
    _two_runs(db)
    con = duckdb.connect(str(db))
    try:
        at_finish = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
                     for t in ("circuit_pairs", "circuit_nodes")}  # fmt: skip
        assert {r[0] for r in at_finish["circuit_nodes"]} == {1}  # the completed run only
        migrate(con, "0006", down=True)
        assert current_revision(con) == "0006"
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        assert not {"circuit_pairs", "circuit_nodes"} & tables
        data = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
                for t in ("runs", "paths", "nodes")}  # fmt: skip
    finally:
        con.close()
    assert upgrade(db) == ("0006", "0009")
    with open_store(db, read_only=True) as store:
        for t, rows in [*at_finish.items(), *data.items()]:
            assert store.con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() == rows, t
        assert_kept_sums_are_the_walk(store.con, [1])
        assert stored_sums(store.con, [2], None) is None  # interrupted: aggregated from paths
        # 1.0 (input@3 -> a1.h0<q>@3) + -2.0 (input@2 -> a1.h0<q>@3) through a1.h0<q>@3 -> logits
        top = store.con.execute(
            "SELECT s, a, pos, neg, n, n_pos, n_neg FROM circuit_pairs WHERE run_id = 1 "
            "AND src_id = 1 AND dst_id = 0"
        ).fetchall()
        assert top == [(-1.0, 3.0, 1.0, -2.0, 2, 1, 1)]


@contextmanager
def _down_and_up_again(
    db: Path, revision: str, dropped: str, tables: Sequence[str]
) -> Iterator[Store]:
    """Downgrade ``db`` to ``revision`` (which lacks table ``dropped``), upgrade it to the head
    and yield it read-only after checking every one of ``tables`` kept its rows."""
    con = duckdb.connect(str(db))
    try:
        migrate(con, revision, down=True)
        assert dropped not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        data = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}
    finally:
        con.close()
    assert upgrade(db) == (revision, head_revision())
    with open_store(db, read_only=True) as store:
        for t, rows in data.items():
            assert store.con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() == rows, t
        yield store


def test_0008_adds_group_effects_and_older_runs_fall_back(tmp_path: Path) -> None:
    """A run completed with group effects stores them; a store downgraded to 0007 (no table)
    upgrades with every other row unchanged, and its runs have no effects, so export / evaluate
    default to the effect rule; reopening a run drops its effects until it completes again."""
    from pathdb.query import edges
    from pathdb.store.effects import default_edge_rule, stored_group_effects
    from pathdb.store.writer import RunWriter

    db = tmp_path / "g.duckdb"
    _two_runs(db)
    effects = {"a1.h0<q>": 0.25, "logits": 1.5}
    with open_store(db) as store:
        w = RunWriter.reopen(store, 1, allow_completed=True)
        w.finish("completed", group_effects=effects)
        assert stored_group_effects(store.con, 1) == effects
        assert stored_group_effects(store.con, 2) is None  # interrupted: none
        assert default_edge_rule(store.con, 1)[0] == "group"
        RunWriter.reopen(store, 1, allow_completed=True).close()
        assert stored_group_effects(store.con, 1) is None  # reopened: dropped
        RunWriter.reopen(store, 1, allow_completed=True).finish("completed", group_effects=effects)
        before = edges(store.con, 1, rule="effect")
    tables = ("runs", "paths", "nodes", "prompts", "circuit_pairs", "circuit_nodes")
    with _down_and_up_again(db, "0007", "group_effects", tables) as store:
        assert store.con.execute("SELECT count(*) FROM group_effects").fetchall() == [(0,)]
        assert default_edge_rule(store.con, 1)[0] == "effect"
        after = edges(store.con, 1, rule="effect")
    pd.testing.assert_frame_equal(after, before)


def test_0009_adds_refined_edges_and_older_runs_keep_the_group_rule(tmp_path: Path) -> None:
    """A completed run's refined scores make ``refined`` its default rule and add their seconds to
    its wall time; reopening drops them with the group effects; a store downgraded to 0008 (no
    table) upgrades with every other row unchanged, and its runs default to ``group`` again."""
    from pathdb.store.effects import default_edge_rule, stored_refined, write_refined
    from pathdb.store.writer import RunWriter

    db = tmp_path / "r.duckdb"
    _two_runs(db)
    effects, refined = {"a1.h0<q>": 0.25, "logits": 1.5}, {"input->logits": 2.0}
    with open_store(db) as store:
        RunWriter.reopen(store, 1, allow_completed=True).finish(
            "completed", group_effects=effects, wall_s=3.0
        )
        assert default_edge_rule(store.con, 1) == ("group", effects, None)
        write_refined(store.con, 1, refined, 0.5)
        assert default_edge_rule(store.con, 1) == ("refined", effects, refined)
        assert store.con.execute("SELECT wall_s FROM runs WHERE run_id = 1").fetchall() == [(3.5,)]
        RunWriter.reopen(store, 1, allow_completed=True).close()
        assert stored_refined(store.con, 1) is None  # reopened: dropped with the group effects
        RunWriter.reopen(store, 1, allow_completed=True).finish("completed", group_effects=effects)
        write_refined(store.con, 1, refined, 0.0)
    tables = ("runs", "paths", "nodes", "group_effects", "circuit_pairs")
    with _down_and_up_again(db, "0008", "refined_edges", tables) as store:
        assert default_edge_rule(store.con, 1) == ("group", effects, None)
