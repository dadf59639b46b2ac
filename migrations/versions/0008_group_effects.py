"""The group effects of a completed run's receiver inputs: ``group_effects`` (not backfilled).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ``group_effects`` table. Measuring an effect needs the run's model, which a
    migration does not load: runs searched before it have none, and export / evaluate use the
    ``effect`` rule for them (``--edge-scores group`` measures them with the model)."""
    op.create_table(
        "group_effects",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("receiver", sa.String, primary_key=True),
        sa.Column("effect", sa.Double, nullable=False),
    )


def downgrade() -> None:
    """Drop the group effects (export and evaluate then default to the ``effect`` rule)."""
    op.drop_table("group_effects")
