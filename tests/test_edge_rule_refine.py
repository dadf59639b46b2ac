"""Sender-aware edge scores and the ranking refinement of the group rule
(benchmarks/faithfulness_ideas.py: ``widest_input_chain``, ``refine_ranking``, measured by
``bench_faithfulness.py --configs rule-ideas``):
the first against an enumeration of every input -> sender chain, the second against the
independent hand-written masked forward of tests/test_evaluate.py."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.faithfulness_ideas import refine_ranking, widest_input_chain
from pathdb.evaluate.graph import EdgeGraph, full_edge_table
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.prompts import PromptSet
from pathdb.query.aggregate import prune_edges, select_edges
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
    got = widest_input_chain(table)
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
    refined = refine_ranking(table, ev, step, n_max)
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
