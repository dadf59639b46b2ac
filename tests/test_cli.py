"""Every CLI command and export format through Typer's runner, on the bundled toy model."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.app import app
from pathdb.export import from_eap_json, from_eap_pt, read_graph
from pathdb.store.db import open_store

runner = CliRunner()
SEARCH = ["search", "-m", "toy-ioi", "-p", "toy-ioi-small", "-q", "--max-depth", "3", "-t", "0.1"]


def invoke(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "store.duckdb"
    code, out = invoke(*SEARCH, "--run-name", "demo", "--db", str(path))
    assert code == 0, out
    assert "run 'demo'" in out and "completed" in out
    small = (files("pathdb.data") / "prompts" / "toy-ioi-small.jsonl").read_text().splitlines()
    three = path.parent / "three.jsonl"
    three.write_text("\n".join(small[:3]) + "\n")
    code, out = invoke(*SEARCH, "-p", str(three), "--prompt-mode", "per-prompt", "-t", "0.15",
                       "--run-name", "per", "--db", str(path))  # fmt: skip
    assert code == 0, out
    return path


def test_help_teaches() -> None:
    code, out = invoke("--help")
    assert code == 0
    for word in ("search", "query", "export", "show", "resume", "runs", "models", "sql"):
        assert word in out
    code, out = invoke("search", "--help")
    assert code == 0 and "--min-contribution" in out and "--batch-heads" in out


def test_models_lists_bundled_toys() -> None:
    code, out = invoke("models")
    assert code == 0 and "toy-ioi" in out


def test_runs_and_db_info(db: Path) -> None:
    code, out = invoke("runs", "--db", str(db))
    assert code == 0 and "demo" in out and "completed" in out
    code, out = invoke("db", "info", "--db", str(db))
    assert code == 0 and "revision" in out
    code, out = invoke("db", "upgrade", "--db", str(db))
    assert code == 0 and "->" in out


def test_query_commands(db: Path, tmp_path: Path) -> None:
    d = ["--db", str(db)]
    code, out = invoke("query", "paths", "demo", "--top", "5", *d)
    assert code == 0 and "-> logits@14" in out
    for cmd in (
        ["edges"],
        ["nodes"],
        ["signed"],
        ["circuit", "--top-k", "400"],
        ["edges", "--positional"],
    ):
        code, out = invoke("query", *cmd, "demo", *d)
        assert code == 0, (cmd, out)
    code, out = invoke(
        "query", "paths", "demo", "--top", "7", "--output", str(tmp_path / "p.csv"), *d
    )
    assert code == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 7
    code, out = invoke("query", "stats", "per", "--level", "edges", *d)
    assert code == 0 and "frequency" in out


def test_sql(db: Path) -> None:
    code, out = invoke(
        "sql", "SELECT count(*) AS n FROM v_path_strings WHERE complete", "--db", str(db)
    )
    assert code == 0 and "n" in out
    code, out = invoke("sql", "DELETE FROM paths", "--db", str(db))
    assert code == 2 and "read-only" in out.lower()
    code, out = invoke("sql", "SELEC nonsense", "--db", str(db))
    assert code == 2 and "invalid sql" in out.lower() and "Traceback" not in out
    # values and names are data, not rich markup (an evaluation's score is "score [group]")
    code, out = invoke("sql", "SELECT 'score [group]' AS \"a [b]\"", "--db", str(db))
    assert code == 0 and "score [group]" in out and "a [b]" in out


@pytest.mark.parametrize(
    "suffix", [".json", ".pt", ".graphml", ".gexf", ".dot", ".parquet", ".csv"]
)
def test_export_formats(db: Path, tmp_path: Path, suffix: str) -> None:
    out_path = tmp_path / f"x{suffix}"
    code, out = invoke("export", "demo", "-o", str(out_path), "--db", str(db))
    assert code == 0, out
    assert out_path.stat().st_size > 0
    if suffix == ".json":
        g = from_eap_json(out_path)
        assert g.cfg["n_layers"] == 4 and "input->a0.h0<q>" in set(g.edges["edge"])
        assert g.edges["in_graph"].any() and (g.edges["score"] != 0).any()
    elif suffix == ".pt":
        assert from_eap_pt(out_path).cfg["n_heads"] == 4
    elif suffix in (".graphml", ".gexf"):
        assert read_graph(out_path).number_of_edges() > 0
    elif suffix == ".dot":
        assert out_path.read_text().startswith("digraph")


def test_export_node_link_and_tables(db: Path, tmp_path: Path) -> None:
    p = tmp_path / "g.json"
    code, out = invoke("export", "demo", "-o", str(p), "--format", "node-link", "--db", str(db))
    assert code == 0, out
    assert "nodes" in json.loads(p.read_text())
    p = tmp_path / "paths.parquet"
    code, out = invoke("export", "demo", "-o", str(p), "--what", "paths", "--db", str(db))
    assert code == 0, out
    with open_store(db, read_only=True) as store:
        (n,) = store.con.execute(
            "SELECT count(*) FROM paths p JOIN runs r USING (run_id) WHERE r.name='demo' AND p.depth > 0"
        ).fetchone()  # type: ignore[misc]
    assert len(pd.read_parquet(p)) == n


@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_show(db: Path, tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"c{suffix}"
    code, out = invoke("show", "demo", "-o", str(p), "--db", str(db))
    assert code == 0, out
    if suffix == ".svg":
        assert ET.parse(p).getroot().tag.endswith("svg")
    else:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompts_commands(tmp_path: Path) -> None:
    code, out = invoke("prompts", "list")
    assert code == 0 and "toy-ioi-small" in out
    code, out = invoke("prompts", "check", "toy-ioi-small")
    assert code == 0 and "ok" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "When Mary and John went", "target": " Mary"}\n{"clean": oops}\n')
    code, out = invoke("prompts", "check", str(bad))
    assert code == 2 and "line 2" in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["search", "-m", "no-such-model"], "no-such-model"),
        (["search", "--strategy", "best-first", "--top-n", "0"], "top_n"),
        (["search", "--no-positional", "--batch-positions"], "positional root"),
        (["search", "--method", "attribution", "--batch-heads"], "pre-screens"),
        (["search", "-p", "/nonexistent/prompts.jsonl"], "prompts.jsonl"),
        (["search", "--root-position", "99"], "out of range"),
        (["query", "paths", "nope"], "nope"),
        (["export", "demo", "-o", "x.xyz"], "unknown export format"),
        (["export", "demo", "-o", "/nonexistent-dir/x.json"], "nonexistent-dir"),
        (["show", "demo", "-o", "c.gif"], ".svg or .png"),
    ],
)
def test_bad_input_is_a_clear_error(
    db: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    target = db if args[0] != "search" else tmp_path / "fresh.duckdb"
    code, out = invoke(*args, "--db", str(target))
    assert code == 2, out
    assert fragment in out and "Traceback" not in out
    if args[0] == "search":
        assert not target.exists(), "a refused search must not create the store"


def test_db_path_that_is_a_directory(tmp_path: Path) -> None:
    code, out = invoke(*SEARCH, "--db", str(tmp_path))
    assert code == 2 and "directory" in out.lower()
