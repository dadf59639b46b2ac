"""Role-aligned positions: the ``positions`` table (a run's position axis, position -> name).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ``positions`` table; existing runs keep integer positions (no rows)."""
    op.create_table(
        "positions",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("position", sa.SmallInteger, primary_key=True),
        sa.Column("name", sa.String, nullable=False),
    )


def downgrade() -> None:
    """Drop the ``positions`` table (role-aligned runs keep their role-named node labels)."""
    op.drop_table("positions")
