"""Cross-path batching of exact expansions (issue 22): ``expand_many`` / ``prefetch``, rows a path
never reads, repeated start messages and shared prefixes all give the dense engine's scores."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from pathdb.graph import Node, NodeKind, Site, predecessors
from search import node_functions
from search.activations import ActivationCache
from search.api import find_paths
from search.exact import ExactEvaluator
from search.node_functions import needed_rows
from search.strategies import SearchParams
from tests.engine_helpers import random_path
from tests.sparse_fixtures import (
    T,
    assert_same,
    dense,
    evaluator,
    prompt_set,
    record_calls,
    record_mlp_steps,
    sparse_setup,
)

pytestmark = pytest.mark.usefixtures("one_thread")

Path = tuple[Node, ...]


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    return sparse_setup()


def prefix_paths(positional: bool) -> list[Path]:
    """Frontier paths sharing the two-node prefix ``(mlp0, a1.h1<q>)`` and the suffix ``(a2.h0<q>,
    FINAL)`` in several combinations."""
    p = T - 1 if positional else None
    f = Node.final(3, p)
    x, y = Node.mlp(0, p), Node.attn(1, 1, Site.Q, p)
    a, m = Node.attn(2, 0, Site.Q, p), Node.mlp(2, p)
    return [(x, y, a, f), (x, y, m, f), (y, a, f), (x, a, f), (Node.attn(1, 0, Site.Q, p), a, f)]


def frontier(ev: ExactEvaluator, positional: bool, seed: str) -> list[tuple[Path, list[Node]]]:
    """Random frontier paths (every node kind, kv pre-screen nodes) plus :func:`prefix_paths`,
    each with its full candidate list."""
    rng = random.Random(seed)
    shape = ev.cache.shape
    paths = prefix_paths(positional)
    while len(paths) < 12:
        path = random_path(shape, rng.randint(1, 3), rng, positional=positional)
        if path[0].kind is not NodeKind.EMBED:
            paths.append(path)
    sites = (Site.K, Site.V)
    return [(p, predecessors(p[0], shape, heads=rng.random() < 0.7, kv_sites=sites)) for p in paths]


@pytest.mark.parametrize("patch_type", ["zero", "counterfactual", "mean"])
@pytest.mark.parametrize("positional", [True, False])
def test_expand_many_matches_dense(
    setup: dict[str, Any], patch_type: str, positional: bool
) -> None:
    """A level of frontier paths node by node (default budget, and a budget so small every
    candidate goes alone) scores as the dense engine does path by path, and as ``expand``."""
    ev = evaluator(setup, patch_type, positional)
    items = frontier(ev, positional, f"{patch_type}-{positional}")
    kinds = {n.kind for p, cands in items for n in (*p, *cands)}
    assert {NodeKind.EMBED, NodeKind.ATTN, NodeKind.MLP} <= kinds
    want = dense(lambda: [ev.expand(p, c).per_prompt for p, c in items])
    tiny = evaluator(setup, patch_type, positional, memory_budget=1)
    for e in (ev, tiny):
        for (p, c), got, w in zip(items, e.expand_many(items), want, strict=True):
            assert list(got.paths) == [(x, *p) for x in c]
            assert_same(got.per_prompt, w)
    for (p, c), w in zip(items[:4], want[:4], strict=True):
        assert_same(ev.expand(p, c).per_prompt, w)


def test_needed_rows() -> None:
    """Rows that reach the metric, backwards from FINAL: a row-wise node keeps its output rows,
    a kv-side head over all sources needs every source up to its last wanted query row."""
    f = Node.final(3, None)
    path = (Node.mlp(0, None), Node.attn(1, 0, Site.KV, None, None), Node.mlp(2, None), f)
    last, every = (T - 1,), tuple(range(T))
    assert needed_rows(path, T) == [(every, every), (every, last), (last, last), (last, last)]
    pos = (Node.mlp(0, 4), Node.attn(1, 0, Site.KV, 6, None), Node.final(3, 6))
    assert needed_rows(pos, T) == [((4,), (4,)), ((0, 1, 2, 3, 4, 5, 6), (6,)), ((6,), (6,))]
    q = (Node.attn(2, 0, Site.Q, None), Node.final(3, 5))  # a root at row 5: row 6 never counts
    assert needed_rows(q, T) == [((5,), (5,)), ((5,), (5,))]


def test_rows_the_path_never_reads_are_skipped(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-positional MLP read by a query-side head only matters at the root row: the batched
    engine computes that row alone (the dense one all T) and scores the same."""
    ev = evaluator(setup, "counterfactual", positional=False)
    seen = record_mlp_steps(monkeypatch)
    path = (Node.mlp(1, None), Node.attn(2, 0, Site.Q, None), Node.final(3, None))
    cands = predecessors(path[0], ev.cache.shape)
    want = dense(lambda: ev.expand(path, cands).per_prompt)
    assert seen and {len(m.pos) for m in seen} == {T}
    seen.clear()
    assert_same(ev.expand(path, cands).per_prompt, want)
    assert seen and {len(m.pos) for m in seen} == {1}


def test_repeated_start_messages_are_computed_once(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a source position a head's query and key/value sides start with the same message:
    each distinct message goes through the path once and the twins score identically."""
    ev = evaluator(setup, "counterfactual", positional=False, share_steps=False)
    first = Node.mlp(2, None)
    path = (first, Node.final(3, None))
    cands = predecessors(first, ev.cache.shape, kv_sites=(Site.KV,))
    twins = [(i, j) for i, c in enumerate(cands) for j, d in enumerate(cands)
             if c.kind is NodeKind.ATTN and c.site is Site.Q and d.site is Site.KV
             and (c.layer, c.head) == (d.layer, d.head)]  # fmt: skip
    assert len(twins) >= 4
    want = dense(lambda: ev.expand(path, cands).per_prompt)
    counted = record_mlp_steps(monkeypatch)
    got = ev.expand(path, cands).per_prompt
    assert_same(got, want)
    assert sum(m.n for m in counted) <= len(cands) - len(twins)
    for i, j in twins:
        assert torch.equal(got[i], got[j])


def test_shared_prefix_is_stepped_once(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two frontier paths starting with the same two nodes: in one ``expand_many`` their
    candidates go through the second node once (one lineage), and both score as dense."""
    inner = node_functions.attn_q_step
    for positional in (True, False):
        ev = evaluator(setup, "zero", positional, share_steps=False)
        a, b = prefix_paths(positional)[:2]
        cands = predecessors(a[0], ev.cache.shape)
        want = dense(lambda: [ev.expand(p, cands).per_prompt for p in (a, b)])  # noqa: B023
        through: list[int] = []

        def spy(
            node: Node, msg: node_functions.Msg, cache: ActivationCache, second: Node = a[1]
        ) -> node_functions.Msg:
            if node == second:
                through.append(msg.n)  # noqa: B023 (read within the iteration)
            return inner(node, msg, cache)

        with monkeypatch.context() as mp:
            mp.setattr(node_functions, "attn_q_step", spy)
            got = ev.expand_many([(a, cands), (b, cands)])
        assert 0 < sum(through) <= len(cands)
        for g, w in zip(got, want, strict=True):
            assert_same(g.per_prompt, w)


def test_prefetch_serves_expand_once(setup: dict[str, Any]) -> None:
    """``prefetch`` keeps each result for the one ``expand`` of exactly that path and candidate
    list; another candidate list is computed afresh, and a served result is not served twice."""
    ev = evaluator(setup, "counterfactual", positional=True)
    items = frontier(ev, True, "prefetch")[:4]
    ev.prefetch(items)
    p, c = items[0]
    served = ev.expand(p, c)
    assert ev.expand(p, c) is not served
    assert_same(ev.expand(p, c[:-1]).per_prompt, served.per_prompt[:-1])
    assert len(ev._prefetched) == len(items) - 1


@pytest.mark.parametrize(("positional", "patch_type"), [(True, "zero"), (False, "zero")])
def test_threshold_search_prefetches_levels(
    setup: dict[str, Any], positional: bool, patch_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A threshold search hands whole levels to the evaluator (``expand_many`` with several
    frontier paths) and finds the dense engine's paths in the same order with the same scores."""
    params = SearchParams(strategy="threshold", method="exact", min_contribution=0.3)

    def search() -> list[tuple[Path, float]]:
        out = find_paths(
            setup["model"],
            prompt_set(setup, "batching"),
            params,
            positional=positional,
            patch_type=patch_type,
        )
        return [(p.path, p.contribution or 0.0) for p in out]

    want = dense(search)
    sizes = record_calls(monkeypatch, ExactEvaluator, "expand_many", lambda self, items: len(items))
    got = search()
    assert max(sizes) > 1
    assert len(want) > 40
    assert [p for p, _ in got] == [p for p, _ in want]
    assert_same(
        torch.tensor([s for _, s in got], dtype=torch.float64),
        torch.tensor([s for _, s in want], dtype=torch.float64),
    )


@pytest.mark.parametrize("positional", [True, False])
def test_a_path_scores_the_same_bits_in_any_level(setup: dict[str, Any], positional: bool) -> None:
    """Chunks never mix frontier paths, so a path's batched scores do not depend on the other
    paths of its level (a search resumed mid-level stores the uninterrupted scores)."""
    ev = evaluator(setup, "counterfactual", positional)
    items = frontier(ev, positional, f"bits-{positional}")
    alone = ev.expand_many(items[:1] + items[-1:])[0].per_prompt
    crowd = ev.expand_many(items)[0].per_prompt
    assert torch.equal(alone, crowd)
