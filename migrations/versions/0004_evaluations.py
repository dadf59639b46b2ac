"""Faithfulness evaluations of runs (``pathdb evaluate``): settings, CPR/CMD and every curve point.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ``evaluations`` and ``evaluation_points`` tables (existing data untouched)."""
    op.create_table(
        "evaluations",
        sa.Column("evaluation_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("prompts", sa.String, nullable=False),
        sa.Column("heldout", sa.Boolean, nullable=False),
        sa.Column("n_prompts", sa.Integer, nullable=False),
        sa.Column("intervention", sa.String, nullable=False),
        sa.Column("metric", sa.String, nullable=False),
        sa.Column("score", sa.String, nullable=False),
        sa.Column("n_edges_total", sa.Integer, nullable=False),
        sa.Column("m_full", sa.Double, nullable=False),
        sa.Column("m_empty", sa.Double, nullable=False),
        sa.Column("cpr", sa.Double),
        sa.Column("cmd", sa.Double),
        sa.Column("edges_80", sa.Integer),
        sa.Column("edges_90", sa.Integer),
        sa.Column("wall_s", sa.Double),
        sa.Column("package_version", sa.String, nullable=False),
    )
    op.create_table(
        "evaluation_points",
        sa.Column("evaluation_id", sa.Integer, primary_key=True),
        sa.Column("point", sa.Integer, primary_key=True),
        sa.Column("curve", sa.String, nullable=False),
        sa.Column("k", sa.Integer, nullable=False),
        sa.Column("fraction", sa.Double),
        sa.Column("n_edges", sa.Integer, nullable=False),
        sa.Column("metric", sa.Double, nullable=False),
        sa.Column("faithfulness", sa.Double, nullable=False),
        sa.Column("source", sa.String, nullable=False),
    )


def downgrade() -> None:
    """Back to revision 0003 (drops both tables and the evaluations in them)."""
    op.drop_table("evaluation_points")
    op.drop_table("evaluations")
