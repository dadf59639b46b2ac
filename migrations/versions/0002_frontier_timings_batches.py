"""Resume and provenance: frontier table, run timings/error, write batch ids, node components, roles.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUN_COLUMNS = ("wall_s", "eval_s", "write_s")

# Position-free component name (pathdb.graph.Node.component) for rows written before 0002.
_COMPONENT_SQL = """
UPDATE nodes SET component = CASE kind
    WHEN 'embed' THEN 'input'
    WHEN 'final' THEN 'logits'
    WHEN 'mlp' THEN 'm' || CAST(layer AS VARCHAR)
    ELSE 'a' || CAST(layer AS VARCHAR) || COALESCE('.h' || CAST(head AS VARCHAR), '')
END
"""


def upgrade() -> None:
    """Bring revision 0001 to the current ``pathdb.store.schema``; existing rows are kept."""
    for name in _RUN_COLUMNS:
        op.add_column("runs", sa.Column(name, sa.Double))
    op.add_column("runs", sa.Column("error", sa.Text))
    op.add_column("prompts", sa.Column("roles", sa.ARRAY(sa.String)))
    op.add_column("nodes", sa.Column("component", sa.String, nullable=False, server_default=""))
    op.execute(_COMPONENT_SQL)
    op.alter_column("nodes", "component", server_default=None)
    # Rows written before batches existed form batch 0.
    op.add_column("paths", sa.Column("batch_id", sa.BigInteger, nullable=False, server_default="0"))
    op.alter_column("paths", "batch_id", server_default=None)
    op.create_table(
        "frontier",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("path_id", sa.BigInteger, primary_key=True),
        sa.Column("priority", sa.Double),
    )


def downgrade() -> None:
    """Back to revision 0001 (drops the frontier and the columns 0002 added)."""
    op.drop_table("frontier")
    op.drop_column("paths", "batch_id")
    op.drop_column("nodes", "component")
    op.drop_column("prompts", "roles")
    op.drop_column("runs", "error")
    for name in reversed(_RUN_COLUMNS):
        op.drop_column("runs", name)
