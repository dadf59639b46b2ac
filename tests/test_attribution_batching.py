"""Faster path attribution (issue 22): gradients on the rows that reach the metric only, a child
path's gradient from its released parent's (one VJP), kept forward graphs, scoring on the rows
where message and gradient can both be non-zero, and the input starts of a level scored exactly
in one pass. Everything is checked against an independent dense computation: autograd through
the composed path over every row, and every row of every start message."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from pathdb.graph import Node, NodeKind, Site, predecessors
from search.api import find_paths
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, group_by_position
from search.node_functions import Msg, propagate, start_msg
from search.scorer import PromptScorer
from search.strategies import SearchParams
from tests.engine_helpers import random_path
from tests.sparse_fixtures import (
    T,
    assert_same,
    evaluator,
    prompt_set,
    record_calls,
    sparse_setup,
)

pytestmark = pytest.mark.usefixtures("one_thread")

Path = tuple[Node, ...]


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    return sparse_setup()


def attribution(s: dict[str, Any], patch_type: str, positional: bool) -> AttributionEvaluator:
    """An attribution evaluator (estimates only, as the searches use it) on ``s``'s prompts."""
    ev = evaluator(s, patch_type, positional)
    return AttributionEvaluator(ev.cache, ev.metric, ev.root, exact_complete=False)


def dense_gradient(att: AttributionEvaluator, path: Path) -> torch.Tensor:
    """``d score / d m`` on every row ``[B, T, D]``: autograd through the composed node functions
    of ``path`` (no row dropping) and the metric."""
    c = att.cache
    m = torch.zeros(1, c.batch, T, c.clean.final.shape[-1], dtype=torch.float64)
    m.requires_grad_(True)
    with torch.enable_grad():
        out = propagate(Msg(m, tuple(range(T))), path, c)
        score = att.metric(att.exact._clean_row - out.gather((att.exact.root_row,))[:, :, 0])
        (g,) = torch.autograd.grad(score.sum(), m)
    return g[0]


def dense_estimates(att: AttributionEvaluator, path: Path, cands: Sequence[Node]) -> torch.Tensor:
    """Per-prompt first-order estimates ``[n, B]``: clean metric + every row of each candidate's
    start message dotted with :func:`dense_gradient` (today's per-path attribution)."""
    g = dense_gradient(att, path)
    base = att.metric(att.exact._clean_row).detach()
    out = torch.empty(len(cands), att.cache.batch, dtype=torch.float64)
    for idx in group_by_position(cands).values():
        msgs = start_msg([cands[i] for i in idx], att.cache).dense(T)
        out[idx] = base + torch.einsum("nbtd,btd->nb", msgs, g)
    return out


def random_frontier(att: AttributionEvaluator, positional: bool, seed: str) -> list[Path]:
    """Random frontier paths of every node kind (kv pre-screen nodes included) and a chain of
    parent / child paths ``(c, *parent)``."""
    rng = random.Random(seed)
    shape = att.cache.shape
    p = T - 1 if positional else None
    chain: Path = (Node.final(3, p),)
    for node in (Node.attn(2, 0, Site.Q, p), Node.mlp(1, p), Node.attn(1, 1, Site.K, p, None)):
        chain = (node, *chain)
    paths = [chain[i:] for i in range(len(chain) - 1)]
    while len(paths) < 10:
        path = random_path(shape, rng.randint(1, 3), rng, positional=positional)
        if path[0].kind is not NodeKind.EMBED:
            paths.append(path)
    return paths


@pytest.mark.parametrize("patch_type", ["zero", "counterfactual", "mean"])
@pytest.mark.parametrize("positional", [True, False])
def test_estimates_equal_the_dense_per_path_attribution(
    setup: dict[str, Any], patch_type: str, positional: bool
) -> None:
    """Random frontier paths, expanded in frontier order with every parent released before its
    children (as a search does), score what the dense per-path computation scores."""
    att = attribution(setup, patch_type, positional)
    paths = random_frontier(att, positional, f"{patch_type}-{positional}")
    kinds = {n.kind for p in paths for n in p}
    assert {NodeKind.ATTN, NodeKind.MLP} <= kinds
    for path in paths:
        cands = predecessors(path[0], att.cache.shape, kv_sites=(Site.K, Site.V))
        got = att.expand(path, cands)
        assert list(got.paths) == [(c, *path) for c in cands]
        assert_same(got.per_prompt, dense_estimates(att, path, cands))
        att.release(path)


@pytest.mark.parametrize("positional", [True, False])
def test_a_child_gradient_is_one_vjp_from_its_released_parent(
    setup: dict[str, Any], positional: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its parent was expanded and released, a child path's gradient costs one VJP (not
    one per node of the path) and is the same bits as on a fresh evaluator."""
    att = attribution(setup, "counterfactual", positional)
    p = T - 1 if positional else None
    parent = (Node.mlp(1, p), Node.attn(2, 1, Site.Q, p), Node.final(3, p))
    child = (Node.attn(1, 0, Site.KV, p, None), *parent)
    att.expand(parent, predecessors(parent[0], att.cache.shape))
    att.release(parent)
    assert parent not in att._grads
    with monkeypatch.context() as mp:
        calls = record_calls(mp, AttributionEvaluator, "vjp", lambda self, node, *a: node)
        g = att.gradient(child)
    assert calls == [child[0]]
    fresh = attribution(setup, "counterfactual", positional).gradient(child)
    assert g.pos == fresh.pos and torch.equal(g.rows, fresh.rows)
    assert_same(g.rows[0], dense_gradient(att, child)[:, list(g.pos)])


def test_gradients_carry_only_rows_that_reach_the_metric(setup: dict[str, Any]) -> None:
    """A non-positional ``(mlp, a<q>, FINAL)`` gradient lives on the root row alone (the dense
    gradient is exactly zero elsewhere), so the MLP's VJP is one row, not T."""
    att = attribution(setup, "counterfactual", positional=False)
    path = (Node.mlp(1, None), Node.attn(2, 0, Site.Q, None), Node.final(3, None))
    g = att.gradient(path)
    assert g.pos == (T - 1,) and g.rows.shape[2] == 1
    want = dense_gradient(att, path)
    assert float(want[:, : T - 1].abs().max()) == 0.0
    assert_same(g.rows[0, :, 0], want[:, T - 1])


def test_gradients_skip_rows_before_the_first_changed_token(setup: dict[str, Any]) -> None:
    """Non-positional counterfactual patching: no message of any path is non-zero before the
    first token a counterfactual changes (row 3 here; the model is causal), so gradients start
    there although the dense gradient is not zero before it; the estimates are unchanged."""
    att = attribution(setup, "counterfactual", positional=False)
    kv = Node.attn(2, 1, Site.KV, None, None)
    path = (Node.mlp(1, None), kv, Node.final(3, None))
    g = att.gradient(path)
    assert g.pos == tuple(range(3, T))
    want = dense_gradient(att, path)
    assert float(want[:, :3].abs().max()) > 0
    assert_same(g.rows[0], want[:, 3:])
    cands = predecessors(path[0], att.cache.shape)
    assert_same(att.expand(path, cands).per_prompt, dense_estimates(att, path, cands))


@pytest.mark.parametrize("positional", [True, False])
def test_a_path_scores_the_same_bits_whatever_came_before(
    setup: dict[str, Any], positional: bool
) -> None:
    """Kept graphs and retired gradients are deterministic functions of the path: a path's
    estimates on an evaluator that already expanded other paths are bit-identical to a fresh one's."""
    busy = attribution(setup, "counterfactual", positional)
    paths = random_frontier(busy, positional, f"bits-{positional}")
    for path in paths[:-1]:
        busy.expand(path, predecessors(path[0], busy.cache.shape))
        busy.release(path)
    last = paths[-1]
    cands = predecessors(last[0], busy.cache.shape)
    fresh = attribution(setup, "counterfactual", positional).expand(last, cands).per_prompt
    assert torch.equal(busy.expand(last, cands).per_prompt, fresh)


@pytest.mark.parametrize(
    ("positional", "patch_type"),
    [(True, "counterfactual"), (False, "counterfactual"), (False, "zero")],
)
def test_whole_attribution_search_matches_the_dense_per_path_search(
    setup: dict[str, Any], positional: bool, patch_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A threshold attribution search finds the paths, in the same order and with the same
    scores, as the same search run on the dense per-path estimates; its input starts are scored
    exactly a level at a time (``expand_many`` with several frontier paths)."""
    params = SearchParams(strategy="threshold", method="attribution", min_contribution=0.3)

    def search() -> list[tuple[Path, float, str]]:
        out = find_paths(
            setup["model"],
            prompt_set(setup, "attribution-batching"),
            params,
            positional=positional,
            patch_type=patch_type,
        )
        return [(p.path, p.contribution or 0.0, p.method) for p in out]

    with monkeypatch.context() as mp:
        sizes = record_calls(mp, ExactEvaluator, "expand_many", lambda self, items: len(items))
        got = search()
    assert max(sizes) > 1

    def reference(self: PromptScorer, path: Path, cands: Sequence[Node]) -> Any:
        return dense_estimates(self.attribution, path, cands).mean(1).numpy()

    with monkeypatch.context() as mp:
        mp.setattr(PromptScorer, "expand_attribution", reference)
        mp.setattr(PromptScorer, "prefetch_exact", lambda self, items: None)
        want = search()
    assert len(want) > 30 and {"exact", "attribution"} <= {m for _, _, m in want}
    assert [(p, m) for p, _, m in got] == [(p, m) for p, _, m in want]
    assert_same(
        torch.tensor([s for _, s, _ in got], dtype=torch.float64),
        torch.tensor([s for _, s, _ in want], dtype=torch.float64),
    )
