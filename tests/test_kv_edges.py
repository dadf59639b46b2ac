"""Edge scores of kv paths (issue 12 item 5): a kv-side path's score is split half onto its ``<k>``
and half onto its ``<v>`` edge (never copied onto both), the ``effect`` rule puts every evaluated path
on its first edge, and every export (networkx, EAP-IG, the CLI) follows the same rule: distinct path
counts, a ``weight`` attribute, and ``in_graph`` ranked by the exported ``--score``."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from pathdb.export import read_graph, to_eap_json, to_networkx, write_graph
from pathdb.graph import Node, NodeKind
from pathdb.query import circuit, edges
from pathdb.query.aggregate import prune_edges, select_edges
from pathdb.query.common import QueryError
from pathdb.store import views
from pathdb.store.db import head_revision, stamp
from tests.cli_process import pathdb
from tests.conftest_query import TreeBuilder, add_run, make_store

L, H = 3, 2
F = Node.final(L, 4)
E, A, M = Node.embed, Node.attn, Node.mlp
KV2, KV3, Q = A(0, 0, "kv", 4, 2), A(0, 0, "kv", 4, 3), A(1, 1, "q", 4)
# Every stored row (start first): path, score, kept. Complete paths start at input.
ROWS: list[tuple[tuple[Node, ...], float, bool]] = [
    ((Q, F), 3.0, True),
    ((KV2, Q, F), -1.25, True),
    ((KV3, Q, F), 0.5, True),
    ((A(0, 0, "kv", 4, 1), Q, F), 0.3, True),
    ((A(0, 0, "q", 4), Q, F), 1.75, True),
    ((E(2), KV2, Q, F), -1.5, True),  # kv: -0.75 on input->a0.h0<k>, -0.75 on <v>
    ((E(3), KV3, Q, F), 1.0, True),  # kv, another source position: same position-free edges
    ((E(1), A(0, 0, "kv", 4, 1), Q, F), 0.02, False),  # complete, not kept
    ((E(4), A(0, 0, "q", 4), Q, F), 2.0, True),
    ((M(0, 4), F), 0.5, True),
    ((A(2, 0, "k", 4, 4), F), 0.8, True),
    ((M(0, 4), A(2, 0, "k", 4, 4), F), 0.6, True),
    ((E(4), M(0, 4), A(2, 0, "k", 4, 4), F), 0.75, True),  # k-only site: all on <k>
    ((E(4), F), 0.25, True),
    ((M(1, 4), F), 0.01, False),  # a pruned partial
    ((A(2, None, "q", 4), F), 0.9, True),  # --batch-heads pre-screen row: not an edge
    ((A(1, 1, "kv", 4, None), F), 0.7, True),  # --batch-positions pre-screen row: not an edge
]


def _prescreen(n: Node) -> bool:
    return n.kind is NodeKind.ATTN and (n.head is None or (n.is_kv and n.kv_position is None))


def _sites(n: Node, positional: bool) -> list[str]:
    """Destination names of ``n``: its label, or its component plus the EAP-IG input site(s)."""
    if positional:
        return [n.label]
    if n.kind is NodeKind.ATTN:
        return [
            f"{n.component}<{s}>" for s in (["k", "v"] if str(n.site) == "kv" else [str(n.site)])
        ]
    return [n.component]


def _src(n: Node, positional: bool) -> str:
    return n.label if positional else n.component


def hand(rule: str, positional: bool = False) -> dict[str, tuple[float, float, int]]:
    """Independent aggregation: edge -> (signed score, |score| sum, path count)."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for path, v, kept in ROWS:
        if rule == "paths":
            if not (kept and path[0].kind is NodeKind.EMBED):
                continue
            pairs: Sequence[tuple[Node, Node]] = list(itertools.pairwise(path))
        else:
            if _prescreen(path[0]):
                continue
            pairs = [(path[0], path[1])]
        for s, d in pairs:
            names = _sites(d, positional)
            for dn in names:
                acc = out[f"{_src(s, positional)}->{dn}"]
                acc[0] += v / len(names)
                acc[1] += abs(v) / len(names)
                acc[2] += 1
    return {k: (a, b, int(n)) for k, (a, b, n) in out.items()}


def distinct(rule: str) -> dict[tuple[str, str], tuple[float, int]]:
    """Position-free (src, dst component) -> (summed score, count) of the distinct stored paths on it."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for path, v, kept in ROWS:
        if rule == "paths":
            if not (kept and path[0].kind is NodeKind.EMBED):
                continue
            pairs = {(s.component, d.component) for s, d in itertools.pairwise(path)}
        elif _prescreen(path[0]):
            continue
        else:
            pairs = {(path[0].component, path[1].component)}
        for pair in pairs:
            out[pair][0] += v
            out[pair][1] += 1
    return {k: (a, int(n)) for k, (a, n) in out.items()}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kv") / "s.duckdb"
    c = make_store(path)
    add_run(c, 1, "kv", n_layers=L, n_heads=H, d_model=16, prompt_mode="batch")
    tb = TreeBuilder(1)
    for p, v, kept in ROWS:
        tb.add(p, v, kept=kept)
    tb.write(c)
    stamp(c, head_revision())
    views.install(c)
    c.close()
    return path


@pytest.fixture(scope="module")
def con(db: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(db), read_only=True)


def _got(df: pd.DataFrame) -> dict[str, tuple[float, float, int]]:
    return {r["edge"]: (r["score"], r["abs_score"], r["n_paths"]) for r in df.to_dict("records")}


@pytest.mark.parametrize("rule", ["paths", "effect"])
def test_edges_match_hand_aggregation(con: duckdb.DuckDBPyConnection, rule: str) -> None:
    got = _got(edges(con, 1, rule=rule))
    want = hand(rule)
    assert got.keys() == want.keys()
    for k, (s, a, n) in want.items():
        assert got[k] == (pytest.approx(s), pytest.approx(a), n), k


def test_effect_rule_positional_matches_hand(con: duckdb.DuckDBPyConnection) -> None:
    got = _got(edges(con, 1, positional=True, rule="effect"))
    want = hand("effect", positional=True)
    assert got == {k: (pytest.approx(s), pytest.approx(a), n) for k, (s, a, n) in want.items()}
    assert not any(e.startswith(("a2<q>", "a1.h1<kv>@4:*")) for e in got)  # pre-screen rows


@pytest.mark.parametrize("rule", ["paths", "effect"])
def test_k_part_plus_v_part_is_the_kv_path_score(con: duckdb.DuckDBPyConnection, rule: str) -> None:
    df = edges(con, 1, rule=rule).set_index("edge")
    k, v = df.loc["input->a0.h0<k>"], df.loc["input->a0.h0<v>"]
    kv_paths = [1.0, -1.5] + (
        [0.02] if rule == "effect" else []
    )  # the kv paths starting input->a0.h0
    assert k["score"] + v["score"] == pytest.approx(sum(kv_paths))
    assert k["score"] == pytest.approx(v["score"])
    assert k["n_paths"] == v["n_paths"] == k["kv_paths"] == len(kv_paths)
    # a k-only site keeps its whole score and shares nothing
    assert df.loc["m0->a2.h0<k>", "kv_paths"] == 0 and "m0->a2.h0<v>" not in df.index


@pytest.mark.parametrize("rule", ["paths", "effect"])
def test_networkx_counts_distinct_paths_and_has_weight(
    con: duckdb.DuckDBPyConnection, tmp_path: Path, rule: str
) -> None:
    g = to_networkx(circuit(con, 1, rule=rule, prune=False))
    want = distinct(rule)
    assert set(g.edges) == set(want)
    for (u, v), (score, n) in want.items():
        d = g.edges[u, v]
        assert d["n_paths"] == n, (u, v)
        assert d["score"] == pytest.approx(score) and d["weight"] == pytest.approx(score), (u, v)
    assert g.edges["input", "a0.h0"]["sites"] == "q,k,v"
    back = read_graph(write_graph(g, tmp_path / "g.graphml"))
    assert float(back.edges["input", "a0.h0"]["weight"]) == pytest.approx(
        g.edges["input", "a0.h0"]["weight"]
    )
    # the weight is the circuit's ranking score
    ga = to_networkx(circuit(con, 1, rule=rule, score="abs_score", prune=False))
    assert all(d["weight"] == pytest.approx(d["abs_score"]) for _, _, d in ga.edges(data=True))


def test_eap_in_graph_follows_the_exported_score(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    by_signed = circuit(con, 1, top_k=4, rule="effect")
    all_edges = by_signed.all_edges
    want = set(
        prune_edges(select_edges(all_edges, top_k=4, threshold=None, by="abs", score="neg_score"))[
            "edge"
        ]
    )
    for c in (by_signed, circuit(con, 1, top_k=4, rule="effect", score="neg_score")):
        data = json.loads(
            to_eap_json(c, None, tmp_path / f"g{id(c)}.json", score="neg_score").read_text()
        )
        assert {e for e, x in data["edges"].items() if x["in_graph"]} == want
    assert want != set(by_signed.edges["edge"])  # the ranking really changed


def test_bad_rule_is_refused(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError, match="rule='edge'"):
        edges(con, 1, rule="edge")


def test_cli_export_follows_rule_and_score(
    con: duckdb.DuckDBPyConnection, db: Path, tmp_path: Path
) -> None:
    res = pathdb(
        "export",
        "kv",
        "-o",
        "e.json",
        "-k",
        "4",
        "--score",
        "neg_score",
        "--db",
        str(db),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "e.json").read_text())["edges"]
    assert data["input->a0.h0<v>"]["score"] == pytest.approx(
        sum(min(x, 0) for x in (1.0, -1.5, 0.02)) / 2
    )
    table = edges(con, 1, rule="effect")
    want = prune_edges(select_edges(table, top_k=4, threshold=None, by="abs", score="neg_score"))
    assert {e for e, x in data.items() if x["in_graph"]} == set(want["edge"])
    res = pathdb(
        "export", "kv", "-o", "p.graphml", "--edge-scores", "paths", "--db", str(db), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    g = read_graph(tmp_path / "p.graphml")
    assert float(g.edges["input", "a0.h0"]["weight"]) == pytest.approx(-1.5 + 1.0 + 2.0)
    assert int(g.edges["input", "a0.h0"]["n_paths"]) == 3
    res = pathdb(
        "export", "kv", "-o", "x.json", "--edge-scores", "first", "--db", str(db), cwd=tmp_path
    )
    assert res.returncode != 0 and "--edge-scores must be one of effect, paths" in res.stderr
    assert "Traceback" not in res.stderr
