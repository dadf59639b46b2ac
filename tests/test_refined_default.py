"""The ``refined`` edge rule by default: a completed search stores its top edges' refined scores
(revision 0009) after the transaction that completes it, and export / evaluate / compare use them
without the model; runs with only group effects fall back to ``group``, ``--edge-scores`` still
chooses, and a refinement that cannot run or is interrupted leaves a completed ``group`` run.

The stored scores must equal a recomputation with the model on the stored prompts; merge must keep
them (resume: tests/test_group_default.py); the CLI's choice is checked in real ``pathdb``
subprocesses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pathdb.evaluate.graph import full_edge_table
from pathdb.evaluate.groups import NOT_MEASURED, rule_inputs, search_evaluator
from pathdb.evaluate.refine import MAX, STEP, refine_order
from pathdb.query import edges
from pathdb.query.edge_rules import sender_capped
from pathdb.store.db import open_store
from pathdb.store.effects import default_edge_rule, stored_group_effects, stored_refined
from pathdb.store.merge import merge_stores
from search import SearchParams, SearchRequest, run_loaded
from tests.cli_process import pathdb

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _rule(db: Path, run: str) -> tuple[str, dict[str, float] | None, dict[str, float] | None]:
    """Run ``run``'s default edge rule with its stored inputs."""
    with open_store(db, read_only=True) as store:
        rid = store.con.execute("SELECT run_id FROM runs WHERE name = ?", [run]).fetchall()[0][0]
        return default_edge_rule(store.con, rid)


def test_completed_search_stores_the_refinement_of_its_group_scores(
    toy_exact_run: tuple[Path, Any, Any],
) -> None:
    db, model, _ = toy_exact_run
    rule, effects, refined = _rule(db, "exact")
    assert rule == "refined" and effects is not None and refined is not None
    with open_store(db, read_only=True) as store:
        ev = search_evaluator(store.con, "exact", model)
        grouped = edges(store.con, "exact", rule="group", effects=effects)
        capped = full_edge_table(ev.graph, grouped.assign(score=sender_capped(grouped)))
        again = refine_order(capped, ev)
        default = edges(store.con, "exact", rule="refined", effects=effects, refined=refined)
    assert refined == pytest.approx(again, rel=1e-9, abs=1e-12)  # the model on the stored prompts
    n_scored = int(capped["score"].ne(0).sum())
    assert len(refined) == min(n_scored, MAX + STEP)
    # the window's scores are the capped magnitudes re-dealt: same multiset, signs kept
    top = capped.loc[capped["score"].ne(0)].sort_values("score", key=abs, ascending=False)
    want = top["score"].abs().to_numpy()[: len(refined)]
    assert sorted(map(abs, refined.values()), reverse=True) == pytest.approx(list(want))
    sign = dict(zip(capped["edge"], capped["score"], strict=True))
    assert all(v * sign[e] > 0 for e, v in refined.items())
    moved = [e for e, v in refined.items() if v != pytest.approx(sign[e], rel=1e-12)]
    assert moved  # toy-ioi's refinement did re-order some edges
    got = dict(zip(default["edge"], default["score"], strict=True))
    assert all(got[e] == pytest.approx(v) for e, v in refined.items())


@pytest.mark.parametrize("failure", ["not-measured", "interrupted"])
def test_a_refinement_that_does_not_finish_leaves_a_completed_group_run(
    toy_exact_run: tuple[Path, Any, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """The edge-masked forward refusing the refinement, or Ctrl-C during it: the run stays
    completed with its group effects, nothing refined, and the group rule as its default."""
    _, model, prompts = toy_exact_run
    error = NOT_MEASURED[0]("refused") if failure == "not-measured" else KeyboardInterrupt()

    def broken(*args: Any) -> dict[str, float]:
        raise error

    monkeypatch.setattr("pathdb.evaluate.refine.refined_scores", broken)
    db = tmp_path / "f.duckdb"
    req = SearchRequest(params=SearchParams(min_contribution=0.1))
    if failure == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    else:
        assert run_loaded(req, model, prompts, db, run_name="r", quiet=True).status == "completed"
    with open_store(db, read_only=True) as store:
        assert store.con.execute("SELECT status FROM runs").fetchall() == [("completed",)]
        assert stored_refined(store.con, 1) is None and stored_group_effects(store.con, 1)
        assert default_edge_rule(store.con, 1).rule == "group"


def test_merge_carries_the_refinement(toy_exact_run: tuple[Path, Any, Any], tmp_path: Path) -> None:
    db, _, _ = toy_exact_run
    old = Path(shutil.copy(db, tmp_path / "old.duckdb"))  # as searched at revision 0008
    with open_store(old) as store:
        store.con.execute("DELETE FROM refined_edges")
        store.con.execute("UPDATE runs SET name = 'old'")
    out = tmp_path / "merged.duckdb"
    merge_stores(out, [db, old])
    assert _rule(out, "exact") == _rule(db, "exact")
    assert _rule(out, "old")[0] == "group"


def test_rule_inputs_measure_what_a_run_did_not_store(
    toy_exact_run: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    db, model, _ = toy_exact_run
    old = Path(shutil.copy(db, tmp_path / "old.duckdb"))
    with open_store(old) as store:
        store.con.execute("DELETE FROM refined_edges")
    with open_store(old, read_only=True) as store:
        measured = rule_inputs(store.con, "exact", "refined", model)
    assert measured == _rule(db, "exact")


def _scores(path: Path) -> dict[str, float]:
    """Every edge's score in an EAP-IG JSON export."""
    return {e: x["score"] for e, x in json.loads(path.read_text())["edges"].items()}


def test_cli_exports_and_evaluates_the_refined_rule_by_default(
    toy_exact_run: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    """Default export: refined from the stored scores (no model loaded), equal to the query
    layer's; ``--edge-scores group`` still chooses; evaluate records ``score [refined]``."""
    db, _, _ = toy_exact_run
    judged = Path(shutil.copy(db, tmp_path / "judged.duckdb"))  # evaluate writes: its own store
    res = pathdb("export", "exact", "-o", "refined.json", "--db", str(db), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "edge rule refined: stored by the search" in " ".join(res.stderr.split())
    res = pathdb("export", "exact", "-o", "group.json", "--edge-scores", "group", "--db", str(db),
                 cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "edge rule group: stored by the search" in " ".join(res.stderr.split())
    old = Path(shutil.copy(db, tmp_path / "old.duckdb"))  # as searched at revision 0008
    with open_store(old) as store:
        store.con.execute("DELETE FROM refined_edges")
    res = pathdb("export", "exact", "-o", "measured.json", "--edge-scores", "refined", "--db",
                 str(old), cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "edge rule refined: measured with the model" in " ".join(res.stderr.split())
    rule, effects, refined = _rule(db, "exact")
    with open_store(db, read_only=True) as store:
        table = edges(store.con, "exact", rule=rule, effects=effects, refined=refined)
        group = edges(store.con, "exact", rule="group", effects=effects)
    for path, want in (("refined.json", table), ("measured.json", table), ("group.json", group)):
        got = _scores(tmp_path / path)
        scores = dict(zip(want["edge"], want["score"], strict=True))
        assert got == pytest.approx({e: scores.get(e, 0.0) for e in got}, abs=1e-6), path
    res = pathdb("evaluate", "exact", "--no-paths", "--db", str(judged), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "edge rule refined (score)" in " ".join(res.stdout.split())
    with open_store(judged, read_only=True) as s:
        assert s.con.execute("SELECT score FROM evaluations").fetchall() == [("score [refined]",)]


def test_refined_rule_refuses_per_prompt_and_sign_selections(
    toy_exact_run: tuple[Path, Any, Any],
) -> None:
    from pathdb.query.common import QueryError

    db, _, _ = toy_exact_run
    _, effects, refined = _rule(db, "exact")
    with open_store(db, read_only=True) as store, pytest.raises(QueryError, match="whole run"):
        edges(store.con, "exact", rule="refined", effects=effects, refined=refined, prompt=0)
