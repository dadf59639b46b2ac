"""The two steps of the ``refined`` edge rule: sender-capped scores
(:func:`pathdb.query.edge_rules.sender_capped`) against an enumeration of every input -> sender
chain, and the ranking refinement (:func:`pathdb.evaluate.refine.refine_order`) against the
independent hand-written masked forward of tests/test_evaluate.py."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from pathdb.evaluate.graph import EdgeGraph, full_edge_table
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.evaluate.refine import refine_order
from pathdb.prompts import PromptSet
from pathdb.query.aggregate import prune_edges, select_edges
from pathdb.query.edge_rules import sender_capped
from tests.test_evaluate import reference_metric

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _random_table(graph: EdgeGraph, seed: int) -> pd.DataFrame:
    """Every real edge of ``graph`` with a random signed score (a few exact zeros)."""
    rng = np.random.default_rng(seed)
    names = [e for e, _, _ in graph.spec.edges]
    score = rng.normal(size=len(names)) * (rng.random(len(names)) > 0.1)
    return full_edge_table(graph, pd.DataFrame({"edge": names, "score": score}))


def test_widest_input_chain_matches_every_enumerated_chain() -> None:
    graph = EdgeGraph.of(3, 2)
    table = _random_table(graph, 3)
    score = dict(zip(table["edge"], table["score"], strict=True))
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for edge, src, dst in zip(table["edge"], table["src"], table["dst"], strict=True):
        out[src].append((dst, edge))
    widest: dict[str, float] = {}  # node -> max over input -> node chains of the min |score|

    def walk(node: str, bottleneck: float) -> None:
        widest[node] = max(widest.get(node, 0.0), bottleneck)
        for dst, edge in out[node]:
            walk(dst, min(bottleneck, abs(score[edge])))

    walk("input", math.inf)
    got = table.assign(score=sender_capped(table))
    for edge, src, value in zip(got["edge"], got["src"], got["score"], strict=True):
        want = min(abs(score[edge]), widest.get(src, 0.0)) * (-1.0 if score[edge] < 0 else 1.0)
        assert value == pytest.approx(want, abs=1e-12), edge
    assert got["score"].abs().lt(table["score"].abs()).any()  # some sender chains are weaker


def _circuit(table: pd.DataFrame, k: int) -> set[str]:
    return set(prune_edges(select_edges(table, top_k=k, threshold=None, by="abs"))["edge"])


def test_refined_ranking_only_swaps_in_better_circuits(model64: Any, prompts64: PromptSet) -> None:
    ev = MaskedEvaluator(model64, prompts64, "logit_difference", "counterfactual")
    table = _random_table(ev.graph, 5)
    step, n_max = 5, 30
    scores = refine_order(table, ev, step, n_max)
    assert len(scores) == n_max + step  # the window: every edge a pass can move
    unscored = set(table.loc[table["score"].eq(0), "edge"])
    assert unscored and not unscored & set(scores)  # an edge the search never scored never moves
    refined = table.assign(score=table["edge"].map(scores).fillna(table["score"]))
    # the same |score| values and every edge's sign: only the order changes
    assert np.allclose(np.sort(refined["score"].abs()), np.sort(table["score"].abs()))
    assert (np.sign(refined["score"]) * np.sign(table["score"]) >= 0).all()
    # edges ranked below the last refined zone keep their ranks
    old = list(select_edges(table, top_k=None, threshold=None, by="abs")["edge"])
    new = list(select_edges(refined, top_k=None, threshold=None, by="abs")["edge"])
    assert new[n_max + step :] == old[n_max + step :]
    changed = 0
    for n in range(step, n_max + 1, step):
        before, after = _circuit(table, n), _circuit(refined, n)
        if before == after:
            continue
        changed += 1
        # reference_metric is the drop from the clean run: smaller is more faithful
        with torch.no_grad():
            drop_before = reference_metric(model64, prompts64, before, "counterfactual")
            drop_after = reference_metric(model64, prompts64, after, "counterfactual")
        assert drop_after < drop_before, n
    assert changed >= 2  # a random ranking leaves room: the refinement did act


def test_refined_rule_rescales_every_score_column_alike() -> None:
    """``refined_rule``: sender-capped scores, the stored ones where given; ``abs_score``,
    ``pos_score`` and ``neg_score`` scale by each edge's factor, ``n_paths`` stays."""
    from pathdb.query.edge_rules import refined_rule

    t = pd.DataFrame({
        "edge": ["input->a0.h0<q>", "input->m0", "a0.h0->m0", "m0->logits", "a0.h0->logits"],
        "src": ["input", "input", "a0.h0", "m0", "a0.h0"],
        "dst": ["a0.h0", "m0", "m0", "logits", "logits"],
        "score": [0.5, -2.0, 1.0, 3.0, -4.0],
        "abs_score": [0.7, 2.0, 1.5, 3.0, 5.0],
        "pos_score": [0.6, 0.0, 1.25, 3.0, 0.5],
        "neg_score": [-0.1, -2.0, -0.25, 0.0, -4.5],
        "n_paths": [1, 2, 3, 4, 5],
    })  # fmt: skip
    # a0.h0's widest input chain is 0.5: its out-edges are capped there; m0's is 2.0
    got = refined_rule(t, {"m0->logits": -9.0}).set_index("edge")
    want = {"input->a0.h0<q>": 0.5, "input->m0": -2.0, "a0.h0->m0": 0.5, "m0->logits": -9.0,
            "a0.h0->logits": -0.5}  # fmt: skip
    for edge, score in want.items():
        row, old = got.loc[edge], t.set_index("edge").loc[edge]
        f = score / old["score"]
        assert row["score"] == pytest.approx(score)
        assert row["abs_score"] == pytest.approx(old["abs_score"] * abs(f))
        pos, neg = old["pos_score"] * f, old["neg_score"] * f
        assert (row["pos_score"], row["neg_score"]) == pytest.approx(
            (pos, neg) if f > 0 else (neg, pos)
        )
        assert row["n_paths"] == old["n_paths"]
    assert list(got.index[:2]) == ["m0->logits", "input->m0"]  # re-sorted by |score|
