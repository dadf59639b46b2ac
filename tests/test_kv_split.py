"""The ``group`` edge rule (issue 12 item 5): every receiver input's edges share its group effect.

A receiver input's group effect (all its incoming edges corrupted at once, on the run's search
prompts) is checked against TransformerLens hooks written here (the input replaced by the
counterfactual run's residual stream); the rule itself against a hand computation; the CLI's
``export --edge-scores group`` and ``evaluate --edge-scores group`` on a real toy-ioi search.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pathdb.evaluate.groups import receiver_effects, rule_edges, search_evaluator
from pathdb.evaluate.heldout import heldout_examples
from pathdb.query import edges
from pathdb.query.common import QueryError
from pathdb.query.edge_rules import group_rule
from pathdb.store.db import open_store
from tests.cli_process import pathdb
from tests.reference_hooks import group_effect

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _row(edge: str, pos: float, neg: float, n: int = 1) -> dict[str, Any]:
    """An edge row as :func:`pathdb.query.edges` writes it (dst = the edge's receiver component)."""
    return {"edge": edge, "score": pos + neg, "abs_score": pos - neg, "pos_score": pos,
            "neg_score": neg, "n_paths": n}  # fmt: skip


def test_group_rule_matches_hand() -> None:
    table = pd.DataFrame([
        _row("input->a1.h0<k>", 0.1, 0.0, 3),
        _row("a0.h0->a1.h0<k>", 0.02, -0.07, 2),
        _row("m0->logits", 2.0, 0.0),  # no group effect given: unchanged
        _row("input->m1", 0.0, 0.0),  # nothing to share the group effect with: unchanged
    ])  # fmt: skip
    got = group_rule(table, {"a1.h0<k>": 1.0, "m1": 0.4}).set_index("edge")
    # G - sum = 1.0 - 0.05 = 0.95, shared by |score| (0.1 and 0.05 of 0.15)
    k1, k2 = 0.1 + 0.95 * 0.1 / 0.15, -0.05 + 0.95 * 0.05 / 0.15
    assert got.loc["input->a1.h0<k>", "score"] == pytest.approx(k1)
    assert got.loc["a0.h0->a1.h0<k>", "score"] == pytest.approx(k2)
    f = k2 / -0.05  # negative: the positive and negative parts swap
    assert got.loc[
        "a0.h0->a1.h0<k>", ["pos_score", "neg_score", "abs_score"]
    ].tolist() == pytest.approx([-0.07 * f, 0.02 * f, 0.09 * -f])
    assert got.loc["m0->logits", "score"] == 2.0 and got.loc["input->m1", "score"] == 0.0
    assert got["n_paths"].to_dict() == {
        "m0->logits": 1,
        "input->a1.h0<k>": 3,
        "a0.h0->a1.h0<k>": 2,
        "input->m1": 1,
    }
    assert list(got.index) == ["m0->logits", "input->a1.h0<k>", "a0.h0->a1.h0<k>", "input->m1"]
    assert (got["pos_score"] + got["neg_score"]).tolist() == pytest.approx(got["score"].tolist())


@pytest.fixture(scope="module")
def effects(toy_exact_run: tuple[Path, Any, Any]) -> dict[str, float]:
    """The search run's receiver group effects (the library's)."""
    db, model, _ = toy_exact_run
    with open_store(db, read_only=True) as store:
        return receiver_effects(search_evaluator(store.con, "exact", model))


def test_group_effects_match_hooks(
    toy_exact_run: tuple[Path, Any, Any], effects: dict[str, float]
) -> None:
    _, model, prompts = toy_exact_run
    for receiver in ("a1.h2<k>", "a2.h0<q>", "a3.h1<v>", "m2", "logits"):
        want = group_effect(model, prompts, receiver)
        assert effects[receiver] == pytest.approx(want, abs=1e-4), receiver
    assert effects["logits"] > 0  # corrupting everything hurts: the path scores' sign


def test_group_edges_sum_to_group_effects(
    toy_exact_run: tuple[Path, Any, Any], effects: dict[str, float]
) -> None:
    db, model, _ = toy_exact_run
    with open_store(db, read_only=True) as store:
        effect = edges(store.con, "exact", rule="effect")
        group = rule_edges(store.con, "exact", "group", model)
        with pytest.raises(QueryError, match="rule='group'"):
            edges(store.con, "exact", rule="group")
    assert set(group["edge"]) == set(effect["edge"])
    receiver = group["edge"].str.split("->").str[1]
    for r, rows in group.groupby(receiver):
        if rows["score"].abs().sum() > 0:
            assert rows["score"].sum() == pytest.approx(effects[str(r)], abs=1e-6), r
    # key inputs are under-scored by single edges: the rule raises them
    k_in = receiver.str.endswith("<k>")
    assert group.loc[k_in, "score"].abs().sum() > effect.loc[k_in.values, "score"].abs().sum()


def test_cli_group_export_and_evaluate(
    toy_exact_run: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    db, model, prompts = toy_exact_run
    res = pathdb(
        "export", "exact", "-o", "g.json", "--edge-scores", "group", "--db", str(db), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "g.json").read_text())["edges"]
    into = {e: x["score"] for e, x in data.items() if e.endswith("->a1.h2<k>")}
    assert any(into.values())
    assert sum(into.values()) == pytest.approx(group_effect(model, prompts, "a1.h2<k>"), abs=1e-4)
    recs = [ex.to_record() for ex in heldout_examples()[::8][:4]]
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    judged = Path(shutil.copy(db, tmp_path / "judged.duckdb"))  # evaluate writes: its own store
    res = pathdb("evaluate", "exact", "--edge-scores", "group", "-p", "h.jsonl", "--no-paths",
                 "--db", str(judged), cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "CPR" in res.stdout
    with open_store(judged, read_only=True) as store:
        assert (
            store.con.execute("SELECT score FROM evaluations").fetchall()[-1][0] == "score [group]"
        )
    bad = pathdb(
        "evaluate", "exact", "--edge-scores", "group", "--positional", "--db", str(db), cwd=tmp_path
    )
    assert bad.returncode != 0 and "--edge-scores group is position-free" in bad.stderr
    assert "Traceback" not in bad.stderr
