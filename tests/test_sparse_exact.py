"""Row-sparse messages and shared first steps (issue 22) give the dense engine's exact scores."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch

from pathdb.graph import Node, NodeKind, Site, predecessors
from search.api import find_paths
from search.exact import ExactEvaluator
from search.sparse_rows import row_sets, split_by_rows
from search.strategies import SearchParams
from tests import reference_hooks as ref
from tests.engine_helpers import random_path
from tests.sparse_fixtures import (
    T,
    assert_same,
    dense,
    evaluator,
    prompt_set,
    record_mlp_steps,
    sparse_setup,
)


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    return sparse_setup()


def fixed_path(positional: bool) -> tuple[Node, ...]:
    """EMBED -> MLP -> kv head -> whole-layer q -> FINAL (at the last row, or non-positional)."""
    p, k = (T - 1, 4) if positional else (None, None)
    q = Node.attn(2, None, Site.Q, p)
    return (Node.embed(k), Node.mlp(0, k), Node.attn(1, 1, Site.KV, p, k), q, Node.final(3, p))


def scored(ev: ExactEvaluator, paths: list[tuple[Node, ...]]) -> torch.Tensor:
    return ev.score_paths(paths).per_prompt


def expanded(ev: ExactEvaluator, tail: tuple[Node, ...], cands: list[Node]) -> torch.Tensor:
    return ev.expand(tail, cands).per_prompt


def dense_and_sparse(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn()`` with the dense engine forced, then with the row-sparse / shared-step engine."""
    return dense(fn), fn()


@pytest.mark.parametrize("patch_type", ["zero", "counterfactual", "mean"])
@pytest.mark.parametrize("positional", [True, False])
def test_random_paths_and_full_candidate_lists(
    setup: dict[str, Any], patch_type: str, positional: bool
) -> None:
    """Random paths (every node kind, kv pre-screen nodes, whole-layer heads) and every candidate
    of random frontier paths, in chunks of one and in default chunks: sparse == dense."""
    rng = random.Random(f"{patch_type}-{positional}")
    ev = evaluator(setup, patch_type, positional)
    tiny = evaluator(setup, patch_type, positional, memory_budget=1)  # chunks of one candidate
    shape = ev.cache.shape
    paths = [fixed_path(positional)]
    paths += [random_path(shape, rng.randint(1, 4), rng, positional=positional) for _ in range(11)]
    for e, some in ((ev, paths), (tiny, paths[:4])):
        dense, sparse = dense_and_sparse(partial(scored, e, some))
        assert_same(sparse, dense)
    kinds = {n.kind for p in paths for n in p}
    assert {NodeKind.EMBED, NodeKind.ATTN, NodeKind.MLP} <= kinds
    for path in paths[:4]:
        tail = path[1:]
        if len(tail) < 2:
            continue
        cands = predecessors(tail[0], shape, heads=rng.random() < 0.5, kv_sites=(Site.K, Site.V))
        dense, sparse = dense_and_sparse(partial(expanded, ev, tail, cands))
        assert_same(sparse, dense)


def test_sparse_scores_match_hooks_reference(setup: dict[str, Any]) -> None:
    """Independent check on row-sparse prompts: TransformerLens hooks, path by path."""
    s = setup
    ev = evaluator(s, "counterfactual", positional=False)
    clean, cfc = ref.full_cache(s["model"], s["tokens"]), ref.full_cache(s["model"], s["cf"])
    rng = random.Random(11)
    for _ in range(2):
        path = random_path(ev.cache.shape, 3, rng, positional=False)
        got = ev.score_paths([path]).per_prompt[0]
        want = ref.score_logit_difference(
            s["model"], s["tokens"], clean, cfc, "counterfactual", path, s["target"], s["cf_target"]
        )
        assert_same(got, want.detach())


def test_rows_are_skipped(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Counterfactual changes at positions 3..5 only: the sparse engine pushes rows 3.. of an
    embedding message through a non-positional MLP (read by a kv-side head over every source),
    the dense engine all T rows."""
    ev = evaluator(setup, "counterfactual", positional=False)
    ids, sets = row_sets(ev.cache)
    support = sets[ids]
    embed = Node.embed(None)
    assert support[0].tolist() == [r in (3, 4, 5) for r in range(T)]  # bank row 0: the embedding
    assert all(support[i, :3].sum() == 0 for i in range(len(support)))  # nothing before the change
    seen = record_mlp_steps(monkeypatch)
    path = (Node.mlp(0, None), Node.attn(1, 0, Site.KV, None, None), Node.final(3, None))
    dense, sparse = dense_and_sparse(lambda: ev.expand(path, [embed]).per_prompt)
    assert [len(m.pos) for m in seen] == [T, 3]
    assert_same(sparse, dense)


def test_split_by_rows_groups() -> None:
    """Equal row sets share a group; too many sets fall back to wider, fewer groups."""
    sets = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=bool)
    parts = {pos: idx.tolist() for idx, pos in split_by_rows(np.array([0, 0, 1, 2, 0]), sets)}
    assert parts == {(1, 2): [0, 1, 4], (0, 1, 2): [2], (2,): [3]}
    assert split_by_rows(np.array([2, 2]), sets)[0][1] == (2,)
    many = np.eye(8, dtype=bool)  # 8 distinct sets, 8 distinct first rows: one union group
    [(idx, pos)] = split_by_rows(np.arange(8), many)
    assert idx.tolist() == list(range(8)) and pos == tuple(range(8))
    coarse = np.array(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0]], dtype=bool
    )
    parts = {pos: idx.tolist() for idx, pos in split_by_rows(np.arange(5), coarse)}
    assert parts == {(0, 1, 2, 3): [0, 1, 2, 3], (1,): [4]}  # 5 sets > 4: grouped by first row


def test_shared_first_step_is_reused(setup: dict[str, Any]) -> None:
    """Two frontier paths with the same first node: the second reuses the cached first step and
    both score as the dense engine does; a memory budget too small for an entry keeps nothing."""
    ev = evaluator(setup, "counterfactual", positional=False)
    first = Node.mlp(1, None)
    a = (first, Node.attn(2, 0, Site.Q, None), Node.final(3, None))
    b = (first, Node.mlp(2, None), Node.final(3, None))
    cands = predecessors(first, ev.cache.shape)
    dense_a, sparse_a = dense_and_sparse(lambda: ev.expand(a, cands).per_prompt)
    assert ev.steps.hits == 0 and ev.steps.used > 0
    dense_b, sparse_b = dense_and_sparse(lambda: ev.expand(b, cands).per_prompt)
    assert ev.steps.hits >= 1  # once per row-set group of the candidates
    assert_same(sparse_a, dense_a)
    assert_same(sparse_b, dense_b)
    small = evaluator(setup, "counterfactual", positional=False, memory_budget=1024)
    small.expand(a, cands)
    small.expand(b, cands)
    assert small.steps.hits == 0 and small.steps.used == 0


def searched(
    s: dict[str, Any], positional: bool, patch_type: str
) -> Iterator[tuple[Any, float | None]]:
    params = SearchParams(strategy="threshold", method="exact", min_contribution=0.3)
    out = find_paths(
        s["model"], prompt_set(s, "sparse"), params, positional=positional, patch_type=patch_type
    )
    return ((p.path, p.contribution) for p in out)


@pytest.mark.parametrize(
    ("positional", "patch_type"),
    [(True, "counterfactual"), (False, "counterfactual"), (False, "mean")],
)
def test_threshold_search_same_paths_and_scores(
    setup: dict[str, Any], positional: bool, patch_type: str
) -> None:
    """Whole threshold searches: the same evaluated paths in the same order, same scores."""
    ExactEvaluator.dense = True
    try:
        dense = list(searched(setup, positional, patch_type))
    finally:
        ExactEvaluator.dense = False
    sparse = list(searched(setup, positional, patch_type))
    assert len(dense) > 40
    assert [p for p, _ in sparse] == [p for p, _ in dense]
    d = torch.tensor([c or 0.0 for _, c in dense], dtype=torch.float64)
    s = torch.tensor([c or 0.0 for _, c in sparse], dtype=torch.float64)
    assert_same(s, d)
