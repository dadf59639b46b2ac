"""SQL views ensured on every writable open (``CREATE OR REPLACE VIEW``), for ``pathdb sql``.

Paths are stored as a tree (one ``paths`` row = parent path + prepended node); these views
expand it. Steps count from the start node: step 0 is the path's first node (the node its row
prepended), the last step is the FINAL (``logits``) node.

``v_runs``
    runs without the ``params`` JSON, plus ``n_paths``, ``n_complete_paths``, ``n_kept_paths``,
    ``n_nodes`` and ``n_prompts``; for threshold runs that stored every path, ``n_pruned`` (partial
    paths the rule did not extend) and ``pruned_mass`` (their summed |score|: a rough size of
    what may lie below them; NULL for other strategies and for ``--store kept``).
``v_paths``
    every ``paths`` row plus its prepended node's ``label``, ``kind``, ``layer``, ``component``
    and the run's name (``run_name``).
``v_path_nodes``
    ``run_id, path_id, step, node_id, label, kind, layer, head, site, position, kv_position,
    component``: one row per node of every path.
``v_path_edges``
    ``run_id, path_id, step, src_node_id, dst_node_id, src_label, dst_label, src_component,
    dst_component, contribution, complete, kept, prompt_idx, method``: one row per edge
    (``step`` = the source node's step); the path's own score/flags are repeated on each edge.
``v_path_strings``
    ``run_id, path_id, path, contribution, depth, complete, kept, method, prompt_idx`` with
    ``path`` like ``input@3 -> a3.h0<q>@10 -> logits@14``.
``v_edges``
    ``run_id, run_name, kind, method, edge, src, dst, site, score``: the position-free edge scores
    of every run in one table, EAP-IG names (``a0.h1->a1.h2<k>``). Edge runs (``pathdb attribute``,
    ``kind = 'edges'``) give their stored scores; path runs the signed sum of their complete kept
    paths through the edge (a kv-side destination half on ``<k>``, half on ``<v>``, as
    ``pathdb query edges``).

The expanding views walk every path of every run; filter on ``run_id``/``path_id`` and prefer
``v_paths`` (or ``pathdb.store.reader.iter_paths``) for bulk work on large runs. Example::

    SELECT path, contribution FROM v_path_strings
    WHERE run_id = 1 AND complete ORDER BY abs(contribution) DESC LIMIT 10;
"""

from __future__ import annotations

import hashlib

import duckdb

# One row per (path, ancestor): step 0 is the path's own row, step k its k-th ancestor.
_CHAIN = """
WITH RECURSIVE chain(run_id, path_id, step, cur_id, node_id, parent_id) AS (
    SELECT run_id, path_id, 0, path_id, node_id, parent_id FROM paths
    UNION ALL
    SELECT c.run_id, c.path_id, c.step + 1, p.path_id, p.node_id, p.parent_id
    FROM chain c JOIN paths p ON p.run_id = c.run_id AND p.path_id = c.parent_id
)
"""

VIEWS: dict[str, str] = {
    "v_runs": """
        SELECT r.* EXCLUDE (params),
               coalesce(p.n_paths, 0) AS n_paths,
               coalesce(p.n_complete_paths, 0) AS n_complete_paths,
               coalesce(p.n_kept_paths, 0) AS n_kept_paths,
               CASE WHEN r.strategy = 'threshold'
                         AND coalesce(json_extract_string(r.params, '$.store_level'), 'all') = 'all'
                    THEN coalesce(p.n_pruned, 0) END AS n_pruned,
               CASE WHEN r.strategy = 'threshold'
                         AND coalesce(json_extract_string(r.params, '$.store_level'), 'all') = 'all'
                    THEN coalesce(p.pruned_mass, 0) END AS pruned_mass,
               coalesce(n.n_nodes, 0) AS n_nodes,
               coalesce(q.n_prompts, 0) AS n_prompts
        FROM runs r
        LEFT JOIN (SELECT run_id, count(*) AS n_paths,
                          count(*) FILTER (WHERE complete) AS n_complete_paths,
                          count(*) FILTER (WHERE kept) AS n_kept_paths,
                          count(*) FILTER (WHERE NOT complete AND NOT kept
                                           AND contribution IS NOT NULL) AS n_pruned,
                          sum(abs(contribution)) FILTER (WHERE NOT complete AND NOT kept)
                              AS pruned_mass
                   FROM paths GROUP BY run_id) p USING (run_id)
        LEFT JOIN (SELECT run_id, count(*) AS n_nodes FROM nodes GROUP BY run_id) n
               USING (run_id)
        LEFT JOIN (SELECT run_id, count(*) AS n_prompts FROM prompts GROUP BY run_id) q
               USING (run_id)
    """,
    "v_paths": """
        SELECT p.*, n.label, n.kind, n.layer, n.component, r.name AS run_name
        FROM paths p
        JOIN nodes n ON n.run_id = p.run_id AND n.node_id = p.node_id
        JOIN runs r ON r.run_id = p.run_id
    """,
    "v_path_nodes": _CHAIN
    + """
        SELECT c.run_id, c.path_id, c.step, c.node_id, n.label, n.kind, n.layer, n.head,
               n.site, n.position, n.kv_position, n.component
        FROM chain c JOIN nodes n ON n.run_id = c.run_id AND n.node_id = c.node_id
    """,
    "v_path_edges": _CHAIN
    + """
        SELECT c.run_id, c.path_id, c.step,
               c.node_id AS src_node_id, parent.node_id AS dst_node_id,
               s.label AS src_label, d.label AS dst_label,
               s.component AS src_component, d.component AS dst_component,
               leaf.contribution, leaf.complete, leaf.kept, leaf.prompt_idx, leaf.method
        FROM chain c
        JOIN paths parent ON parent.run_id = c.run_id AND parent.path_id = c.parent_id
        JOIN paths leaf ON leaf.run_id = c.run_id AND leaf.path_id = c.path_id
        JOIN nodes s ON s.run_id = c.run_id AND s.node_id = c.node_id
        JOIN nodes d ON d.run_id = c.run_id AND d.node_id = parent.node_id
    """,
    "v_path_strings": """
        SELECT p.run_id, p.path_id, s.path, p.contribution, p.depth, p.complete, p.kept,
               p.method, p.prompt_idx
        FROM paths p
        JOIN (SELECT run_id, path_id, string_agg(label, ' -> ' ORDER BY step) AS path
              FROM v_path_nodes GROUP BY run_id, path_id) s USING (run_id, path_id)
    """,
    "v_edges": """
        SELECT r.run_id, r.name AS run_name, r.kind, r.method, e.edge, e.src, e.dst, e.site, e.score
        FROM runs r JOIN edge_scores e USING (run_id)
        UNION ALL
        SELECT pe.run_id, any_value(r.name), 'paths', any_value(r.method),
               pe.src_component || '->' || pe.dst_component || coalesce('<' || sx.esite || '>', ''),
               pe.src_component, pe.dst_component, sx.esite,
               sum(pe.contribution * coalesce(sx.w, 1.0))
        FROM v_path_edges pe
        JOIN runs r ON r.run_id = pe.run_id
        JOIN nodes d ON d.run_id = pe.run_id AND d.node_id = pe.dst_node_id
        LEFT JOIN (VALUES ('q', 'q', 1.0), ('k', 'k', 1.0), ('v', 'v', 1.0), ('kv', 'k', 0.5),
                          ('kv', 'v', 0.5)) AS sx(site, esite, w) ON sx.site = d.site
        WHERE pe.complete AND pe.kept
        GROUP BY pe.run_id, pe.src_component, pe.dst_component, sx.esite
    """,
}


# Each installed view carries a hash of its definition as its comment: a writable open skips
# the install (tens of milliseconds of catalog writes) when every view already stands as defined
# here. CREATE OR REPLACE VIEW (another pathdb version's install) drops the comment.
_TAGS: dict[str, str] = {
    name: "pathdb " + hashlib.sha256(f"{name}\n{sql}".encode()).hexdigest()[:16]
    for name, sql in VIEWS.items()
}


def current(con: duckdb.DuckDBPyConnection) -> bool:
    """True when every view in :data:`VIEWS` is installed with this version's definition."""
    rows = con.execute(
        "SELECT view_name, comment FROM duckdb_views() WHERE schema_name = 'main' AND NOT internal"
    ).fetchall()
    have = dict(rows)
    return all(have.get(name) == tag for name, tag in _TAGS.items())


def install(con: duckdb.DuckDBPyConnection, *, force: bool = False) -> None:
    """Create or replace every view in :data:`VIEWS` (idempotent; run on writable opens), unless
    they are :func:`current` and not ``force`` (a migration just changed the tables)."""
    if not force and current(con):
        return
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        con.execute(f"COMMENT ON VIEW {name} IS '{_TAGS[name]}'")


def drop(con: duckdb.DuckDBPyConnection) -> None:
    """Drop every view in :data:`VIEWS` (before a downgrade; the next writable open reinstalls)."""
    for name in reversed(list(VIEWS)):
        con.execute(f"DROP VIEW IF EXISTS {name}")
