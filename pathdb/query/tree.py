"""Bottom-up aggregation over the stored path tree, level by level, inside DuckDB.

An edge ``node(a) -> node(parent(a))`` of the tree carries every selected (complete kept) path in
the subtree of row ``a``; so the edge sums of all selected paths equal the subtree sums of the tree
rows, pushed up one depth level at a time (one small join per level, collapsing shared ancestors).
This visits each ancestor once instead of once per path, and each level is materialised as an Arrow
table so DuckDB always builds its hash tables on the small side. :func:`subtree_sums` gives the
same edge and node sums from one read of a run's kept rows, summed in NumPy; :func:`circuit_sums`
runs that walk once when a run completes, with per-sign weights, for the store to keep, and
:func:`stored_sums` reads it back (the explorer's cold first paint: a few thousand rows instead
of a scan of the run).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

W = "s, a, pos, neg, n"
_SUM_W = "sum(s) AS s, sum(a) AS a, sum(pos) AS pos, sum(neg) AS neg, sum(n) AS n"
_counter = itertools.count()


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, table: pa.Table) -> Iterator[str]:
    """Register an Arrow table under a fresh name for the duration of the block."""
    name = f"_pathdb_tmp_{next(_counter)}"
    con.register(name, table)
    try:
        yield name
    finally:
        con.unregister(name)


def ancestry(con: duckdb.DuckDBPyConnection, selection: str) -> pa.Table:
    """Every tree row on the way from the selected paths to their roots, with subtree weights.

    ``selection``: SELECT of ``run_id, prompt_idx, path_id, parent_id, node_id, depth, c``.
    Returns ``run_id, prompt_idx, path_id, parent_id, node_id, s, a, pos, neg, n`` where the weights
    are the signed / absolute / positive / negative sums and the count of selected paths at or below
    the row (grouped by the selected paths' prompt_idx, so shared ancestors stay per prompt).
    """
    sel = con.sql(
        f"""SELECT run_id, prompt_idx, path_id, parent_id, node_id, depth, c AS s, abs(c) AS a,
                   greatest(c, 0) AS pos, least(c, 0) AS neg, 1::BIGINT AS n
            FROM ({selection})"""
    ).to_arrow_table()
    out: list[pa.Table] = []
    if sel.num_rows == 0:
        return sel.drop_columns(["depth"])
    with registered(con, sel) as sel_name:
        max_depth = con.execute(f"SELECT max(depth) FROM {sel_name}").fetchall()[0]
        assert max_depth is not None
        carry: pa.Table | None = None
        for d in range(int(max_depth[0]), -1, -1):
            parts = [
                f"SELECT run_id, prompt_idx, path_id, parent_id, node_id, {W} FROM {sel_name} WHERE depth = {d}"
            ]
            if carry is not None:
                parts.append(
                    f"SELECT run_id, prompt_idx, path_id, parent_id, node_id, {W} FROM {{carry}}"
                )
            with registered(con, carry if carry is not None else sel) as carry_name:
                union = " UNION ALL ".join(parts).replace("{carry}", carry_name)
                level = _arrow(
                    con.sql(
                        f"""SELECT run_id, prompt_idx, path_id, any_value(parent_id) AS parent_id,
                               any_value(node_id) AS node_id, {_SUM_W}
                        FROM ({union}) GROUP BY run_id, prompt_idx, path_id"""
                    )
                )
            out.append(level)
            if d == 0:
                break
            with registered(con, level) as lvl:
                up = _arrow(
                    con.sql(
                        f"""SELECT run_id, prompt_idx, parent_id AS path_id, {_SUM_W} FROM {lvl}
                        WHERE parent_id IS NOT NULL GROUP BY run_id, prompt_idx, parent_id"""
                    )
                )
            with registered(con, up) as up_name:
                carry = _arrow(
                    con.sql(
                        f"""WITH par AS (SELECT run_id, path_id, parent_id, node_id FROM paths
                                     WHERE depth = {d - 1} AND path_id IN (SELECT path_id FROM {up_name}))
                        SELECT u.run_id, u.prompt_idx, u.path_id, par.parent_id, par.node_id, {W}
                        FROM {up_name} u JOIN par ON par.run_id = u.run_id AND par.path_id = u.path_id"""
                    )
                )
    return pa.concat_tables(out)


def _arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    return rel.to_arrow_table()


def edge_pairs(con: duckdb.DuckDBPyConnection, anc: pa.Table, *, by_prompt: bool) -> pa.Table:
    """Edges as node-id pairs: ``run_id, [prompt_idx,] src_id, dst_id, s, a, pos, neg, n``."""
    key = "c.run_id, c.prompt_idx" if by_prompt else "c.run_id"
    with registered(con, anc) as t:
        return _arrow(
            con.sql(
                f"""SELECT {key}, c.node_id AS src_id, p.node_id AS dst_id, {_SUM_W.replace("sum(", "sum(c.")}
                FROM {t} c JOIN {t} p ON p.run_id = c.run_id AND p.prompt_idx IS NOT DISTINCT FROM c.prompt_idx
                     AND p.path_id = c.parent_id
                GROUP BY {key}, c.node_id, p.node_id"""
            )
        )


def node_weights(con: duckdb.DuckDBPyConnection, anc: pa.Table, *, by_prompt: bool) -> pa.Table:
    """Node occurrences as node ids: ``run_id, [prompt_idx,] node_id, s, a, pos, neg, n``."""
    key = "run_id, prompt_idx" if by_prompt else "run_id"
    with registered(con, anc) as t:
        return _arrow(con.sql(f"SELECT {key}, node_id, {_SUM_W} FROM {t} GROUP BY {key}, node_id"))


_TREE_COLS = "path_id, parent_id, node_id, depth"


def subtree_sums(con: duckdb.DuckDBPyConnection, selection: str) -> tuple[pa.Table, pa.Table]:
    """``(edge_pairs(anc), node_weights(anc))`` with ``by_prompt=False`` for
    ``anc = ancestry(con, selection)``, from one read of the selected rows plus their runs' kept
    partial paths (which hold the selected paths' chains: a kept path's ancestors are kept),
    summed bottom-up in NumPy; an ancestor not among them is looked up by id, so the result never
    depends on that. The explorer's cold first paint: no per-level scans of the whole store."""
    sel = con.sql(f"SELECT run_id, {_TREE_COLS}, c FROM ({selection})").fetchnumpy()
    return _walked(con, sel, _path_weights)


def _path_weights(c: np.ndarray) -> dict[str, np.ndarray]:
    """Each selected path's own ``s, a, pos, neg, n`` (what :func:`ancestry` sums)."""
    return {
        "s": c, "a": np.abs(c), "pos": np.maximum(c, 0.0), "neg": np.minimum(c, 0.0),
        "n": np.ones_like(c),
    }  # fmt: skip


def _walked(
    con: duckdb.DuckDBPyConnection,
    sel: Mapping[str, np.ndarray],
    weigh: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> tuple[pa.Table, pa.Table]:
    """Edge-pair and node sums, per run, of the weights ``weigh(c)`` of the selected rows ``sel``
    (``run_id, path_id, parent_id, node_id, depth, c``) pushed up to all their ancestors."""
    pairs: list[pa.Table] = []
    weights: list[pa.Table] = []
    for run_id in np.unique(sel["run_id"]).tolist():
        mine = sel["run_id"] == run_id
        part = {k: v[mine] for k, v in sel.items()}
        w = weigh(np.asarray(part["c"], np.float64))
        tree = _run_ancestors(con, int(run_id), part, w)
        pairs.append(_pairs_of(int(run_id), tree, list(w)))
        nodes = {k: tree[k] for k in w}
        weights.append(_grouped(int(run_id), {"node_id": tree["node_id"]}, nodes))
    if not pairs:  # nothing selected (e.g. no negative path): empty tables of the same columns
        none = np.zeros(0, np.int32)
        empty = weigh(np.zeros(0))
        pairs.append(_grouped(0, {"src_id": none, "dst_id": none}, empty))
        weights.append(_grouped(0, {"node_id": none}, empty))
    return pa.concat_tables(pairs), pa.concat_tables(weights)


#: The circuit aggregate a store keeps per completed run (revision 0007, tables ``circuit_pairs``
#: and ``circuit_nodes``): the sums of :func:`ancestry` over all complete kept paths plus those
#: of the positive ones (``pos``, ``n_pos``) and negative ones (``neg``, ``n_neg``), from which
#: every sign's ``s, a, pos, neg, n`` follow exactly (a sum of x and 0.0 is x).
CIRCUIT_SUMS = ("s", "a", "pos", "neg", "n", "n_pos", "n_neg")
#: ``s, a, pos, neg, n`` of the paths of one sign, from the stored :data:`CIRCUIT_SUMS`
_SIGNED = {
    None: "s, a, pos, neg, n",
    "positive": "pos AS s, pos AS a, pos, 0.0::DOUBLE AS neg, n_pos AS n",
    "negative": "neg AS s, -neg AS a, 0.0::DOUBLE AS pos, neg, n_neg AS n",
}


def _sign_weights(c: np.ndarray) -> dict[str, np.ndarray]:
    """Each complete kept path's own :data:`CIRCUIT_SUMS`."""
    return {**_path_weights(c), "n_pos": (c > 0).astype(np.float64),
            "n_neg": (c < 0).astype(np.float64)}  # fmt: skip


def circuit_sums(con: duckdb.DuckDBPyConnection, run_id: int) -> tuple[pa.Table, pa.Table]:
    """The circuit aggregate of run ``run_id`` for the store to keep: ``run_id, src_id, dst_id``
    and ``run_id, node_id`` with :data:`CIRCUIT_SUMS` of its complete kept paths (one
    :func:`subtree_sums` walk: the run's kept rows read once)."""
    from pathdb.query.expand import complete_kept_selection

    sel = con.sql(
        f"SELECT run_id, {_TREE_COLS}, c FROM ({complete_kept_selection(str(int(run_id)))})"
    ).fetchnumpy()
    return _walked(con, sel, _sign_weights)


def stored_sums(
    con: duckdb.DuckDBPyConnection, run_ids: Sequence[int], sign: str | None
) -> tuple[pa.Table, pa.Table] | None:
    """:func:`subtree_sums` of the runs' complete kept paths of that ``sign`` (None: all) read
    from the circuit aggregate the store keeps (:func:`circuit_sums`); None when a run has none
    (not completed, or no complete kept path; a store older than revision 0007 has none at all):
    walk its paths then."""
    ids = ", ".join(str(int(r)) for r in sorted(set(run_ids)))
    try:
        have = con.execute(
            f"SELECT count(DISTINCT run_id) FROM circuit_nodes WHERE run_id IN ({ids})"
        ).fetchall()
    except duckdb.CatalogException:
        return None
    if have[0][0] < len(set(run_ids)):
        return None
    cols, n = _SIGNED[sign], {None: "n", "positive": "n_pos", "negative": "n_neg"}[sign]
    read = [
        con.sql(
            f"SELECT run_id, {key}, {cols} FROM {table} WHERE run_id IN ({ids}) AND {n} > 0"
        ).to_arrow_table()
        for table, key in (("circuit_pairs", "src_id, dst_id"), ("circuit_nodes", "node_id"))
    ]
    return read[0], read[1]


def _tree_rows(con: duckdb.DuckDBPyConnection, run_id: int, where: str) -> dict[str, np.ndarray]:
    """``path_id, parent_id (-1: root), node_id, depth`` of the run's paths matching ``where``."""
    got = con.sql(
        f"SELECT {_TREE_COLS} FROM paths WHERE run_id = {int(run_id)} AND ({where})"
    ).fetchnumpy()
    return _plain(got)


def _plain(cols: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Tree columns as plain NumPy arrays, a NULL parent as -1."""
    parent: np.ma.MaskedArray = np.ma.asarray(cols["parent_id"])
    return {
        "path_id": np.asarray(cols["path_id"], np.int64),
        "parent_id": np.ma.filled(parent.astype(np.int64), -1),
        "node_id": np.asarray(cols["node_id"], np.int32),
        "depth": np.asarray(cols["depth"], np.int64),
    }


def _run_ancestors(
    con: duckdb.DuckDBPyConnection,
    run_id: int,
    sel: dict[str, np.ndarray],
    w: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The selected paths of one run and all their ancestors (each row once, sorted by path id)
    with subtree sums of the selected paths' weights ``w`` at or below each row."""
    known = _plain(sel)
    extra = _tree_rows(con, run_id, "kept AND NOT complete")
    known, inside = _merged(known, extra, np.zeros(0, bool))
    inside[np.searchsorted(known["path_id"], np.asarray(sel["path_id"], np.int64))] = True
    todo = _distinct(known["parent_id"][inside])
    while todo.size:
        at = np.searchsorted(known["path_id"], todo)
        found = _hits(known["path_id"], todo, at)
        if not found.all():  # an ancestor that is not kept: read it by id, then look again
            ids = ", ".join(map(str, todo[~found].tolist()))
            known, inside = _merged(known, _tree_rows(con, run_id, f"path_id IN ({ids})"), inside)
            at = np.searchsorted(known["path_id"], todo)
            found = _hits(known["path_id"], todo, at)
        new = at[found][~inside[at[found]]]
        inside[new] = True
        todo = _distinct(known["parent_id"][new])
    tree = {k: v[inside] for k, v in known.items()}
    return _summed(tree, sel, w)


def _hits(ids: np.ndarray, wanted: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Which ``wanted`` ids the sorted ``ids`` hold, given ``at = searchsorted(ids, wanted)``."""
    return (at < ids.size) & (ids[np.minimum(at, max(ids.size - 1, 0))] == wanted)


def _distinct(ids: np.ndarray) -> np.ndarray:
    """The distinct non-negative values of ``ids``, sorted (-1 marks no parent)."""
    ids = np.sort(ids[ids >= 0])
    return ids[np.concatenate([[True], ids[1:] != ids[:-1]])] if ids.size else ids


def _merged(
    known: dict[str, np.ndarray], more: dict[str, np.ndarray], inside: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``known`` plus the rows ``more`` (a path id twice: kept once), sorted by path id, and the
    ``inside`` flags (of ``known``'s rows; False for the new ones) in that order."""
    both = {k: np.concatenate([v, more[k]]) for k, v in known.items()}
    order = np.argsort(both["path_id"], kind="stable")
    flags = np.concatenate([inside, np.zeros(len(both["path_id"]) - len(inside), bool)])[order]
    ids = both["path_id"][order]
    first = np.concatenate([[True], ids[1:] != ids[:-1]]) if ids.size else np.zeros(0, bool)
    keep = order[first]
    return {k: v[keep] for k, v in both.items()}, flags[first]


def _summed(
    tree: dict[str, np.ndarray], sel: dict[str, np.ndarray], weights: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``tree`` with the selected paths' ``weights`` pushed up to every ancestor, deepest level
    first (each weight summed in the same order whatever the others are)."""
    ids = tree["path_id"]
    m = len(ids)
    own = np.searchsorted(ids, np.asarray(sel["path_id"], np.int64))
    w = np.zeros((len(weights), m))
    for k, v in enumerate(weights.values()):
        w[k, own] = v
    at = np.searchsorted(ids, tree["parent_id"])
    up = np.where(_hits(ids, tree["parent_id"], at), at, -1)
    for d in range(int(tree["depth"].max(initial=0)), 0, -1):
        rows = np.flatnonzero((tree["depth"] == d) & (up >= 0))
        for k in range(w.shape[0]):
            w[k] += np.bincount(up[rows], weights=w[k, rows], minlength=m)
    return {**tree, "up": up, **{name: w[k] for k, name in enumerate(weights)}}


def _pairs_of(run_id: int, tree: dict[str, np.ndarray], names: list[str]) -> pa.Table:
    """Edge weights by node-id pair: each row's subtree sums on (its node, its parent's node)."""
    child = np.flatnonzero(tree["up"] >= 0)
    src = tree["node_id"][child]
    dst = tree["node_id"][tree["up"][child]]
    return _grouped(run_id, {"src_id": src, "dst_id": dst}, {k: tree[k][child] for k in names})


def _grouped(run_id: int, keys: dict[str, np.ndarray], w: dict[str, np.ndarray]) -> pa.Table:
    """``run_id, *keys, *w`` summed per distinct key tuple (int32 node ids; the counts ``n`` and
    ``n_*`` as BIGINT, the sums as DOUBLE)."""
    code = np.zeros(len(next(iter(w.values()))), np.int64)
    for k in keys.values():
        code = (code << 32) | k.astype(np.int64)
    order = np.argsort(code, kind="stable")
    ranked = code[order]
    starts = np.concatenate([[True], ranked[1:] != ranked[:-1]]) if code.size else order > 0
    uniq = ranked[starts]
    inv = np.empty_like(order)
    inv[order] = np.cumsum(starts) - 1
    cols: dict[str, object] = {"run_id": pa.array(np.full(len(uniq), run_id, np.int32))}
    for i, name in enumerate(keys):
        shift = 32 * (len(keys) - 1 - i)
        cols[name] = pa.array(((uniq >> shift) & 0xFFFFFFFF).astype(np.int32))
    for name, v in w.items():
        summed = np.bincount(inv, weights=v, minlength=len(uniq))
        count = name == "n" or name.startswith("n_")
        cols[name] = pa.array(summed.astype(np.int64) if count else summed)
    return pa.table(cols)
