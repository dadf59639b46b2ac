"""The store's schema, defined once with SQLAlchemy Core (Alembic migrations must produce exactly this).

Paths are stored as a tree (DESIGN.md section 5): one ``paths`` row per *evaluated* path, pointing
at the path it extends (``parent_id``) plus the node it prepends (``node_id``), so storing an
evaluation is O(1). The root path ``[FINAL]`` is a row with ``parent_id`` NULL and depth 0.
Depth counts prepended nodes: ``[n, FINAL]`` has depth 1.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Integer,
    MetaData,
    Sequence,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.types import ARRAY

metadata = MetaData()

run_id_seq = Sequence("runs_run_id_seq", metadata=metadata)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Integer, run_id_seq, primary_key=True, server_default=run_id_seq.next_value()),
    Column("name", String, nullable=False, unique=True),
    Column("status", String, nullable=False),  # running | completed | interrupted | failed
    Column("created_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("model_name", String, nullable=False),
    Column("model_fingerprint", String, nullable=False),  # sha256 of the weights
    Column("n_layers", Integer, nullable=False),
    Column("n_heads", Integer, nullable=False),
    Column("d_model", Integer, nullable=False),
    Column("method", String, nullable=False),  # exact | attribution | hybrid
    Column("strategy", String, nullable=False),  # threshold | best-first | level-width
    Column("metric", String, nullable=False),
    Column("patch_type", String, nullable=False),  # zero | counterfactual | mean
    Column("prompt_mode", String, nullable=False),  # batch | per-prompt
    Column("positional", Boolean, nullable=False, quote=True),  # a DuckDB keyword: always quoted
    Column("root_position", Integer),  # FINAL position; NULL for non-positional searches
    Column("params", JSON, nullable=False),  # every search parameter, for resume and provenance
    Column("baseline", Double),  # clean metric value
    Column("package_version", String, nullable=False),
    Column("wall_s", Double),
    Column("eval_s", Double),  # time in evaluators
    Column("write_s", Double),  # time writing the store
    Column("n_evaluated", BigInteger, nullable=False, server_default="0"),
    Column("n_complete", BigInteger, nullable=False, server_default="0"),
    Column("n_kept", BigInteger, nullable=False, server_default="0"),
    Column("error", Text),
)

prompts = Table(
    "prompts",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("prompt_idx", Integer, primary_key=True),
    Column("clean", Text, nullable=False),
    Column("counterfactual", Text),
    Column("target", String, nullable=False),
    Column("cf_target", String),
    Column("target_id", Integer, nullable=False),
    Column("cf_target_id", Integer),
    Column("tokens", ARRAY(Integer), nullable=False),
    Column("token_strs", ARRAY(String), nullable=False),
    Column("cf_tokens", ARRAY(Integer)),
    Column("roles", ARRAY(String)),  # per-token role labels (IO, S1, S2, END, ...) or NULL
)

nodes = Table(
    "nodes",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("node_id", Integer, primary_key=True),
    Column("kind", String, nullable=False),  # embed | attn | mlp | final
    Column("layer", SmallInteger, nullable=False),  # -1 embed, n_layers final
    Column("head", SmallInteger),
    Column("site", String),  # q | kv | k | v
    Column("position", SmallInteger),
    Column("kv_position", SmallInteger),
    Column("label", String, nullable=False),  # pathdb.graph.Node.label
    Column("component", String, nullable=False),  # position-free name: input, a3.h2, m5, logits
)

paths = Table(
    "paths",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("path_id", BigInteger, primary_key=True),
    Column("parent_id", BigInteger),  # NULL for the root [FINAL]
    Column("node_id", Integer, nullable=False),  # the prepended node (the FINAL node for the root)
    Column("depth", SmallInteger, nullable=False),
    Column("prompt_idx", Integer),  # NULL in batch mode
    Column("contribution", Double),  # metric change when the path is patched; NULL for the root
    Column("method", String, nullable=False),  # exact | attribution | confirmed | root
    Column("complete", Boolean, nullable=False),
    Column("kept", Boolean, nullable=False),
    Column("batch_id", BigInteger, nullable=False),  # write batch; a resumed run skips whole batches
)

# Per-run search state for resume: the frontier still to expand, as path ids, per write batch.
frontier = Table(
    "frontier",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("path_id", BigInteger, primary_key=True),
    Column("priority", Double),
)
