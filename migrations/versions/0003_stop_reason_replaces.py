"""Say why a run stopped (``runs.stop_reason``) and make ``--replace`` atomic (``runs.replaces``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Runs finished before 0003: interrupted / failed are known; a completed run was exhaustive only
# when neither --max-time nor best-first's --top-n could have stopped it (otherwise unknown: NULL).
_BACKFILL_SQL = """
UPDATE runs SET stop_reason = CASE
    WHEN status = 'interrupted' THEN 'interrupted'
    WHEN status = 'failed' THEN 'error'
    WHEN status = 'completed' AND strategy <> 'best-first'
         AND json_extract_string(params, '$.params.max_time') IS NULL THEN 'completed'
END
"""


def upgrade() -> None:
    """Add ``runs.stop_reason`` (backfilled where it is known) and ``runs.replaces``."""
    op.add_column("runs", sa.Column("stop_reason", sa.String))
    op.add_column("runs", sa.Column("replaces", sa.String))
    op.execute(_BACKFILL_SQL)


def downgrade() -> None:
    """Back to revision 0002 (drops both columns)."""
    op.drop_column("runs", "replaces")
    op.drop_column("runs", "stop_reason")
