"""Exports: EAP-IG / MIB JSON and .pt against an independent spec from FORMATS.md, networkx round
trips, DOT text, tables, pictures, and clear errors for bad output paths and formats."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from pathdb.export import (
    ExportError,
    from_eap_json,
    from_eap_pt,
    read_graph,
    read_table,
    to_dot,
    to_eap_json,
    to_eap_pt,
    to_networkx,
    write_graph,
    write_table,
)
from pathdb.graph import Node
from pathdb.query import circuit, edges, top_paths
from pathdb.show import draw_circuit
from tests.conftest_query import TreeBuilder, add_run, make_store

L, H = 3, 2
F = Node.final(L, 4)
E, A, M = Node.embed, Node.attn, Node.mlp
PATHS = [
    ((E(4), A(0, 1, "q", 4), M(2, 4), F), 2.0),
    ((E(2), A(0, 0, "kv", 4, 2), A(1, 1, "q", 4), F), -1.5),
    ((E(4), M(0, 4), A(2, 0, "k", 4, 4), F), 0.75),
    ((E(4), A(1, 0, "q", 4), M(1, 4), F), 0.5),
    ((E(4), F), 0.25),
]


def spec_edges(n_layers: int, n_heads: int) -> dict[str, tuple[int, int]]:
    """FORMATS.md, written out independently: edge name -> (forward index, backward index)."""
    fwd = {"input": 0}
    bwd: dict[str, int] = {}
    for layer in range(n_layers):
        for h in range(n_heads):
            fwd[f"a{layer}.h{h}"] = 1 + layer * (n_heads + 1) + h
            for q, s in enumerate("qkv"):
                bwd[f"a{layer}.h{h}<{s}>"] = layer * (3 * n_heads + 1) + q * n_heads + h
        fwd[f"m{layer}"] = 1 + layer * (n_heads + 1) + n_heads
        bwd[f"m{layer}"] = layer * (3 * n_heads + 1) + 3 * n_heads
    bwd["logits"] = n_layers * (3 * n_heads + 1)
    out: dict[str, tuple[int, int]] = {}
    for src, f in fwd.items():
        ls = -1 if src == "input" else int(src[1:].split(".")[0])
        for dst, b in bwd.items():
            if dst == "logits":
                ok = True
            elif dst.startswith("a"):
                ok = ls < int(dst[1:].split(".")[0])
            else:
                ld = int(dst[1:])
                ok = ls < ld or (ls == ld and "." in src)
            if ok:
                out[f"{src}->{dst}"] = (f, b)
    return out


def test_spec_edge_counts() -> None:
    assert len(spec_edges(12, 12)) == 32491  # GPT-2 small, FORMATS.md
    assert len(spec_edges(24, 14)) == 179749  # Qwen2.5-0.5B


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    c = make_store(tmp_path_factory.mktemp("e") / "s.duckdb")
    add_run(c, 1, "exp", n_layers=L, n_heads=H, d_model=16)
    tb = TreeBuilder(1)
    for p, v in PATHS:
        tb.add(p, v, prompt=0)
    tb.write(c)
    return c


def test_eap_json_follows_format(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    circ = circuit(con, 1, top_k=6)
    out = to_eap_json(circ, None, tmp_path / "g.json")
    data = json.loads(out.read_text())
    assert data["cfg"] == {"n_layers": L, "n_heads": H, "parallel_attn_mlp": False, "d_model": 16}
    spec = spec_edges(L, H)
    assert set(data["edges"]) == set(spec)
    scores = edges(con, 1).set_index("edge")["score"].to_dict()
    chosen = set(circ.edges["edge"])
    assert chosen and chosen <= set(scores)
    for name, e in data["edges"].items():
        assert e["score"] == pytest.approx(scores.get(name, 0.0)), name
        assert e["in_graph"] == (name in chosen)
    # q/k/v naming: the kv head at layer 0 splits its path half onto <k>, half onto <v>; the k-only head only <k>
    assert data["edges"]["input->a0.h0<k>"]["score"] == pytest.approx(-0.75)
    assert data["edges"]["input->a0.h0<v>"]["score"] == pytest.approx(-0.75)
    assert data["edges"]["m0->a2.h0<k>"]["score"] == pytest.approx(0.75)
    assert data["edges"]["m0->a2.h0<v>"]["score"] == 0.0
    nodes_in = {n for e in chosen for n in (e.split("->")[0], e.split("->")[1].split("<")[0])}
    assert {k for k, v in data["nodes"].items() if v["in_graph"]} == nodes_in
    back = from_eap_json(out)
    assert back.cfg == data["cfg"]
    got = {r["edge"]: (r["score"], r["in_graph"]) for r in back.edges.to_dict("records")}
    assert got == {k: (pytest.approx(v["score"]), v["in_graph"]) for k, v in data["edges"].items()}


def test_eap_pt_follows_format(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    import torch

    circ = circuit(con, 1, top_k=6)
    out = to_eap_pt(circ, None, tmp_path / "g.pt")
    data = torch.load(out, weights_only=False)
    assert set(data) == {
        "cfg",
        "src_nodes",
        "dst_nodes",
        "edges_scores",
        "edges_in_graph",
        "nodes_in_graph",
    }
    n_fwd, n_bwd = 1 + L * (H + 1), L * (3 * H + 1) + 1
    assert (
        data["edges_scores"].shape == (n_fwd, n_bwd) and data["edges_scores"].dtype == torch.float32
    )
    assert (
        data["edges_in_graph"].shape == (n_fwd, n_bwd)
        and data["edges_in_graph"].dtype == torch.bool
    )
    assert data["nodes_in_graph"].shape == (n_fwd,)
    assert data["src_nodes"][:4] == ["input", "a0.h0", "a0.h1", "m0"]
    assert data["dst_nodes"][:7] == [
        "a0.h0<q>",
        "a0.h1<q>",
        "a0.h0<k>",
        "a0.h1<k>",
        "a0.h0<v>",
        "a0.h1<v>",
        "m0",
    ]
    assert data["dst_nodes"][-1] == "logits" and len(data["dst_nodes"]) == n_bwd
    spec = spec_edges(L, H)
    real = np.zeros((n_fwd, n_bwd), dtype=bool)
    for f, b in spec.values():
        real[f, b] = True
    scores = data["edges_scores"].numpy()
    assert not scores[~real].any() and not data["edges_in_graph"].numpy()[~real].any()
    table = edges(con, 1).set_index("edge")["score"]
    for name, (f, b) in spec.items():
        assert scores[f, b] == pytest.approx(table.get(name, 0.0)), name
        assert f"{data['src_nodes'][f]}->{data['dst_nodes'][b]}" == name
    pt, js = from_eap_pt(out), from_eap_json(to_eap_json(circ, None, tmp_path / "g.json"))
    pd.testing.assert_frame_equal(pt.edges, js.edges, check_dtype=False)
    assert pt.nodes_in_graph == js.nodes_in_graph


def test_eap_refuses_inexpressible(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="positional=False"):
        to_eap_json(circuit(con, 1, positional=True), None, tmp_path / "p.json")
    whole = pd.DataFrame({"edge": ["input->a1<q>"], "score": [1.0]})
    with pytest.raises(ExportError, match="whole-attention-layer"):
        to_eap_json(whole, {"n_layers": L, "n_heads": H}, tmp_path / "w.json")
    with pytest.raises(ExportError, match="needs cfg"):
        to_eap_json(whole, None, tmp_path / "w.json")
    with pytest.raises(ExportError, match="does not exist"):
        to_eap_json(circuit(con, 1), None, tmp_path / "missing" / "g.json")
    with pytest.raises(ExportError, match="suffix"):
        to_eap_json(circuit(con, 1), None, tmp_path / "g.txt")


@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("suffix", [".graphml", ".gexf", ".json"])
def test_networkx_round_trip(
    con: duckdb.DuckDBPyConnection, tmp_path: Path, positional: bool, suffix: str
) -> None:
    circ = circuit(con, 1, positional=positional)
    g = to_networkx(circ)
    # the DiGraph carries the circuit's edges: per (src, dst) the sum over sites
    want = circ.edges.groupby(["src", "dst"])["score"].sum().to_dict()
    assert {(u, v): d["score"] for u, v, d in g.edges(data=True)} == pytest.approx(want)
    back = read_graph(write_graph(g, tmp_path / f"g{suffix}"))
    assert set(back.nodes) == set(g.nodes)
    assert set(back.edges) == set(g.edges)
    for u, v, d in g.edges(data=True):
        assert float(back.edges[u, v]["score"]) == pytest.approx(d["score"])
        assert int(back.edges[u, v]["n_paths"]) == d["n_paths"]
    for n, d in g.nodes(data=True):
        assert float(back.nodes[n]["score"]) == pytest.approx(d["score"])


def test_networkx_sites_position_free(con: duckdb.DuckDBPyConnection) -> None:
    g = to_networkx(circuit(con, 1))
    d = g.edges["input", "a0.h0"]
    # one kv path of score -1.5: half on each site, counted once on the merged edge
    assert d["sites"] == "k,v" and d["score_k"] == pytest.approx(-0.75) and d["score_q"] == 0.0
    assert d["score"] == pytest.approx(-1.5) and d["n_paths"] == 1


def test_dot_text(con: duckdb.DuckDBPyConnection) -> None:
    text = to_dot(circuit(con, 1), title="t")
    assert text.startswith("digraph circuit {") and text.rstrip().endswith("}")
    assert '"input" -> "a0.h1" [color="#1f5fbf"' in text
    assert '"a0.h0" -> "a1.h1" [color="#c62828"' in text
    assert text.count(" -> ") == len(circuit(con, 1).edges)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl"])
def test_tables_round_trip(con: duckdb.DuckDBPyConnection, tmp_path: Path, suffix: str) -> None:
    df = top_paths(con, 1, k=10)[["path_id", "contribution", "depth", "path"]]
    back = read_table(write_table(df, tmp_path / f"t{suffix}"))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_table_errors(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": [1]})
    with pytest.raises(ExportError, match=r"suffix '\.xlsx'"):
        write_table(df, tmp_path / "t.xlsx")
    with pytest.raises(ExportError, match="unknown format 'xlsx'"):
        write_table(df, tmp_path / "t.csv", fmt="xlsx")
    with pytest.raises(ExportError, match="does not exist"):
        write_table(df, tmp_path / "nope" / "t.csv")
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root ignores directory permissions; /sys refuses new files even for root
        target = Path("/sys") if os.access(ro, os.W_OK) else ro
        with pytest.raises(ExportError, match="cannot write"):
            write_table(df, target / "pathdb-export-test.csv")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("positional", [False, True])
def test_draw_circuit(con: duckdb.DuckDBPyConnection, tmp_path: Path, positional: bool) -> None:
    circ = circuit(con, 1, positional=positional)
    svg = draw_circuit(circ, tmp_path / "c.svg", title="test")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and svg.stat().st_size > 1000
    png = draw_circuit(circ, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0
    with pytest.raises(ExportError, match="suffix"):
        draw_circuit(circ, tmp_path / "c.bmp")
