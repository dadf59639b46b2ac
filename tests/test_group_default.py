"""The ``group`` edge rule: a completed search stores its receivers' group effects (revision 0008),
and export / evaluate / compare use them without the model (by default for runs searched at
revision 0008, before the ``refined`` rule: tests/test_refined_default.py); runs without them
fall back to the ``effect`` rule, and ``--edge-scores`` still chooses.

Stored effects are checked against TransformerLens hooks written in tests/test_kv_split.py (the
receiver input replaced by the counterfactual run's residual stream) and against the model-computed
effects of the stored prompts; resume and merge must keep them; the CLI's choice is checked in
real ``pathdb`` subprocesses.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from pathdb.evaluate.groups import (
    receiver_effects,
    run_effects,
    search_evaluator,
    search_group_effects,
)
from pathdb.evaluate.heldout import heldout_examples
from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.query import edges
from pathdb.store.db import open_store
from pathdb.store.effects import default_edge_rule, stored_group_effects
from pathdb.store.merge import merge_stores
from search import SearchParams, SearchRequest, resume_search, run_loaded
from tests.cli_process import pathdb
from tests.interrupts import interrupt_on_checkpoint
from tests.reference_hooks import group_effect

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

N_RECEIVERS = 4 * (3 * 4 + 1) + 1  # toy-ioi: 4 layers x (q, k, v of 4 heads + the MLP) + logits


def _stored(db: Path, run: str) -> dict[str, float] | None:
    """Run ``run``'s stored group effects (None: none)."""
    with open_store(db, read_only=True) as store:
        rid = store.con.execute("SELECT run_id FROM runs WHERE name = ?", [run]).fetchall()[0][0]
        return stored_group_effects(store.con, rid)


def _without_effects(db: Path, out: Path, table: str = "group_effects") -> Path:
    """A copy of the store whose runs have no stored group effects (as if searched before 0008;
    ``table="refined_edges"``: no refined scores, as if searched at 0008)."""
    shutil.copy(db, out)
    with open_store(out) as store:
        store.con.execute(f"DELETE FROM {table}")
    return out


def test_completed_search_stores_the_hooks_group_effects(
    toy_exact_run: tuple[Path, Any, Any],
) -> None:
    db, model, prompts = toy_exact_run
    stored = _stored(db, "exact")
    assert stored is not None and len(stored) == N_RECEIVERS
    for receiver in ("a0.h1<q>", "a1.h2<k>", "a3.h1<v>", "m2", "logits"):
        assert stored[receiver] == pytest.approx(
            group_effect(model, prompts, receiver), abs=1e-4
        ), receiver
    with open_store(db, read_only=True) as store:
        measured = receiver_effects(search_evaluator(store.con, "exact", model))
        assert default_edge_rule(store.con, 1)[0] == "refined"  # group effects, then refined
    assert stored == pytest.approx(measured, abs=1e-9)  # the stored prompts give the same


def test_masked_forward_unavailable_stores_none(toy_exact_run: tuple[Path, Any, Any]) -> None:
    """A model the edge-masked forward refuses (TransformerLens 4 bridge) stores no effects:
    the search still completes and the run falls back to the effect rule."""
    _, _, prompts = toy_exact_run
    bridge = SimpleNamespace(is_bridge=True)
    assert search_group_effects(bridge, prompts, "logit_difference", "counterfactual") is None


def test_no_group_effects_stores_none_and_exports_with_the_effect_rule(
    toy_exact_run: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    """``group_effects=False`` (CLI ``--no-group-effects``) skips the measurement: same paths,
    nothing in ``group_effects``, the run defaults to the effect rule; the choice is kept with
    the request (a resume keeps it)."""
    shared, model, prompts = toy_exact_run
    db = Path(shutil.copy(shared, tmp_path / "plain.duckdb"))  # the module's store stays as is
    req = SearchRequest(params=SearchParams(min_contribution=0.1), group_effects=False)
    run_loaded(req, model, prompts, db, run_name="plain", quiet=True)
    assert _stored(db, "plain") is None
    with open_store(db, read_only=True) as store:
        con = store.con
        rid = con.execute("SELECT run_id FROM runs WHERE name = 'plain'").fetchall()[0][0]
        assert default_edge_rule(con, rid)[0] == "effect"
        same = "SELECT count(*) FROM paths WHERE run_id = ?"
        assert con.execute(same, [rid]).fetchall() == con.execute(same, [1]).fetchall()
    assert not SearchRequest.from_json(req.to_json()).group_effects


def test_resume_stores_the_effects_and_refinement_of_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts="toy-ioi-small",
        params=SearchParams(min_contribution=0.02, checkpoint_every=1e-9),
    )
    db = tmp_path / "r.duckdb"
    run_loaded(req, model, prompts, db, run_name="full", quiet=True)
    interrupt_on_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, db, run_name="cut", quiet=True)
    monkeypatch.undo()
    assert _stored(db, "cut") is None  # interrupted: nothing stored yet
    resume_search("cut", db, quiet=True)
    full, resumed = _stored(db, "full"), _stored(db, "cut")
    assert full is not None and resumed == full
    with open_store(db, read_only=True) as store:  # and the refined scores that follow them
        rules = [default_edge_rule(store.con, rid) for rid in (1, 2)]
    assert rules[0].rule == "refined" and rules[0] == rules[1]


def test_merge_carries_the_effects(toy_exact_run: tuple[Path, Any, Any], tmp_path: Path) -> None:
    db, _, _ = toy_exact_run
    out = tmp_path / "merged.duckdb"
    old = _without_effects(db, tmp_path / "old.duckdb")
    with open_store(old) as store:
        store.con.execute("UPDATE runs SET name = 'old'")
    merge_stores(out, [db, old])
    with open_store(out, read_only=True) as store:
        runs = dict(store.con.execute("SELECT name, run_id FROM runs").fetchall())
        assert set(runs) == {"exact", "old"}
        assert stored_group_effects(store.con, runs["exact"]) == _stored(db, "exact")
        assert default_edge_rule(store.con, runs["exact"])[0] == "refined"
        assert default_edge_rule(store.con, runs["old"])[0] == "effect"


def _scores(path: Path) -> dict[str, float]:
    """Every edge's score in an EAP-IG JSON export."""
    return {e: x["score"] for e, x in json.loads(path.read_text())["edges"].items()}


def _on_every_edge(table: Any, like: dict[str, float]) -> dict[str, float]:
    """An edge table's scores on the edges of ``like`` (unscored edges 0, as the export writes)."""
    scores = dict(zip(table["edge"], table["score"], strict=True))
    return {e: float(scores.get(e, 0.0)) for e in like}


def test_cli_default_rule_follows_the_stored_effects(
    toy_exact_run: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    """Default export of runs searched at revision 0008: group with stored effects (no model
    loaded), effect without; measuring the effects with the model gives the stored ones; evaluate
    judges the default rule."""
    shared, model, _ = toy_exact_run
    db = _without_effects(shared, tmp_path / "g.duckdb", "refined_edges")
    old = _without_effects(db, tmp_path / "old.duckdb")
    judged = Path(shutil.copy(db, tmp_path / "judged.duckdb"))  # evaluate writes: its own store
    recs = [ex.to_record() for ex in heldout_examples()[::8][:4]]
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    with ThreadPoolExecutor(3) as pool:  # three independent CLI processes at once
        exports = [
            pool.submit(pathdb, "export", "exact", "-o", out, "--db", str(path), cwd=tmp_path)
            for path, out in ((db, "default.json"), (old, "old.json"))
        ]
        evaluated = pool.submit(pathdb, "evaluate", "exact", "-p", "h.jsonl", "--no-paths",
                                "--db", str(judged), cwd=tmp_path)  # fmt: skip
    for job, note in zip(exports, ("edge rule group: stored by the search", "edge rule effect"),
                         strict=True):  # fmt: skip
        res = job.result()
        assert res.returncode == 0, res.stderr
        assert note in " ".join(res.stderr.split())
    with open_store(old, read_only=True) as store:
        effect = edges(store.con, "exact", rule="effect")
        group = edges(
            store.con, "exact", rule="group", effects=run_effects(store.con, "exact", model)
        )
    default, plain = _scores(tmp_path / "default.json"), _scores(tmp_path / "old.json")
    assert default == pytest.approx(_on_every_edge(group, default), abs=1e-5)
    assert plain == pytest.approx(_on_every_edge(effect, plain), abs=1e-6)
    assert default != pytest.approx(plain, abs=1e-3)  # the rescaling changed scores

    res = evaluated.result()
    assert res.returncode == 0, res.stderr
    assert "edge rule group (score)" in " ".join(res.stdout.split())
    with open_store(judged, read_only=True) as s:
        assert s.con.execute("SELECT score FROM evaluations").fetchall() == [("score [group]",)]


def test_networkx_export_names_its_edge_rule(toy_exact_run: tuple[Path, Any, Any]) -> None:
    from pathdb.export import to_networkx
    from pathdb.query import circuit

    db, _, _ = toy_exact_run
    with open_store(db, read_only=True) as store:
        stored = stored_group_effects(store.con, 1)
        for rule, effects in (("group", stored), ("effect", None)):
            c = circuit(store.con, "exact", top_k=20, rule=rule, effects=effects, score="abs_score")
            g = to_networkx(c)
            assert (g.graph["edge_rule"], g.graph["weight"]) == (rule, "abs_score")


def test_greedy_selection_is_mibs_apply_greedy_by_hand() -> None:
    """MIB's ``apply_greedy`` grows the circuit from the logits up; top-n takes the best edges
    wherever they are. Hand-worked on a 2-layer, 1-head graph (unlisted edges score 0)."""
    from pathdb.evaluate.curves import greedy_edges, top_edges
    from pathdb.evaluate.graph import EdgeGraph, full_edge_table

    scored = {"input->a0.h0<q>": 5.0, "m1->logits": 1.0, "input->m1": 0.9,
              "a1.h0->logits": 0.2, "input->a1.h0<v>": 0.15, "a0.h0->m1": 0.1}  # fmt: skip
    table = full_edge_table(
        EdgeGraph.of(2, 1), pd.DataFrame({"edge": list(scored), "score": list(scored.values())})
    )
    # heap from the logits: m1->logits (reaches m1: its input edges join), input->m1,
    # a1.h0->logits (reaches a1.h0), input->a1.h0<v>: all four on input -> logits chains
    assert sorted(greedy_edges(table, 4, "abs")) == sorted(
        ["m1->logits", "input->m1", "a1.h0->logits", "input->a1.h0<v>"]
    )
    # top-4 takes input->a0.h0<q> (a0.h0 feeds nothing chosen) and a1.h0->logits (a1.h0 gets no
    # input): pruning leaves two edges
    assert sorted(top_edges(table, 4, "abs")) == ["input->m1", "m1->logits"]
    # greedy at 3 stops before a1.h0's input edge: a1.h0->logits is pruned
    assert sorted(greedy_edges(table, 3, "abs")) == ["input->m1", "m1->logits"]
