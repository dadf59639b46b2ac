"""``pathdb evaluate``, ``pathdb compare``, ``pathdb show --faithfulness`` and ``pathdb runs``
end to end (real subprocesses of the CLI on a real store), across runs of different methods."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from pathdb.evaluate.compare import agreement, summary
from pathdb.evaluate.storage import latest_evaluation
from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, run_loaded
from tests.cli_process import pathdb


@pytest.fixture(scope="module")
def evaluated(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Three toy-ioi-2l runs (exact, attribution, hybrid); the first two evaluated by the CLI."""
    tmp = tmp_path_factory.mktemp("cmp")
    db = tmp / "s.duckdb"
    before = torch.get_num_threads()
    model = load("toy-ioi-2l", device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    for name, method in (("exact", "exact"), ("attr", "attribution"), ("hyb", "hybrid")):
        params = SearchParams(method=method, min_contribution=0.05)  # type: ignore[arg-type]
        run_loaded(
            SearchRequest(model="toy-ioi-2l", params=params),
            model,
            prompts,
            db,
            run_name=name,
            quiet=True,
        )
    torch.set_num_threads(before)
    proc = pathdb(
        "evaluate", "exact", "attr", "--db", str(db), "--counts", "12,30", "-o", "both.png", cwd=tmp
    )
    return db, proc


def test_evaluate_prints_stores_and_draws(evaluated: tuple[Path, Any]) -> None:
    db, proc = evaluated
    assert proc.returncode == 0, proc.stderr
    assert "run 'exact': CPR" in proc.stdout and "run 'attr': CPR" in proc.stdout
    assert "toy-ioi-heldout" in proc.stdout and "top-k paths -> faithfulness" in proc.stdout
    assert (db.parent / "both.png").read_bytes()[:4] == b"\x89PNG"
    with open_store(db, read_only=True) as store:
        for run in ("exact", "attr"):
            ev = latest_evaluation(store.con, run)
            assert ev is not None and ev.heldout and ev.prompts == "toy-ioi-heldout"
            assert {p.k for p in ev.points if p.source == "user"} == {12, 30}
            assert {p.curve for p in ev.points} == {"signed", "abs", "paths"}
            assert f"CPR {ev.cpr:.4f}" in proc.stdout
        assert latest_evaluation(store.con, "hyb") is None


def test_compare_across_methods(evaluated: tuple[Path, Any]) -> None:
    db, _ = evaluated
    proc = pathdb(
        "compare", "exact", "attr", "--db", str(db), "-k", "20", "-o", "cmp.svg", cwd=db.parent
    )
    assert proc.returncode == 0, proc.stderr
    for word in (
        "exact",
        "attribution",
        "cpr",
        "cmd",
        "edges_80",
        "edges_90",
        "search_s",
        "jaccard_top20",
        "spearman",
    ):
        assert word in proc.stdout, word
    assert (db.parent / "cmp.svg").read_text().lstrip().startswith("<?xml")
    with open_store(db, read_only=True) as store:
        evs = [latest_evaluation(store.con, r) for r in ("exact", "attr")]
        table = summary(store.con, [e for e in evs if e is not None])
        pairs = agreement(store.con, ["exact", "attr"], top_k=20)
    assert list(table["method"]) == ["exact", "attribution"]
    assert table["cpr"].between(0, 1).all() and (table["search_s"] > 0).all()
    assert 0 <= pairs.loc[0, "jaccard_top20"] <= 1 and -1 <= pairs.loc[0, "spearman"] <= 1
    with open_store(db, read_only=True) as store:  # a run compared with itself agrees fully
        same = agreement(store.con, ["exact", "exact"], top_k=20)
    assert same.loc[0, "jaccard_top20"] == 1.0 and same.loc[0, "spearman"] == pytest.approx(1.0)


def test_show_faithfulness_and_runs_column(evaluated: tuple[Path, Any]) -> None:
    db, _ = evaluated
    proc = pathdb(
        "show",
        "exact",
        "--faithfulness",
        "--with",
        "attr",
        "-o",
        "f.png",
        "--db",
        str(db),
        cwd=db.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s)" in proc.stderr and (db.parent / "f.png").stat().st_size > 1000
    runs = pathdb("runs", "--db", str(db), cwd=db.parent)
    assert runs.returncode == 0 and "cpr" in runs.stdout and "cmd" in runs.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "exact"], "compare needs at least two runs"),
        (
            ["compare", "exact", "hyb"],
            "run 'hyb' has no stored evaluation; run `pathdb evaluate hyb",
        ),
        (["evaluate", "nosuch"], "unknown run 'nosuch'"),
        (["evaluate", "exact", "--intervention", "resample"], "--intervention must be one of"),
        (["evaluate", "exact", "--counts", "5,x"], "--counts must be comma-separated"),
        (
            ["show", "exact", "--faithfulness", "-o", "f.pdf"],
            "f.pdf: the plot must be a .svg or .png",
        ),
        (["show", "hyb", "--faithfulness", "-o", "h.svg"], "run 'hyb' has no stored evaluation"),
    ],
)
def test_bad_input_gives_one_line_errors(
    evaluated: tuple[Path, Any], args: list[str], message: str
) -> None:
    db, _ = evaluated
    proc = pathdb(*args, "--db", str(db), cwd=db.parent)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (db.parent / "f.pdf").exists() and not (db.parent / "h.svg").exists()
