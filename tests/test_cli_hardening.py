"""Hostile-but-fair CLI input: one-line errors and never a traceback, nothing overwritten without
--force, stdout output, run-name rules, partial-run warnings, empty selections, --version, and the
Python API's thread default (issue 9, items 3, 5, 6, 7 and 10)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()
FAST = ["-m", "toy-ioi", "-p", "toy-ioi-small", "-q", "--max-depth", "2", "-t", "0.3"]
FIRST = json.loads(
    (files("pathdb.data") / "prompts" / "toy-ioi-small.jsonl").read_text().splitlines()[0]
)


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output, res.exception


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hardening") / "store.duckdb"
    code, out, _ = invoke(
        "search", *FAST, "-t", "0.05", "--max-depth", "3", "--run-name", "demo", "--db", str(path)
    )
    assert code == 0, out
    code, out, _ = invoke("search", *FAST, "--run-name", "12345", "--db", str(path))
    assert code == 0, out
    return path


def bad_inputs(tmp: Path) -> list[list[str]]:
    """Every command with inputs it must refuse (store-reading commands get ``--db`` appended)."""
    existing = tmp / "exists.json"
    existing.write_text("{}")
    full_dir = tmp / "full"
    full_dir.mkdir(exist_ok=True)
    (full_dir / "keep.txt").write_text("mine")
    one = ["--prompt", FIRST["clean"], "--target", FIRST["target"]]
    return [
        ["search", "-t", "nan"],
        ["search", "-t", "-1"],
        ["search", "--checkpoint-every", "0"],
        ["search", "--checkpoint-every", "nan"],
        ["search", "--max-time", "nan"],
        ["search", "--max-time", "-5"],
        ["search", "--run-name", ""],
        ["search", "--run-name", "   "],
        ["search", "--run-name", "bell\x07name"],
        ["search", "--target", " Mary"],
        ["search", "--counterfactual", "x"],
        ["search", "-p", "toy-ioi-small", *one],
        ["search", "--threads", "0"],
        ["search", "--strategy", "sideways"],
        ["search", "--metric", "vibes"],
        ["search", "--device", "foo"],
        ["search", *one, "--counterfactual", FIRST["clean"]],
        [
            "search",
            *one,
            "--counterfactual",
            FIRST["counterfactual"],
            "--cf-target",
            FIRST["target"],
        ],
        ["export", "demo", "-o", str(tmp / "x.json"), "--score", "foo"],
        ["export", "demo", "-o", str(tmp / "x.json"), "-k", "0"],
        ["export", "demo", "-o", str(tmp / "x.json"), "-k", "1"],
        ["export", "demo", "-o", str(tmp / "c.json"), "--format", "parquet"],
        ["export", "demo", "-o", "-"],
        ["export", "demo", "-o", "-", "--format", "eap-pt"],
        ["export", "demo", "-o", str(existing)],
        ["export", "demo", "-o", str(tmp / "t.csv"), "--what", "everything"],
        ["export", "nope", "-o", str(tmp / "y.json")],
        ["show", "demo", "-o", str(tmp / "c.txt")],
        ["show", "demo", "-k", "0", "-o", str(tmp / "z.svg")],
        ["show", "demo", "-k", "1", "-o", str(tmp / "z.svg")],
        ["show", "demo", "-o", str(existing.with_suffix(".svg"))],
        ["query", "paths", "nope"],
        ["query", "paths", "demo", "--top", "0"],
        ["query", "paths", "demo", "--order", "sideways"],
        ["query", "paths", "demo", "--min-depth", "50"],
        ["query", "edges", "demo", "-k", "0"],
        ["query", "edges", "demo", "-o", str(existing)],
        ["query", "circuit", "demo", "-k", "1"],
        ["query", "signed", "demo", "--top", "-3"],
        ["query", "stats", "demo", "--level", "galaxies"],
        ["sql", ""],
        ["sql", "SELEC nonsense"],
        ["sql", "DELETE FROM runs"],
        ["sql", "SELECT 1", "-o", str(existing)],
        ["resume", "nope"],
        # commands that take no --db, or name their own
        ["db", "info", "--db", str(tmp / "missing.duckdb")],
        ["db", "upgrade", "--db", str(tmp / "missing.duckdb")],
        ["models", "train", "foo"],
        ["models", "train", "--out", str(existing)],
        ["models", "train", "--out", str(full_dir)],
        ["prompts", "check", str(tmp / "missing.jsonl")],
    ]


NO_DB = {"models", "prompts", "db"}


def test_bad_inputs_give_one_line_errors_and_write_nothing(db: Path, tmp_path: Path) -> None:
    (tmp_path / "exists.svg").write_text("<svg/>")
    cases = bad_inputs(tmp_path)
    before = {p.name: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    store_before = digest(db)
    problems = []
    for args in cases:
        full = args if args[0] in NO_DB or "--db" in args else [*args, "--db", str(db)]
        code, out, exc = invoke(*full)
        clean = exc is None or isinstance(exc, SystemExit)
        said = "error" in out.lower() or "no rows" in out or "Invalid value" in out
        if code == 0 or not clean or "Traceback" in out or not said:
            problems.append(f"{args}: exit {code}, exception {exc!r}\n{out}")
    assert not problems, "\n\n".join(problems)
    after = {p.name: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a refused command wrote or changed a file"
    assert digest(db) == store_before, "a refused command changed the store"


def test_refused_search_does_not_create_the_store(tmp_path: Path) -> None:
    target = tmp_path / "fresh.duckdb"
    for args in (["--run-name", " "], ["-t", "nan"], ["--target", " Mary"]):
        code, out, _ = invoke("search", *FAST, *args, "--db", str(target))
        assert code == 2 and "Traceback" not in out, out
    assert not target.exists()


def test_degenerate_single_prompt_is_named(tmp_path: Path) -> None:
    one = ["--prompt", FIRST["clean"], "--target", FIRST["target"]]
    code, out, _ = invoke(
        "search", "-q", *one, "--counterfactual", FIRST["clean"], "--db", str(tmp_path / "a.duckdb")
    )
    assert code == 2 and "same token sequence as clean" in out, out
    code, out, _ = invoke(
        "search", "-q", *one, "--counterfactual", FIRST["counterfactual"], "--cf-target", FIRST["target"],
        "--db", str(tmp_path / "a.duckdb"),
    )  # fmt: skip
    assert code == 2 and "same token as target" in out, out
    assert not (tmp_path / "a.duckdb").exists()


def test_export_refuses_to_overwrite_without_force(db: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "c.json"
    code, out, _ = invoke("export", "demo", "-o", str(out_file), "-k", "400", "--db", str(db))
    assert code == 0, out
    first = out_file.read_text()
    out_file.write_text("my notes")
    code, out, _ = invoke("export", "demo", "-o", str(out_file), "-k", "400", "--db", str(db))
    assert code == 2 and "--force" in out and out_file.read_text() == "my notes"
    code, out, _ = invoke(
        "export", "demo", "-o", str(out_file), "-k", "400", "--force", "--db", str(db)
    )
    assert code == 0 and out_file.read_text() == first


@pytest.mark.parametrize(
    "command",
    [
        ["query", "edges", "demo"],
        ["query", "paths", "demo"],
        ["sql", "SELECT run_id, name FROM runs"],
        ["show", "demo", "-k", "40"],
    ],
)
def test_every_output_option_refuses_an_existing_file(
    db: Path, tmp_path: Path, command: list[str]
) -> None:
    target = tmp_path / ("c.svg" if command[0] == "show" else "t.csv")
    target.write_text("precious")
    code, out, _ = invoke(*command, "-o", str(target), "--db", str(db))
    assert code == 2 and "already exists" in out and target.read_text() == "precious", out
    code, out, _ = invoke(*command, "-o", str(target), "--force", "--db", str(db))
    assert code == 0 and target.read_text() != "precious", out


def test_dash_writes_text_formats_to_stdout(db: Path) -> None:
    code, out, _ = invoke(
        "export", "demo", "-o", "-", "--format", "dot", "-k", "400", "--db", str(db)
    )
    assert code == 0 and "digraph" in out and "to stdout" in out
    code, out, _ = invoke(
        "export", "demo", "-o", "-", "--format", "eap-json", "-k", "400", "--db", str(db)
    )
    assert code == 0 and '"cfg"' in out
    code, out, _ = invoke("query", "edges", "demo", "-o", "-", "--db", str(db))
    assert code == 0 and out.splitlines()[0].startswith("edge,")
    code, out, _ = invoke("show", "demo", "-o", "-", "-k", "40", "--db", str(db))
    assert code == 0 and "</svg>" in out


def test_all_digit_run_name_is_reachable_and_ids_still_work(db: Path) -> None:
    code, out, _ = invoke("query", "paths", "12345", "--all", "--db", str(db))
    assert code == 0 and "of 12345" in out, out
    code, out, _ = invoke(
        "sql", "SELECT run_id FROM runs WHERE name = 'demo'", "-o", "-", "--db", str(db)
    )
    demo_id = out.splitlines()[1].strip()
    code, out2, _ = invoke("query", "paths", demo_id, "--db", str(db))
    code_name, out_name, _ = invoke("query", "paths", "demo", "--db", str(db))
    assert code == 0 and code_name == 0
    assert out2.splitlines()[1:] == out_name.splitlines()[1:], (
        "id and name must select the same run"
    )


def test_partial_run_is_flagged_on_export_and_show(db: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(db.read_bytes())
    code, out, _ = invoke(
        "sql",
        "UPDATE runs SET status = 'interrupted' WHERE name = 'demo'",
        "--write",
        "--db",
        str(copy),
    )
    assert code == 0, out
    code, out, _ = invoke(
        "export", "demo", "-o", str(tmp_path / "c.json"), "-k", "400", "--db", str(copy)
    )
    assert (
        code == 0
        and "partial result" in out
        and f"pathdb resume demo --db {copy}" in out.replace("\n", "")
    ), out
    code, out, _ = invoke(
        "show", "demo", "-o", str(tmp_path / "c.svg"), "-k", "40", "--db", str(copy)
    )
    assert code == 0 and "partial result" in out
    code, out, _ = invoke(
        "export", "demo", "-o", str(tmp_path / "d.json"), "-k", "400", "--db", str(db)
    )
    assert code == 0 and "partial result" not in out


def test_empty_filter_says_no_rows(db: Path) -> None:
    code, out, _ = invoke("query", "paths", "demo", "--min-depth", "50", "--db", str(db))
    assert code == 1 and "no rows" in out


def test_version() -> None:
    code, out, _ = invoke("--version")
    assert code == 0 and out.startswith("pathdb ")
    proc = subprocess.run(
        [sys.executable, "-m", "cli.app", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("pathdb ")


def test_python_api_uses_one_thread_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathdb.models import load
    from pathdb.prompts import load_prompts
    from search.api import find_paths
    from search.strategies import SearchParams, SearchRun

    seen: list[int] = []
    original = SearchRun.run

    def spy(self: SearchRun, *a: object, **k: object) -> object:
        seen.append(torch.get_num_threads())
        return original(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(SearchRun, "run", spy)
    model = load("toy-ioi")
    prompts = load_prompts("toy-ioi-small", model)
    params = SearchParams(min_contribution=0.5, max_depth=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        find_paths(model, prompts, params)
        assert seen[-1] == 1 and torch.get_num_threads() == 2
        find_paths(model, prompts, params, threads=None)
        assert seen[-1] == 2
        with pytest.raises(ValueError, match="threads"):
            find_paths(model, prompts, params, threads=0)
    finally:
        torch.set_num_threads(previous)
