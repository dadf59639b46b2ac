"""The explorer's cold circuit (one read of a run's kept rows, summed in NumPy:
:func:`pathdb.query.tree.subtree_sums`) equals the query layer's level-by-level walk on a real
store of several runs whose path ids overlap, reads the store a fixed number of times whatever
the tree's depth, and `pathdb serve` leaves the store file untouched."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest

from pathdb.graph import Node, Site
from pathdb.query import edges, nodes
from pathdb.query.aggregate import edges_and_nodes, select_edges
from pathdb.serve.data import MAX_EDGES
from pathdb.store.db import open_store
from pathdb.store.writer import RunWriter
from tests.serve_fixtures import serving

L, H, T = 3, 2, 3  # a small positional graph: layers, heads, positions
META = {
    "model_name": "toy-shape", "model_fingerprint": "0" * 64, "n_layers": L, "n_heads": H,
    "d_model": 16, "method": "hybrid", "strategy": "threshold", "metric": "logit_diff",
    "patch_type": "counterfactual", "positional": True, "root_position": T - 1,
    "params": {"min_contribution": 0.01}, "baseline": 1.0, "package_version": "test",
}  # fmt: skip
#: run name -> (seed, prompt mode, tree depth, share of pruned partials that are still extended)
RUNS = {
    "per": (1, "per-prompt", 5, 0.0),
    "batch": (2, "batch", 4, 0.0),
    "unkept": (3, "per-prompt", 5, 0.3),  # complete kept paths below partials that are not kept
    "shallow": (4, "batch", 2, 0.0),
    "deep": (5, "batch", 8, 0.0),
}


def _graph() -> list[Node]:
    """Every positional node of the small graph, FINAL first."""
    out = [Node.final(L, T - 1)]
    for p in range(T):
        out.append(Node.embed(p))
        for layer in range(L):
            for h in range(H):
                out.append(Node.attn(layer, h, Site.Q, p))
                out.extend(Node.attn(layer, h, Site.KV, p, k) for k in range(p + 1))
            out.append(Node.mlp(layer, p))
    return out


def _write_run(store: Any, name: str) -> None:
    """One run through the store's own writer: random search tree, ids from 0 like every run."""
    seed, mode, depth, unkept = RUNS[name]
    rng = np.random.default_rng(seed)
    w = RunWriter.create(store, name=name, meta={**META, "prompt_mode": mode})
    graph = _graph()
    ids = np.array([w.node_id(n) for n in graph])
    kinds = np.array([str(n.kind) for n in graph])
    embed, inner = ids[kinds == "embed"], ids[(kinds == "attn") | (kinds == "mlp")]
    prompts: list[int | None] = [0, 1] if mode == "per-prompt" else [None]
    if mode == "per-prompt":
        w.add_prompts([
            {"prompt_idx": p, "clean": f"prompt {p}", "target": "t", "target_id": 0,
             "tokens": list(range(T)), "token_strs": ["t"] * T}
            for p in (0, 1)
        ])  # fmt: skip
    for prompt in prompts:
        frontier = w.add_paths([-1], [ids[0]], [0], prompt, [np.nan], "root", [False], [True])
        for d in range(1, depth + 1):
            n = 30 + 20 * d
            parent = frontier[rng.integers(0, len(frontier), n)]
            complete = rng.random(n) < (0.3 if d < depth else 1.0)
            node = np.where(complete, rng.choice(embed, n), rng.choice(inner, n))
            kept = np.where(complete, rng.random(n) < 0.7, rng.random(n) < 0.5)
            contrib = rng.standard_normal(n)
            method = np.where(complete, "exact", "attribution")
            new = w.add_paths(parent, node, d, prompt, contrib, method, complete, kept)
            extended = ~complete & (kept | (rng.random(n) < unkept))
            frontier = new[extended] if extended.any() else frontier
        w.flush()
    w.finish("completed")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve_cold") / "runs.duckdb"
    with open_store(path) as store:
        for name in RUNS:
            _write_run(store, name)
    return path


@pytest.fixture()
def con(db: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with open_store(db, read_only=True) as store:
        yield store.con


def _by(df: pd.DataFrame, key: str) -> pd.DataFrame:
    return df.sort_values(key, kind="mergesort").reset_index(drop=True)


def test_the_store_exercises_shared_ids_and_unkept_ancestors(
    con: duckdb.DuckDBPyConnection,
) -> None:
    shared = con.execute(
        "SELECT count(*) FROM (SELECT path_id FROM paths GROUP BY path_id HAVING count(*) = 5)"
    ).fetchall()[0][0]
    unkept = con.execute(
        """SELECT count(*) FROM paths c JOIN paths p ON p.run_id = c.run_id AND p.path_id = c.parent_id
           WHERE c.complete AND c.kept AND NOT p.kept"""
    ).fetchall()[0][0]
    assert shared > 100  # every run numbers its paths from 0: a missing run filter mixes trees
    assert unkept > 0  # ancestors outside the kept rows: read by id


@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("sign", [None, "negative"])
def test_fast_circuit_equals_the_level_by_level_walk(
    con: duckdb.DuckDBPyConnection, positional: bool, sign: str | None
) -> None:
    for run in ("per", "batch", "unkept"):
        got_e, got_n = edges_and_nodes(con, run, positional=positional, sign=sign)
        want_e = edges(con, run, positional=positional, sign=sign)
        want_n = nodes(con, run, positional=positional, sign=sign)
        assert len(got_e) == len(want_e) > 10 and len(got_n) == len(want_n) > 5, run
        pd.testing.assert_frame_equal(_by(got_e, "edge"), _by(want_e, "edge"), rtol=1e-12)
        pd.testing.assert_frame_equal(_by(got_n, "node"), _by(want_n, "node"), rtol=1e-12)
        top = select_edges(got_e, top_k=20, threshold=None, by="abs")
        assert list(top["edge"]) == list(
            select_edges(want_e, top_k=20, threshold=None, by="abs")["edge"]
        )


def test_pooled_runs_equal_the_level_by_level_walk(con: duckdb.DuckDBPyConnection) -> None:
    got_e, got_n = edges_and_nodes(con, ["per", "unkept", "deep"])
    want_e, want_n = edges(con, ["per", "unkept", "deep"]), nodes(con, ["per", "unkept", "deep"])
    pd.testing.assert_frame_equal(_by(got_e, "edge"), _by(want_e, "edge"), rtol=1e-12)
    pd.testing.assert_frame_equal(_by(got_n, "node"), _by(want_n, "node"), rtol=1e-12)


class _Counting:
    """A connection that counts the statements sent to DuckDB and forwards everything."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con, self.statements = con, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.con, name)
        if name in ("sql", "execute", "query"):
            self.statements += 1
        return attr


def test_cold_circuit_reads_the_store_a_fixed_number_of_times(
    con: duckdb.DuckDBPyConnection,
) -> None:
    counts = {}
    for run in ("shallow", "deep"):
        spy = _Counting(con)
        edges_and_nodes(spy, run)  # type: ignore[arg-type]
        counts[run] = spy.statements
    assert con.execute("SELECT max(depth) FROM paths WHERE run_id = 5").fetchall()[0][0] == 8
    assert counts["deep"] == counts["shallow"], counts  # no statement per tree level


def _fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as res:
        return json.loads(res.read())


def test_serve_paints_the_reference_circuit_and_leaves_the_store_untouched(db: Path) -> None:
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns)
    files = sorted(p.name for p in db.parent.iterdir())
    with serving(db) as (url, _):
        got = {run: _fetch(f"{url}api/runs/{run}/edges") for run in ("unkept", "deep")}
        node_scores = _fetch(f"{url}api/runs/unkept/nodes?sign=negative")
        negative = _fetch(f"{url}api/runs/unkept/edges?sign=negative")
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns) == before
    assert sorted(p.name for p in db.parent.iterdir()) == files  # no WAL, no lock file left
    with open_store(db, read_only=True) as store:
        for run, body in [*got.items(), ("unkept-negative", negative)]:
            name, sign = (run, None) if run in RUNS else ("unkept", "negative")
            want = edges(store.con, name, sign=sign)
            top = select_edges(want, top_k=MAX_EDGES, threshold=None, by="abs")
            assert body["total_edges"] == len(want)
            assert [e["edge"] for e in body["edges"]] == list(top["edge"])
            assert [e["score"] for e in body["edges"]] == pytest.approx(
                list(top["score"]), rel=1e-12
            )
        want_n = nodes(store.con, "unkept", sign="negative").set_index("node")
    assert node_scores["nodes"]
    for row in node_scores["nodes"]:
        assert row["score"] == pytest.approx(want_n.loc[row["node"], "score"], rel=1e-12)
        assert row["n_paths"] == want_n.loc[row["node"], "n_paths"]
