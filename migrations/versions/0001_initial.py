"""Initial store: runs, prompts, nodes and paths (the tree of evaluated paths).

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUN_ID_SEQ = "runs_run_id_seq"


def upgrade() -> None:
    """Create the first version of the schema (no frontier, no timings, no batch ids)."""
    op.execute(sa.schema.CreateSequence(sa.Sequence(_RUN_ID_SEQ)))
    op.create_table(
        "runs",
        sa.Column(
            "run_id",
            sa.Integer,
            primary_key=True,
            server_default=sa.text(f"nextval('{_RUN_ID_SEQ}')"),
        ),
        sa.Column("name", sa.String, nullable=False, unique=True),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("model_name", sa.String, nullable=False),
        sa.Column("model_fingerprint", sa.String, nullable=False),
        sa.Column("n_layers", sa.Integer, nullable=False),
        sa.Column("n_heads", sa.Integer, nullable=False),
        sa.Column("d_model", sa.Integer, nullable=False),
        sa.Column("method", sa.String, nullable=False),
        sa.Column("strategy", sa.String, nullable=False),
        sa.Column("metric", sa.String, nullable=False),
        sa.Column("patch_type", sa.String, nullable=False),
        sa.Column("prompt_mode", sa.String, nullable=False),
        sa.Column("positional", sa.Boolean, nullable=False, quote=True),
        sa.Column("root_position", sa.Integer),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("baseline", sa.Double),
        sa.Column("package_version", sa.String, nullable=False),
        sa.Column("n_evaluated", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("n_complete", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("n_kept", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "prompts",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("prompt_idx", sa.Integer, primary_key=True),
        sa.Column("clean", sa.Text, nullable=False),
        sa.Column("counterfactual", sa.Text),
        sa.Column("target", sa.String, nullable=False),
        sa.Column("cf_target", sa.String),
        sa.Column("target_id", sa.Integer, nullable=False),
        sa.Column("cf_target_id", sa.Integer),
        sa.Column("tokens", sa.ARRAY(sa.Integer), nullable=False),
        sa.Column("token_strs", sa.ARRAY(sa.String), nullable=False),
        sa.Column("cf_tokens", sa.ARRAY(sa.Integer)),
    )
    op.create_table(
        "nodes",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("node_id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("layer", sa.SmallInteger, nullable=False),
        sa.Column("head", sa.SmallInteger),
        sa.Column("site", sa.String),
        sa.Column("position", sa.SmallInteger),
        sa.Column("kv_position", sa.SmallInteger),
        sa.Column("label", sa.String, nullable=False),
    )
    op.create_table(
        "paths",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("path_id", sa.BigInteger, primary_key=True),
        sa.Column("parent_id", sa.BigInteger),
        sa.Column("node_id", sa.Integer, nullable=False),
        sa.Column("depth", sa.SmallInteger, nullable=False),
        sa.Column("prompt_idx", sa.Integer),
        sa.Column("contribution", sa.Double),
        sa.Column("method", sa.String, nullable=False),
        sa.Column("complete", sa.Boolean, nullable=False),
        sa.Column("kept", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    """Drop everything revision 0001 created."""
    for table in ("paths", "nodes", "prompts", "runs"):
        op.drop_table(table)
    op.execute(sa.schema.DropSequence(sa.Sequence(_RUN_ID_SEQ)))
