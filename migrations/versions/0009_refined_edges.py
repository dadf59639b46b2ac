"""The refined edge rule's top-edge scores of a completed run: ``refined_edges`` (not backfilled).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ``refined_edges`` table. The refinement runs the model, which a migration does not
    load: runs searched before it have none, and export / evaluate use the ``group`` rule for runs
    with stored group effects (``--edge-scores refined`` measures it with the model)."""
    op.create_table(
        "refined_edges",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("edge", sa.String, primary_key=True),
        sa.Column("score", sa.Double, nullable=False),
    )


def downgrade() -> None:
    """Drop the refined scores (export and evaluate then default to the ``group`` rule)."""
    op.drop_table("refined_edges")
