"""Query layer: aggregates, circuits, signed sub-circuits, top paths and SQL against hand computations."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from pathdb.graph import Node, NodeKind, path_label
from pathdb.query import (
    QueryError,
    circuit,
    edges,
    nodes,
    positive_negative,
    signed_circuits,
    sql,
    top_paths,
)
from tests.conftest_query import TreeBuilder, add_prompt, add_run, make_store

L, H = 2, 2
F = Node.final(L, 3)
E = Node.embed
A = Node.attn
M = Node.mlp

# (path, contribution, kept) -- P2 (negative) and P3 (positive) share m1@3->logits@3 and a0.h1->m1
PATHS: list[tuple[tuple[Node, ...], float, bool]] = [
    ((E(3), A(0, 1, "q", 3), F), 1.0, True),
    ((E(1), A(0, 1, "kv", 3, 1), M(1, 3), F), -2.0, True),
    ((E(3), A(0, 1, "q", 3), M(1, 3), F), 0.5, True),
    ((E(2), A(0, 0, "k", 3, 2), A(1, 0, "q", 3), F), 3.0, True),
    ((E(3), M(0, 3), A(1, 0, "v", 3, 3), F), -0.25, True),
    ((E(3), A(1, 1, "q", 3), F), 5.0, False),  # complete but pruned: never aggregated
]
INCOMPLETE = ((A(1, 0, "q", 3), F), 0.75)  # kept, incomplete: not aggregated


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    c = make_store(tmp_path_factory.mktemp("q") / "store.duckdb")
    add_run(c, 1, "hand", n_layers=L, n_heads=H)
    add_prompt(c, 1, 0, 4, None)
    tb = TreeBuilder(1)
    for p, v, kept in PATHS:
        tb.add(p, v, prompt=0, kept=kept)
    tb.add(INCOMPLETE[0], INCOMPLETE[1], prompt=0)
    tb.write(c)
    add_run(c, 2, "empty", n_layers=L, n_heads=H)
    return c


def _dst_names(n: Node, positional: bool) -> list[str]:
    if positional:
        return [n.label]
    if n.kind is NodeKind.ATTN:
        sites = ["k", "v"] if str(n.site) == "kv" else [str(n.site)]
        return [f"{n.component}<{s}>" for s in sites]
    return [n.component]


def hand_edges(
    paths: Sequence[tuple[tuple[Node, ...], float, bool]], positional: bool
) -> dict[str, list[float]]:
    """Independent aggregation: edge -> [signed, abs, pos, neg, n]."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0])
    for p, v, kept in paths:
        if not kept:
            continue
        for s, d in itertools.pairwise(p):
            names = _dst_names(d, positional)
            w = 1.0 / len(names)  # a kv path: half on <k>, half on <v>
            for dn in names:
                acc = out[f"{s.label if positional else s.component}->{dn}"]
                acc[0] += w * v
                acc[1] += w * abs(v)
                acc[2] += w * max(v, 0.0)
                acc[3] += w * min(v, 0.0)
                acc[4] += 1
    return dict(out)


def _as_dict(df: pd.DataFrame, key: str) -> dict[str, list[float]]:
    cols = ["score", "abs_score", "pos_score", "neg_score", "n_paths"]
    return {r[key]: [r[c] for c in cols] for r in df.to_dict("records")}


@pytest.mark.parametrize("positional", [False, True])
def test_edges_match_hand_computation(con: duckdb.DuckDBPyConnection, positional: bool) -> None:
    got = _as_dict(edges(con, 1, positional=positional), "edge")
    want = hand_edges(PATHS, positional)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_edges_literal_values(con: duckdb.DuckDBPyConnection) -> None:
    free = _as_dict(edges(con, "hand"), "edge")
    # shared by the +0.5 and the -2.0 path
    assert free["m1->logits"] == pytest.approx([-1.5, 2.5, 0.5, -2.0, 2])
    assert free["a0.h1->m1"] == pytest.approx([-1.5, 2.5, 0.5, -2.0, 2])
    # kv destination: half the path on <k>, half on <v> (counted on both); k and v sites stay separate
    assert free["input->a0.h1<k>"] == pytest.approx([-1.0, 1.0, 0.0, -1.0, 1])
    assert free["input->a0.h1<v>"] == pytest.approx([-1.0, 1.0, 0.0, -1.0, 1])
    assert free["input->a0.h1<q>"] == pytest.approx([1.5, 1.5, 1.5, 0.0, 2])
    assert free["input->a0.h0<k>"] == pytest.approx([3.0, 3.0, 3.0, 0.0, 1])
    assert "input->a0.h0<v>" not in free
    assert free["m0->a1.h0<v>"] == pytest.approx([-0.25, 0.25, 0.0, -0.25, 1])
    assert "a1.h1->logits" not in free  # only on the pruned path
    pos = _as_dict(edges(con, 1, positional=True), "edge")
    assert pos["input@1->a0.h1<kv>@3:1"] == pytest.approx([-2.0, 2.0, 0.0, -2.0, 1])
    assert pos["m1@3->logits@3"] == pytest.approx([-1.5, 2.5, 0.5, -2.0, 2])


@pytest.mark.parametrize("positional", [False, True])
def test_nodes_match_hand_computation(con: duckdb.DuckDBPyConnection, positional: bool) -> None:
    want: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0])
    for p, v, kept in PATHS:
        if kept:
            for n in p:
                acc = want[n.label if positional else n.component]
                for i, x in enumerate((v, abs(v), max(v, 0.0), min(v, 0.0), 1)):
                    acc[i] += x
    got = _as_dict(nodes(con, 1, positional=positional), "node")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_sign_filter_and_prompt_filter(con: duckdb.DuckDBPyConnection) -> None:
    neg = _as_dict(edges(con, 1, sign="negative"), "edge")
    want = hand_edges([(p, v, k) for p, v, k in PATHS if v < 0], False)
    assert neg.keys() == want.keys()
    assert edges(con, 1, prompt=7).empty


def test_circuit_top_k_and_pruning(con: duckdb.DuckDBPyConnection) -> None:
    c = circuit(con, 1, top_k=3, by="abs")
    # the 3 largest |score| edges all belong to the +3.0 path; they form a full input->logits chain
    assert sorted(c.edges["edge"]) == ["a0.h0->a1.h0<q>", "a1.h0->logits", "input->a0.h0<k>"]
    assert set(c.nodes["node"]) == {"input", "a0.h0", "a1.h0", "logits"}
    # top-2 leaves input->a0.h0<k> without a way to the logits: everything is pruned away except what reaches
    c2 = circuit(con, 1, top_k=2, by="abs")
    assert c2.edges.empty or set(c2.edges["src"]).issubset({"input", "a0.h0", "a1.h0"})
    for e in c2.edges.to_dict("records"):
        assert e["edge"] in {"a0.h0->a1.h0<q>", "a1.h0->logits", "input->a0.h0<k>"}


def test_circuit_prunes_dangling_edges(con: duckdb.DuckDBPyConnection) -> None:
    # threshold 1.5 (abs) keeps m1->logits, a0.h1->m1, input->a0.h1<k|v>, input->a0.h1<q>, the +3 chain...
    c = circuit(con, 1, threshold=1.5, by="abs")
    full = edges(con, 1)
    chosen = full[full["score"].abs() >= 1.5]
    assert set(c.edges["edge"]) <= set(chosen["edge"])
    # a0.h1->logits has |score| 1.0 < 1.5, so input->a0.h1<q> still reaches logits only through m1
    assert "input->a0.h1<q>" in set(c.edges["edge"])
    # by signed: negative edges are never selected with a positive threshold
    cs = circuit(con, 1, threshold=0.1, by="signed")
    assert (cs.edges["score"] >= 0.1).all()
    assert "m1->logits" not in set(cs.edges["edge"])
    # pruning: every kept edge lies on an input->logits chain
    import networkx as nx

    g = nx.DiGraph(list(zip(c.edges["src"], c.edges["dst"], strict=True)))
    for u, v in g.edges:
        assert nx.has_path(g, "input", u) or u == "input"
        assert nx.has_path(g, v, "logits") or v == "logits"


def test_signed_circuits_side_by_side(con: duckdb.DuckDBPyConnection) -> None:
    pos, neg = positive_negative(con, 1)
    assert (pos.edges["score"] > 0).all() and (neg.edges["score"] < 0).all()
    df = signed_circuits(con, 1).set_index("edge")
    both = df.loc["m1->logits"]
    assert both["in_positive"] and both["in_negative"]
    assert both["positive_score"] == pytest.approx(0.5) and both["negative_score"] == pytest.approx(
        -2.0
    )
    assert not df.loc["input->a0.h0<k>", "in_negative"]
    assert df.loc["input->a0.h0<k>", "positive_score"] == pytest.approx(3.0)


def test_top_paths(con: duckdb.DuckDBPyConnection) -> None:
    df = top_paths(con, 1, k=3)  # kept=None: pruned complete paths too
    assert list(df["contribution"]) == [5.0, 3.0, -2.0]
    assert (
        df.loc[1, "path"]
        == path_label(PATHS[3][0])
        == "input@2 -> a0.h0<k>@3:2 -> a1.h0<q>@3 -> logits@3"
    )
    assert list(top_paths(con, 1, k=3, kept=True)["contribution"]) == [3.0, -2.0, 1.0]
    assert list(top_paths(con, 1, k=10, kept=False)["contribution"]) == [5.0]
    assert list(top_paths(con, 1, k=10, order="negative")["contribution"]) == [-2.0, -0.25]
    assert list(top_paths(con, 1, k=2, order="signed", kept=True)["contribution"]) == [3.0, 1.0]
    inc = top_paths(con, 1, k=50, complete=False)
    assert 0.75 in set(inc["contribution"]) and not inc["complete"].any()
    assert list(top_paths(con, 1, through="a0.h1<q>@3", kept=True)["contribution"]) == [1.0, 0.5]
    assert sorted(top_paths(con, 1, through="a0.h1")["contribution"]) == [-2.0, 0.5, 1.0]
    assert list(top_paths(con, 1, through="a0.h1<v>")["contribution"]) == [-2.0]
    assert list(top_paths(con, 1, edge="a0.h1->m1")["contribution"]) == [-2.0, 0.5]
    assert list(top_paths(con, 1, edge="input@1->a0.h1<kv>@3:1")["contribution"]) == [-2.0]
    assert list(top_paths(con, 1, min_depth=3, kept=True)["depth"]) == [3, 3, 3, 3]
    assert list(top_paths(con, 1, max_depth=2)["contribution"]) == [5.0, 1.0]


def test_bad_runs(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError, match=r"unknown run 'nope'.*'hand'"):
        top_paths(con, "nope")
    with pytest.raises(QueryError, match="unknown run 99"):
        edges(con, 99)
    with pytest.raises(QueryError, match="has no complete kept paths"):
        edges(con, "empty")
    with pytest.raises(QueryError, match="has no scored paths"):
        top_paths(con, 2)
    with pytest.raises(QueryError, match=r"no node of run 1 matches 'a9.h0'"):
        top_paths(con, 1, through="a9.h0")
    with pytest.raises(QueryError, match=r"order="):
        top_paths(con, 1, order="sideways")
    with pytest.raises(QueryError, match="src->dst"):
        top_paths(con, 1, edge="a0.h1")


def test_sql(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    df = sql(con, "SELECT count(*) AS n FROM paths WHERE run_id = 1 AND complete")
    assert int(df.loc[0, "n"]) == len(PATHS)
    for bad in (
        "DELETE FROM paths",
        "INSERT INTO runs (run_id) VALUES (9)",
        "CREATE TABLE x (a INT)",
        "DROP TABLE paths",
        f"COPY paths TO '{tmp_path / 'x.csv'}'",
        f"ATTACH '{tmp_path / 'o.db'}' AS o",
        "SELECT 1; UPDATE paths SET kept = false",
    ):
        with pytest.raises(QueryError, match="not allowed in read-only mode"):
            sql(con, bad)
    assert int(sql(con, "SELECT count(*) FROM paths WHERE NOT kept").iloc[0, 0]) == 1  # nothing ran
    with pytest.raises(QueryError, match=r"invalid SQL: .*syntax error"):
        sql(con, "SELEC * FRM paths")
    with pytest.raises(QueryError, match=r"SQL error: .*nosuchtable"):
        sql(con, "SELECT * FROM nosuchtable")
    with pytest.raises(QueryError, match="empty"):
        sql(con, "   ")


def test_sql_write_mode(tmp_path: Path) -> None:
    c = make_store(tmp_path / "w.duckdb")
    add_run(c, 1, "w")
    sql(c, "DELETE FROM runs WHERE run_id = 1", read_only=False)
    assert sql(c, "SELECT * FROM runs").empty
