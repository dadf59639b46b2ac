"""Edge-score runs (``pathdb attribute``): a run kind, per-edge and per-node scores.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``runs.kind`` (existing runs become ``paths``) and the ``edge_scores`` / ``node_scores`` tables."""
    op.add_column("runs", sa.Column("kind", sa.String, nullable=False, server_default="paths"))
    op.create_table(
        "edge_scores",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("edge_id", sa.Integer, primary_key=True),
        sa.Column("edge", sa.String, nullable=False),
        sa.Column("src", sa.String, nullable=False),
        sa.Column("dst", sa.String, nullable=False),
        sa.Column("site", sa.String),
        sa.Column("score", sa.Double, nullable=False),
        sa.Column("in_graph", sa.Boolean),
    )
    op.create_table(
        "node_scores",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("component", sa.String, primary_key=True),
        sa.Column("score", sa.Double, nullable=False),
    )


def downgrade() -> None:
    """Back to revision 0004 (drops edge runs' scores; the runs rows of edge runs stay)."""
    op.drop_table("node_scores")
    op.drop_table("edge_scores")
    op.drop_column("runs", "kind")
