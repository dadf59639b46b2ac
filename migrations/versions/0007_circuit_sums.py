"""The per-run circuit aggregate: ``circuit_pairs`` / ``circuit_nodes``, backfilled.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import duckdb
import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SUMS = ("s", "a", "pos", "neg")
_COUNTS = ("n", "n_pos", "n_neg")


def _sums() -> list[sa.Column[Any]]:
    return [sa.Column(c, sa.Double, nullable=False) for c in _SUMS] + [
        sa.Column(c, sa.BigInteger, nullable=False) for c in _COUNTS
    ]


def upgrade() -> None:
    """Add the ``circuit_pairs`` and ``circuit_nodes`` tables and write them for every completed
    path run already in the store (one walk of each run's kept rows, bulk inserts via Arrow)."""
    from pathdb.store.circuit import backfill_circuit_sums

    op.create_table(
        "circuit_pairs",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("src_id", sa.Integer, primary_key=True),
        sa.Column("dst_id", sa.Integer, primary_key=True),
        *_sums(),
    )
    op.create_table(
        "circuit_nodes",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("node_id", sa.Integer, primary_key=True),
        *_sums(),
    )
    # the DuckDB connection the store lent Alembic (duckdb_engine's wrapper forwards to it)
    raw = op.get_bind().connection.driver_connection
    backfill_circuit_sums(cast(duckdb.DuckDBPyConnection, raw))


def downgrade() -> None:
    """Drop the aggregate (the explorer then aggregates every run from its paths)."""
    op.drop_table("circuit_nodes")
    op.drop_table("circuit_pairs")
