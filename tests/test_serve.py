"""`pathdb serve`'s JSON API answers what the query layer answers, and bad input (unknown run,
non-pathdb store, port in use, public bind) gets one clear line, never a traceback."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from starlette.testclient import TestClient

from pathdb.evaluate.compare import agreement, summary
from pathdb.evaluate.storage import RUNS_WITH_FAITHFULNESS, latest_evaluation
from pathdb.export.html import export_data, to_html
from pathdb.query import circuit, cross_prompt_edges, edges, nodes, top_paths
from pathdb.query.aggregate import edges_and_nodes, select_edges
from pathdb.serve.app import Explorer, create_app
from pathdb.store.db import Store, open_store
from pathdb.store.errors import StoreError
from tests.cli_process import pathdb
from tests.serve_fixtures import compare_store, demo_store, serving, small_store


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_store(tmp_path_factory)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_store(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_api(demo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(demo)) as client:
        yield client


@pytest.fixture(scope="module")
def small_api(small: Path) -> Iterator[TestClient]:
    with TestClient(create_app(small)) as client:
        yield client


@pytest.fixture()
def con(request: pytest.FixtureRequest) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the store named by the test's parameter ("demo" or "small")."""
    with open_store(request.getfixturevalue(request.param), read_only=True) as store:
        yield store.con


def _get(client: TestClient, url: str, status: int = 200) -> Any:
    res = client.get(url)
    assert res.status_code == status, res.text
    return res.json()


def _close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("con", ["demo"], indirect=True)
def test_runs_lists_what_pathdb_runs_lists(
    demo_api: TestClient, con: duckdb.DuckDBPyConnection
) -> None:
    body = _get(demo_api, "/api/runs")
    rel = con.sql(RUNS_WITH_FAITHFULNESS)
    want = [dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()]
    assert [r["name"] for r in body["runs"]] == [w["name"] for w in want] == ["demo"]
    for key in (
        "run_id",
        "status",
        "method",
        "strategy",
        "n_evaluated",
        "n_complete",
        "n_kept",
        "n_pruned",
    ):
        assert body["runs"][0][key] == want[0][key], key


@pytest.mark.parametrize("con", ["demo"], indirect=True)
@pytest.mark.parametrize("sign", ["both", "positive", "negative"])
def test_edges_equal_query_edges_and_nodes(
    demo_api: TestClient, con: duckdb.DuckDBPyConnection, sign: str
) -> None:
    body = _get(demo_api, f"/api/runs/demo/edges?sign={sign}&limit=40")
    agg = None if sign == "both" else sign
    all_edges = edges(con, "demo", sign=agg)
    want = select_edges(all_edges, top_k=40, threshold=None, by="abs")
    assert body["total_edges"] == len(all_edges) > 0
    assert [e["edge"] for e in body["edges"]] == list(want["edge"])
    for got, (_, row) in zip(body["edges"], want.iterrows(), strict=True):
        for col in ("score", "abs_score", "pos_score", "neg_score"):
            assert _close(got[col], float(row[col])), (got["edge"], col)
        assert got["n_paths"] == int(row["n_paths"])
    all_nodes = nodes(con, "demo", sign=agg).set_index("node")
    touched = {e["src"] for e in body["edges"]} | {e["dst"] for e in body["edges"]}
    assert {n["node"] for n in body["nodes"]} == touched
    for n in body["nodes"]:
        assert (n["kind"], n["layer"]) == tuple(all_nodes.loc[n["node"], ["kind", "layer"]])
    scores = _get(demo_api, f"/api/runs/demo/nodes?sign={sign}")["nodes"]
    assert {n["node"] for n in scores} == touched
    for n in scores:
        assert _close(n["score"], float(all_nodes.loc[n["node"], "score"]))
        assert n["n_paths"] == int(all_nodes.loc[n["node"], "n_paths"])
    # the page's top-k-then-prune equals `pathdb query circuit --top-k`: same ranking, same edges
    c = circuit(con, "demo", top_k=10, sign=agg)
    assert set(c.edges["edge"]) <= {e["edge"] for e in body["edges"][:10]}


@pytest.mark.parametrize("con", ["demo"], indirect=True)
def test_positional_edges_carry_labels_and_positions(
    demo_api: TestClient, con: duckdb.DuckDBPyConnection
) -> None:
    body = _get(demo_api, "/api/runs/demo/edges?positional=1&limit=20")
    want = select_edges(edges(con, "demo", positional=True), top_k=20, threshold=None, by="abs")
    assert [e["edge"] for e in body["edges"]] == list(want["edge"])
    assert all("@" in e["src"] and e["dst_position"] is not None for e in body["edges"])
    assert all(n["position"] is not None for n in body["nodes"])
    kv = [n for n in body["nodes"] if "<kv>" in n["node"]]
    assert kv and all(n["site"] == "kv" for n in kv)


@pytest.mark.parametrize("con", ["demo"], indirect=True)
def test_paths_through_edge_equal_top_paths_and_the_cli(
    demo: Path, demo_api: TestClient, con: duckdb.DuckDBPyConnection
) -> None:
    edge = _get(demo_api, "/api/runs/demo/edges?limit=5")["edges"][2]["edge"]
    body = _get(demo_api, f"/api/runs/demo/paths?edge={edge}&k=20")
    want = top_paths(con, "demo", k=20, edge=edge)
    assert [p["path_id"] for p in body["paths"]] == list(want["path_id"])
    assert [p["path"] for p in body["paths"]] == list(want["path"])
    assert [p["contribution"] for p in body["paths"]] == pytest.approx(list(want["contribution"]))
    res = pathdb(
        "query", "paths", "demo", "--db", str(demo), "--edge", edge, "-o", "-", cwd=demo.parent
    )
    assert res.returncode == 0, res.stderr
    cli = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [p["path"] for p in body["paths"]] == [r["path"] for r in cli]
    node = _get(
        demo_api, f"/api/runs/demo/paths?through={body['paths'][0]['path'].split(' -> ')[1]}"
    )
    assert node["paths"] and all(" -> " in p["path"] for p in node["paths"])


@pytest.mark.parametrize("con", ["small"], indirect=True)
def test_tree_levels_are_the_stored_extensions(
    small_api: TestClient, con: duckdb.DuckDBPyConnection
) -> None:
    roots = _get(small_api, "/api/runs/per/tree")
    assert roots["total"] == 3 and [r["method"] for r in roots["children"]] == ["root"] * 3
    for root in roots["children"]:
        level = _get(small_api, f"/api/runs/per/tree?parent={root['path_id']}")
        rows = con.execute(
            "SELECT p.path_id, p.contribution, p.method, p.kept, p.complete, n.label, "
            "(SELECT count(*) FROM paths c WHERE c.run_id = 1 AND c.parent_id = p.path_id) "
            "FROM paths p JOIN nodes n ON n.run_id = 1 AND n.node_id = p.node_id "
            "WHERE p.run_id = 1 AND p.parent_id = ? ORDER BY abs(p.contribution) DESC, p.path_id",
            [root["path_id"]],
        ).fetchall()
        assert level["total"] == len(rows) == len(level["children"]) == root["n_children"]
        got = [(c["path_id"], c["contribution"], c["method"], c["kept"], c["complete"], c["label"], c["n_children"])
               for c in level["children"]]  # fmt: skip
        assert got == [tuple(r) for r in rows]
    pruned = [
        c
        for r in roots["children"]
        for c in _get(small_api, f"/api/runs/per/tree?parent={r['path_id']}")["children"]
        if not c["kept"]
    ]
    assert len(pruned) == 1 and pruned[0]["n_children"] == 0
    capped = _get(small_api, f"/api/runs/per/tree?parent={roots['children'][0]['path_id']}&limit=1")
    assert capped["total"] > 1 and len(capped["children"]) == 1


@pytest.mark.parametrize("con", ["small"], indirect=True)
def test_crossprompt_equals_cross_prompt_edges(
    small_api: TestClient, con: duckdb.DuckDBPyConnection
) -> None:
    body = _get(small_api, "/api/runs/per/crossprompt?top=50")
    want = cross_prompt_edges(con, "per", align="none")
    assert [e["edge"] for e in body["edges"]] == list(want["edge"])
    assert [p["prompt_idx"] for p in body["prompts"]] == [0, 1, 2]
    for e, (_, w) in zip(body["edges"], want.iterrows(), strict=True):
        for col in ("mean", "std", "min", "max", "frequency", "sign_consistency"):
            assert e[col] == pytest.approx(w[col]), (e["edge"], col)
    for p in (0, 1, 2):  # each cell is the edge's score on that prompt (`query edges --prompt p`)
        per = edges(con, "per", prompt=p).set_index("edge")["score"]
        for e, row in zip(body["edges"], body["matrix"], strict=True):
            assert row[p] == pytest.approx(float(per.get(e["edge"], 0.0)))
    refused = _get(small_api, "/api/runs/batch/crossprompt", 400)
    assert "per-prompt" in refused["error"]


@pytest.mark.parametrize("con", ["small"], indirect=True)
def test_faithfulness_equals_the_stored_evaluation(
    small_api: TestClient, con: duckdb.DuckDBPyConnection
) -> None:
    body = _get(small_api, "/api/runs/batch/faithfulness")["evaluation"]
    ev = latest_evaluation(con, "batch")
    assert ev is not None
    assert (body["cpr"], body["cmd"], body["edges_80"], body["edges_90"]) == (
        ev.cpr,
        ev.cmd,
        ev.edges_80,
        ev.edges_90,
    )
    assert sorted(body["curves"]) == ["abs", "signed"]
    assert [p["faithfulness"] for p in body["curves"]["abs"]] == [
        p.faithfulness for p in ev.curve("abs")
    ]
    assert _get(small_api, "/api/runs/per/faithfulness")["evaluation"] is None


def test_bad_requests_answer_one_line(small_api: TestClient) -> None:
    for url, status, words in [
        ("/api/runs/nope/edges", 404, ["unknown run 'nope'", "per", "batch"]),
        ("/api/runs/nope/tree", 404, ["unknown run 'nope'"]),
        ("/api/runs/per/edges?sign=sideways", 400, ["sign='sideways'"]),
        ("/api/runs/per/edges?limit=0", 400, ["limit"]),
        ("/api/runs/per/tree?parent=x", 400, ["parent='x' is not an integer"]),
        ("/api/runs/per/tree?parent=999", 400, ["no path 999"]),
        ("/api/runs/per/paths", 400, ["edge=SRC->DST or through=NODE"]),
        ("/api/runs/per/paths?edge=a9.h9->m0", 400, ["no node of run 1 matches 'a9.h9'"]),
        ("/nowhere", 404, ["no page '/nowhere'"]),
    ]:
        res = small_api.get(url)
        assert res.status_code == status, (url, res.text)
        msg = res.json()["error"]
        assert "\n" not in msg and "Traceback" not in msg
        assert all(w in msg for w in words), (url, msg)


def test_export_data_is_the_api_answer(small: Path, small_api: TestClient) -> None:
    with open_store(small, read_only=True) as store:
        data = export_data(store.con, "batch", k=5)
    for sign in ("both", "positive", "negative"):
        api = _get(small_api, f"/api/runs/batch/edges?sign={sign}")
        assert data["views"][sign]["edges"] == api["edges"]
        nodes_api = _get(small_api, f"/api/runs/batch/nodes?sign={sign}")["nodes"]
        assert data["node_stats"][sign] == nodes_api
    first = data["views"]["both"]["edges"][0]["edge"]
    assert (
        data["paths"]["both"][f"edge:{first}"]
        == _get(small_api, f"/api/runs/batch/paths?edge={first}")["paths"]
    )
    page = to_html(data)
    assert "<script src=" not in page and "<link" not in page and "PATHDB_EXPORT" in page
    payload = page.split("window.PATHDB_EXPORT = ", 1)[1].split(";</script>", 1)[0]
    assert json.loads(payload)["k"] == 5


def _cli_error(res: Any) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def test_serve_refuses_bad_stores(tmp_path: Path) -> None:
    other = tmp_path / "other.duckdb"
    c = duckdb.connect(str(other))
    c.execute("CREATE TABLE t (x INT)")
    c.close()
    assert "not a pathdb store" in _cli_error(
        pathdb("serve", "--db", str(other), "--port", "0", cwd=tmp_path)
    )
    text = tmp_path / "notes.duckdb"
    text.write_text("hello, not a database at all" * 4)
    assert "not a DuckDB database" in _cli_error(
        pathdb("serve", "--db", str(text), "--port", "0", cwd=tmp_path)
    )
    assert "no store at" in _cli_error(
        pathdb("serve", "--db", str(tmp_path / "none.duckdb"), cwd=tmp_path)
    )


def test_serve_refuses_a_port_in_use_and_a_public_bind(small: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = _cli_error(pathdb("serve", "--db", str(small), "--port", str(port), cwd=tmp_path))
    assert f"port {port} on 127.0.0.1 is already in use" in msg and "--port" in msg
    msg = _cli_error(pathdb("serve", "--db", str(small), "--host", "0.0.0.0", cwd=tmp_path))
    assert "refusing to bind 0.0.0.0" in msg and "--allow-public" in msg
    with serving(small, "--host", "0.0.0.0", "--allow-public") as (url, proc):
        assert url.startswith("http://0.0.0.0:")
    assert proc.stderr is not None and "warning:" in proc.stderr.read()


def _writable(db: Path, wait_s: float = 30.0) -> Store:
    """Open ``db`` for writing, waiting (as a search does) while the server reads it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return open_store(db)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_serve_binds_loopback_and_reads_between_writes(small: Path, tmp_path: Path) -> None:
    db = tmp_path / "live.duckdb"
    shutil.copy(small, db)
    with serving(db) as (url, _proc):
        assert url.startswith("http://127.0.0.1:")
        first = json.load(urllib.request.urlopen(url + "api/runs", timeout=30))
        assert [r["name"] for r in first["runs"]] == ["per", "batch"]
        with _writable(db) as store:  # the server holds the file only while it answers
            store.con.execute("UPDATE runs SET status = 'running' WHERE name = 'batch'")
        again = json.load(urllib.request.urlopen(url + "api/runs", timeout=30))
        assert [r["status"] for r in again["runs"]] == ["completed", "running"]
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert "static/app.js" in page
        js = urllib.request.urlopen(url + "static/plotly.min.js", timeout=30).read(200).decode()
        assert "plotly.js" in js


def test_warm_up_caches_each_runs_first_circuit(small: Path) -> None:
    ex = Explorer(small)
    ex.warm()
    assert len(ex._cache) == 6  # one walk's edge + node tables, edges, node scores: both runs
    first = ex.edges("batch", "both", False)
    assert ex.edges("batch", "both", False) is first and len(ex._cache) == 6  # cached
    with TestClient(create_app(small)) as client:
        assert _get(client, "/api/runs/batch/edges") == first


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compare_store(tmp_path_factory)


@pytest.mark.parametrize("con", ["demo"], indirect=True)
@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("sign", [None, "negative"])
def test_one_walk_edges_and_nodes_equal_edges_and_nodes(
    con: duckdb.DuckDBPyConnection, positional: bool, sign: str | None
) -> None:
    got_edges, got_nodes = edges_and_nodes(con, "demo", positional=positional, sign=sign)
    pd.testing.assert_frame_equal(got_edges, edges(con, "demo", positional=positional, sign=sign))
    pd.testing.assert_frame_equal(got_nodes, nodes(con, "demo", positional=positional, sign=sign))


def test_compare_answers_the_numbers_of_pathdb_compare(pair: Path) -> None:
    with open_store(pair, read_only=True) as store:
        con = store.con
        evaluations = [latest_evaluation(con, r) for r in ("demo", "attr")]
        assert all(evaluations)
        want_rows = summary(con, [e for e in evaluations if e is not None])
        want = agreement(con, ["demo", "attr"], top_k=40).iloc[0]
    with TestClient(create_app(pair)) as client:
        body = _get(client, "/api/compare?a=demo&b=attr&k=40")
        by_id = _get(client, "/api/compare?a=1&b=2&k=40")
    assert body == by_id
    assert (body["top_k"], body["jaccard"], body["spearman"]) == (
        40,
        want["jaccard_top40"],
        want["spearman"],
    )
    assert 0 < body["jaccard"] < 1  # (the refined rule makes both runs' top 50 the same set)
    for got, (_, row) in zip(body["runs"], want_rows.iterrows(), strict=True):
        assert got["run"]["name"] == got["summary"]["run"] == row["run"]
        for col in ("cpr", "cmd", "edges_80", "edges_90", "search_s", "eval_s"):
            assert _close(got["summary"][col], row[col]), col
        assert got["evaluation"]["cpr"] == got["summary"]["cpr"] and got["evaluation"]["curves"]
    cli = pathdb("compare", "demo", "attr", "--top-k", "40", "--db", str(pair), cwd=pair.parent)
    assert cli.returncode == 0, cli.stderr
    for value in (body["jaccard"], body["spearman"], *(r["summary"]["cpr"] for r in body["runs"])):
        assert f"{value:.4f}" in cli.stdout


def test_compare_without_an_evaluation_and_bad_pairs(small_api: TestClient) -> None:
    body = _get(small_api, "/api/compare?a=per&b=batch&k=3")
    per, batch = body["runs"]
    assert per["summary"] is None and per["evaluation"] is None
    assert batch["summary"]["cpr"] == batch["evaluation"]["cpr"] == 0.71
    assert body["jaccard"] is not None and body["warning"] is None
    for url, status, words in [
        ("/api/compare?a=per", 400, ["give two runs"]),
        ("/api/compare?a=per&b=per", 400, ["both sides are run 'per'"]),
        ("/api/compare?a=per&b=nope", 404, ["unknown run 'nope'"]),
        ("/api/compare?a=per&b=batch&k=0", 400, ["k must be between"]),
    ]:
        res = small_api.get(url)
        assert res.status_code == status, (url, res.text)
        msg = res.json()["error"]
        assert "\n" not in msg and all(w in msg for w in words), (url, msg)
