"""The store's schema, defined once with SQLAlchemy Core (Alembic migrations must produce exactly this).

Paths are stored as a tree (DESIGN.md section 5): one ``paths`` row per *evaluated* path, pointing
at the path it extends (``parent_id``) plus the node it prepends (``node_id``), so storing an
evaluation is O(1). The root path ``[FINAL]`` is a row with ``parent_id`` NULL and depth 0.
Depth counts prepended nodes: ``[n, FINAL]`` has depth 1.
"""

from __future__ import annotations

from typing import Any

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
    # why the search stopped: completed (exhaustive) | max_time | top_n | interrupted | error;
    # NULL while running (and for runs finished before revision 0003 whose reason is unknown)
    Column("stop_reason", String),
    # set while this run is an unfinished --replace: the name of the run it replaces when it
    # completes (its own name is temporary until then)
    Column("replaces", String),
    # paths (IPE path searches) | edges (``pathdb attribute``: a score per edge, revision 0005)
    Column("kind", String, nullable=False, server_default="paths"),
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

# Role-aligned positional runs (revision 0006): the run's position axis, position -> name
# (``END``, ``S2``, ``S1+1``; pathdb.positions). No rows: positions are token indices.
positions = Table(
    "positions",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("position", SmallInteger, primary_key=True),
    Column("name", String, nullable=False),
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
    # write batch; a resumed run skips whole batches
    Column("batch_id", BigInteger, nullable=False),
)

# Per-run search state for resume: the frontier still to expand, as path ids, per write batch.
frontier = Table(
    "frontier",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("path_id", BigInteger, primary_key=True),
    Column("priority", Double),
)

# Faithfulness evaluations (``pathdb evaluate``, revision 0004): one row per evaluation of a run
# (settings, the full/empty circuit metrics, CPR, CMD, edges needed for 80% / 90%) ...
evaluations = Table(
    "evaluations",
    metadata,
    Column("evaluation_id", Integer, primary_key=True, autoincrement=False),  # max + 1
    Column("run_id", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("prompts", String, nullable=False),  # evaluation prompt set (bundled name or file)
    Column("heldout", Boolean, nullable=False),  # False: evaluated on the search's own prompts
    Column("n_prompts", Integer, nullable=False),
    # counterfactual | zero | mean | mean-positional
    Column("intervention", String, nullable=False),
    Column("metric", String, nullable=False),
    # edge score ranked: score | abs_score | pos_score | neg_score
    Column("score", String, nullable=False),
    Column("n_edges_total", Integer, nullable=False),  # real edges of the model's EAP-IG graph
    Column("m_full", Double, nullable=False),
    Column("m_empty", Double, nullable=False),
    Column("cpr", Double),
    Column("cmd", Double),
    Column("edges_80", Integer),
    Column("edges_90", Integer),
    Column("wall_s", Double),
    Column("package_version", String, nullable=False),
)

# ... and one row per evaluated circuit (curve signed | abs | paths; k = top-k edges or paths).
evaluation_points = Table(
    "evaluation_points",
    metadata,
    Column("evaluation_id", Integer, primary_key=True),
    Column("point", Integer, primary_key=True),
    Column("curve", String, nullable=False),
    Column("k", Integer, nullable=False),
    Column("fraction", Double),  # MIB edge fraction; NULL for user / scan counts and path points
    Column("n_edges", Integer, nullable=False),  # circuit edges after pruning
    Column("metric", Double, nullable=False),
    Column("faithfulness", Double, nullable=False),
    Column("source", String, nullable=False),  # mib | user | scan | paths
)

# Edge-score runs (``pathdb attribute``, revision 0005): one row per edge of EAP-IG's
# position-free graph (``edge_id`` = its index in ``pathdb.export.eap.eap_spec(...).edges``) ...
edge_scores = Table(
    "edge_scores",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("edge_id", Integer, primary_key=True),
    Column("edge", String, nullable=False),  # EAP-IG name, e.g. a0.h1->a1.h2<k>
    Column("src", String, nullable=False),  # sender component: input, a0.h1, m0
    Column("dst", String, nullable=False),  # receiver component without the q/k/v suffix
    Column("site", String),  # q | k | v for head receivers, NULL otherwise
    Column("score", Double, nullable=False),
    Column("in_graph", Boolean),  # learned-mask: the edge survives; NULL for scoring methods
)

# ... and one row per component where the method scores nodes (atp*: node level).
node_scores = Table(
    "node_scores",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("component", String, primary_key=True),
    Column("score", Double, nullable=False),
)


def _circuit_sums() -> list[Column[Any]]:
    """The sum columns of both circuit-aggregate tables (fresh objects: a Column joins one table)."""
    return [Column(c, Double, nullable=False) for c in ("s", "a", "pos", "neg")] + [
        Column(c, BigInteger, nullable=False) for c in ("n", "n_pos", "n_neg")
    ]


# The circuit aggregate of a completed path run (revision 0007, pathdb.store.circuit): the sums
# of its complete kept paths on each tree edge, as a node-id pair (sender src_id, receiver
# dst_id) ... ``s, a, pos, neg, n``: signed, |.|, positive, negative sums and path count of all
# of them; ``n_pos`` / ``n_neg``: how many are positive / negative (pathdb.query.tree.CIRCUIT_SUMS).
circuit_pairs = Table(
    "circuit_pairs",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("src_id", Integer, primary_key=True),
    Column("dst_id", Integer, primary_key=True),
    *_circuit_sums(),
)

# ... and on each node (every node on such a path, input and logits included).
circuit_nodes = Table(
    "circuit_nodes",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("node_id", Integer, primary_key=True),
    *_circuit_sums(),
)

# The group effects of a completed path run's receiver inputs (revision 0008, pathdb.store.effects):
# the metric change on the run's search prompts when every edge into the receiver (EAP-IG name:
# ``a1.h2<k>``, ``m3``, ``logits``) is corrupted at once; the default edge rule of export and
# evaluate (``group``) rescales the run's edge effects with them.
group_effects = Table(
    "group_effects",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("receiver", String, primary_key=True),
    Column("effect", Double, nullable=False),
)

# The refined edge rule's scores of a completed path run's top edges (revision 0009,
# pathdb.store.effects): the group rule's sender-capped magnitudes handed out in the order the
# refinement by edge-masked forwards on the search prompts chose (pathdb.evaluate.refine); the
# default edge rule (``refined``) of export and evaluate applies them without loading the model.
refined_edges = Table(
    "refined_edges",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("edge", String, primary_key=True),
    Column("score", Double, nullable=False),
)
