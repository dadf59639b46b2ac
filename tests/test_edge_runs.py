"""Edge-score runs (``pathdb attribute``) in the store: writing, migration, ``runs``/``query``/views,
EAP-IG JSON/.pt round trips, ``evaluate`` and ``compare`` beside a path run, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from pathdb.evaluate.compare import agreement, summary
from pathdb.evaluate.curves import evaluate_run
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.export.eap import from_eap_json, from_eap_pt, to_eap_json, to_eap_pt
from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.query.aggregate import circuit, edges, nodes
from pathdb.query.common import QueryError
from pathdb.query.paths import top_paths
from pathdb.store.db import migrate, open_store
from pathdb.store.edge_runs import edge_table, write_edge_run
from pathdb.store.errors import StoreError
from search import SearchParams, SearchRequest, run_loaded
from search.methods.run import AttributeRequest, MethodError, attribute
from tests.cli_process import pathdb
from tests.test_migrations import _insert_0001_data

FAST = {"eap": {}, "eap-ig": {"ig_steps": 2}, "atp*": {}, "edge-patching": {},
        "learned-mask": {"penalties": [0.5, 3.0], "steps": 6, "lr": 0.4}}  # fmt: skip
EDGE_RUNS = ["eap", "eap-ig", "atp*", "edge-patching", "learned-mask-p0.5", "learned-mask-p3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store: a position-free exact path run and every method's edge run on toy-ioi-2l."""
    db = tmp_path_factory.mktemp("edges") / "s.duckdb"
    model = load("toy-ioi-2l", device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    req = SearchRequest(model="toy-ioi-2l", prompts="toy-ioi-small", positional=False,
                        params=SearchParams(min_contribution=0.1))  # fmt: skip
    run_loaded(req, model, prompts, db, run_name="paths", quiet=True)
    for method, opts in FAST.items():
        areq = AttributeRequest(method=method, model="toy-ioi-2l", device="cpu", options=dict(opts))
        attribute(areq, db, run_name=method)
    return db


@pytest.fixture(scope="module")
def con(store_path: Path) -> Any:
    with open_store(store_path, read_only=True) as store:
        yield store.con


def test_runs_are_listed_with_their_kind(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        "SELECT name, kind, method, status, n_prompts FROM v_runs ORDER BY run_id"
    ).fetchall()
    assert [r[0] for r in rows] == ["paths", *EDGE_RUNS]
    assert [r[1] for r in rows] == ["paths"] + ["edges"] * 6
    assert [r[2] for r in rows][1:] == [
        "eap",
        "eap-ig",
        "atp*",
        "edge-patching",
        "learned-mask",
        "learned-mask",
    ]
    assert {r[3] for r in rows} == {"completed"} and {r[4] for r in rows} == {8}
    params = con.execute("SELECT params FROM runs WHERE name = 'learned-mask-p3'").fetchall()[0][0]
    assert (
        '"penalty": 3.0' in params and '"steps": 6' in params and '"model": "toy-ioi-2l"' in params
    )
    wall = con.execute(
        "SELECT min(wall_s), min(eval_s), min(write_s) FROM runs WHERE kind = 'edges'"
    ).fetchall()[0]
    assert all(w is not None and w > 0 for w in wall)


def test_edge_table_and_views_expose_both_kinds(con: duckdb.DuckDBPyConnection) -> None:
    stored = dict(con.execute(
        "SELECT edge, score FROM edge_scores JOIN runs USING (run_id) WHERE name = 'eap'"
    ).fetchall())  # fmt: skip
    assert len(stored) == 110
    df = edges(con, "eap")
    assert dict(zip(df["edge"], df["score"], strict=True)) == pytest.approx(stored)
    assert list(df.columns[:4]) == ["edge", "src", "dst", "dst_site"]
    assert (df["n_paths"] == 0).all()
    pos = edges(con, "eap", sign="positive")
    assert (pos["score"] > 0).all() and len(pos) == sum(v > 0 for v in stored.values())
    # nodes: the method's own (atp*: outputs and q/k/v inputs), else the sum of out-edges
    atp = nodes(con, "atp*").set_index("node")["score"]
    own = dict(con.execute(
        "SELECT component, score FROM node_scores JOIN runs USING (run_id) WHERE name = 'atp*'"
    ).fetchall())  # fmt: skip
    assert "a1.h2<k>" in own and atp.to_dict() == pytest.approx(own)
    eap_nodes = nodes(con, "eap").set_index("node")["score"]
    assert eap_nodes["m0"] == pytest.approx(
        sum(v for e, v in stored.items() if e.startswith("m0->"))
    )
    view = con.execute("SELECT kind, count(*) FROM v_edges GROUP BY kind ORDER BY kind").fetchall()
    assert view[0] == ("edges", 6 * 110) and view[1][0] == "paths" and view[1][1] > 0
    # path runs through v_edges agree with the query layer (default rule)
    paths = dict(con.execute("SELECT edge, score FROM v_edges WHERE run_name = 'paths'").fetchall())
    ref = edges(con, "paths")
    assert paths == pytest.approx(dict(zip(ref["edge"], ref["score"], strict=True)))


def test_edge_runs_refuse_what_does_not_apply(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError, match="position-free; drop --positional"):
        edges(con, "eap", positional=True)
    with pytest.raises(QueryError, match="as a whole; drop --prompt"):
        nodes(con, "eap", prompt=0)
    with pytest.raises(
        QueryError, match=r"is an edge run \(pathdb attribute\): it scores edges, not paths"
    ):
        top_paths(con, "eap")
    with pytest.raises(QueryError, match="cannot pool path runs with edge runs"):
        edges(con, ["paths", "eap"])
    pooled = edges(con, ["eap", "eap-ig"]).set_index("edge")["score"]
    one, two = (
        edges(con, "eap").set_index("edge")["score"],
        edges(con, "eap-ig").set_index("edge")["score"],
    )
    assert pooled["m1->logits"] == pytest.approx(one["m1->logits"] + two["m1->logits"])


@pytest.mark.parametrize("run", EDGE_RUNS)
def test_every_method_round_trips_through_eap_ig_json_and_pt(
    con: duckdb.DuckDBPyConnection, run: str, tmp_path: Path
) -> None:
    c = circuit(con, run, top_k=20)
    stored = edges(con, run).set_index("edge")["score"]
    for write, read, suffix in (
        (to_eap_json, from_eap_json, ".json"),
        (to_eap_pt, from_eap_pt, ".pt"),
    ):
        path = write(c, None, tmp_path / f"g{suffix}")
        back = read(path).edges.set_index("edge")
        assert len(back) == 110
        np.testing.assert_allclose(back["score"], stored[back.index], rtol=1e-6, atol=1e-7)
        assert set(back.index[back["in_graph"]]) == set(c.edges["edge"])


def test_evaluate_and_compare_every_run(con: duckdb.DuckDBPyConnection) -> None:
    model = load("toy-ioi-2l", device="cpu")
    prompts = load_prompts("toy-ioi-heldout", model, require_equal_length=False)
    ev = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    evaluations = []
    for run in ["paths", *EDGE_RUNS]:
        e = evaluate_run(con, run, ev, prompts="toy-ioi-heldout", heldout=True, scan_step=20)
        assert e.n_edges_total == 110 and np.isfinite(e.cpr) and np.isfinite(e.cmd)
        top = [p for p in e.points if p.curve == "abs" and p.fraction == 1.0]
        assert top[0].faithfulness == pytest.approx(1.0)
        evaluations.append(e)
    # the exact ground truth ranks edges at least as well as its linear estimate (CMD: lower is better)
    by = {e.run_name: e for e in evaluations}
    assert by["edge-patching"].cmd <= by["eap"].cmd + 0.05
    table = summary(con, evaluations)
    assert list(table["run"]) == ["paths", *EDGE_RUNS]
    pairs = agreement(con, ["paths", "eap", "edge-patching"], top_k=20)
    assert len(pairs) == 3 and pairs["spearman"].notna().all()


def test_upgrade_of_an_older_store_keeps_its_data(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    raw = duckdb.connect(str(db))
    migrate(raw, "0001")
    _insert_0001_data(raw)
    migrate(raw, "0004")  # a store written before edge runs existed
    before = raw.execute("SELECT * EXCLUDE (batch_id) FROM paths ORDER BY path_id").fetchall()
    raw.close()
    with open_store(db) as store:  # upgrades to head
        con = store.con
        assert (
            con.execute("SELECT * EXCLUDE (batch_id) FROM paths ORDER BY path_id").fetchall()
            == before
        )
        assert con.execute("SELECT name, kind FROM runs").fetchall() == [("old", "paths")]
        meta = {"model_name": "toy", "model_fingerprint": "f", "n_layers": 2, "n_heads": 2,
                "d_model": 8, "method": "eap", "strategy": "attribute", "metric": "logit_difference",
                "patch_type": "zero", "prompt_mode": "batch", "positional": False, "params": {},
                "package_version": "0"}  # fmt: skip
        scores = np.arange(7 * 15, dtype=float).reshape(7, 15)
        table = edge_table(2, 2, scores)
        write_edge_run(store, name="e", meta=meta, prompts=[], edges=table)
        with pytest.raises(StoreError, match="already exists"):
            write_edge_run(store, name="e", meta=meta, prompts=[], edges=table)
        run_id, _ = write_edge_run(
            store, name="e", meta=meta, prompts=[], edges=table, replace=True
        )
        assert con.execute(
            "SELECT count(*), count(DISTINCT run_id) FROM edge_scores"
        ).fetchall() == [(table.num_rows, 1)]
        kinds = con.execute("SELECT DISTINCT kind FROM v_edges ORDER BY kind").fetchall()
        assert kinds == [("edges",), ("paths",)]
        assert con.execute("SELECT kind FROM runs WHERE run_id = ?", [run_id]).fetchall() == [
            ("edges",)
        ]


def test_options_that_do_not_apply_are_refused() -> None:
    for method, opts, match in (
        ("eap", {"ig_steps": 3}, "--ig-steps does not apply to --method eap"),
        ("atp*", {"penalties": [0.1]}, "--penalty does not apply to --method atp\\*"),
        ("eap-ig", {"ig_steps": 0}, "--ig-steps must be >= 1"),
        ("nope", {}, "--method must be one of"),
    ):
        with pytest.raises(MethodError, match=match):
            AttributeRequest(method=method, options=opts).validate()


def test_cli_attribute_then_runs_and_export(tmp_path: Path) -> None:
    db = str(tmp_path / "c.duckdb")
    r = pathdb(
        "attribute",
        "--method",
        "eap",
        "-m",
        "toy-ioi-2l",
        "-n",
        "e",
        "--db",
        db,
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "run 'e' (id 1) completed: eap, 110 edges scored" in r.stdout
    r = pathdb("runs", "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "edges" in r.stdout
    r = pathdb("export", "e", "-o", str(tmp_path / "e.json"), "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(from_eap_json(tmp_path / "e.json").edges) == 110


def test_cli_bad_input_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "bad.duckdb"
    nocf = tmp_path / "nocf.jsonl"
    nocf.write_text(
        '{"clean": "When Mike and Nancy went to the store, Nancy gave a drink to", "target": " Mike"}\n'
    )
    for args, message in (
        (
            ["--method", "eap", "--ig-steps", "3"],
            "--ig-steps does not apply to --method eap (only to eap-ig); drop it",
        ),
        (
            ["--method", "atp*", "--penalty", "0.1"],
            "--penalty does not apply to --method atp* (only to learned-mask)",
        ),
        (
            ["--method", "eap", "-p", str(nocf), "--metric", "target-logit-pct"],
            "needs a counterfactual prompt",
        ),
    ):
        r = pathdb(
            "attribute", *args, "-m", "toy-ioi-2l", "--db", str(db), "--device", "cpu", cwd=tmp_path
        )
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
        assert not db.exists()
