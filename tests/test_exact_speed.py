"""Exact engine speed work of issue 22: the plain MLP without TransformerLens' module call, and
candidate lists planned once per first node for a whole level. Both must leave every score as it
was: checked against TransformerLens hooks (:mod:`tests.reference_hooks`) and the dense engine on
random paths, every node kind, all patch types, positional and not, 1e-6."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from pathdb.arch.compute import Arch
from pathdb.graph import Node, NodeKind, Site, predecessors
from search import exact
from search.exact import ExactEvaluator
from search.node_functions import Msg, step
from tests import reference_hooks as ref
from tests.arch_models import family_model
from tests.engine_helpers import random_path
from tests.sparse_fixtures import T, assert_same, dense, evaluator, record_calls, sparse_setup

pytestmark = pytest.mark.usefixtures("one_thread")

Path = tuple[Node, ...]
PATCH_TYPES = ("zero", "counterfactual", "mean")


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    return sparse_setup()


def count_hook_calls(model: Any) -> list[str]:
    """From now on, record the name of every MLP hook point the model's MLPs call."""
    seen: list[str] = []
    for block in model.blocks:
        for hook in (block.mlp.hook_pre, block.mlp.hook_post):
            hook.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(mod.name))
    return seen


def test_plain_mlp_skips_the_module_and_keeps_its_bits(setup: dict[str, Any]) -> None:
    """``Arch.mlp`` on a plain GPT-2 MLP gives TransformerLens' ``MLP(LN2(x))`` bit for bit without
    calling the module (no hook points run), on float32 and float64 inputs of any leading shape."""
    model = setup["model"]
    arch = Arch(model)
    seen = count_hook_calls(model)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.float32):
        m = model.to(dtype)
        for shape in ((5, 3, 2), (1, 3, 1), (4, 3, T)):
            x = torch.randn(*shape, m.cfg.d_model, generator=g, dtype=torch.float64).to(dtype)
            for layer in range(m.cfg.n_layers):
                got = arch.mlp(layer, x)
                seen.clear()
                want = m.blocks[layer].mlp(arch.ln2(layer, x))
                assert seen  # the module path runs its hooks ...
                seen.clear()
                assert torch.equal(arch.mlp(layer, x), want)
                assert torch.equal(got, want)
                assert not seen  # ... the engine's does not
    model.to(torch.float64)


def test_gated_mlp_still_runs_the_module() -> None:
    """A gated (SwiGLU) MLP is not a plain one: ``Arch.mlp`` is the module's own forward."""
    model = family_model("llama3")
    arch = Arch(model)
    assert arch.plain_mlp(0) is None
    x = torch.randn(2, 3, model.cfg.d_model, dtype=torch.float64)
    assert torch.equal(arch.mlp(1, x), model.blocks[1].mlp(arch.ln2(1, x)))


@pytest.mark.parametrize("positional", [True, False])
def test_mlp_steps_match_hooks_reference(setup: dict[str, Any], positional: bool) -> None:
    """Every MLP node's step on random messages equals TransformerLens' own MLP run with its input
    overwritten by hooks (positional nodes on their row, position-free ones on every row)."""
    s = setup
    cache = evaluator(s, "counterfactual", positional).cache
    clean = ref.full_cache(s["model"], s["tokens"])
    g = torch.Generator().manual_seed(7)
    B, D = s["tokens"].shape[0], s["model"].cfg.d_model
    for layer in range(s["model"].cfg.n_layers):
        node = Node.mlp(layer, T - 2 if positional else None)
        rows = (T - 2,) if positional else tuple(range(T))
        m = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        m[:, [r for r in range(T) if r not in rows]] = 0
        with torch.no_grad():
            got = step(node, Msg(m[None][:, :, list(rows)], rows), cache).dense(T)[0]
        want = ref.step(s["model"], s["tokens"], clean, node, m)
        assert_same(got, want.detach())


def frontier(ev: ExactEvaluator, positional: bool, seed: str) -> list[tuple[Path, list[Node]]]:
    """A level of random frontier paths (every node kind, kv nodes with and without a source)
    in which several paths share their first node, each with its full candidate list."""
    rng = random.Random(seed)
    shape = ev.cache.shape
    paths: list[Path] = []
    while len(paths) < 8:
        path = random_path(shape, rng.randint(1, 3), rng, positional=positional)
        if path[0].kind is not NodeKind.EMBED:
            paths.append(path)
    root = paths[0][-1]
    p = root.position
    twins = [Node.attn(2, h, Site.Q, p) for h in range(shape.n_heads)] + [Node.mlp(2, p)]
    for first in (Node.mlp(1, p), Node.attn(1, 0, Site.KV, p, None)):
        paths += [(first, t, root) for t in twins]  # same first node, different rest
        paths.append((first, root))
    sites = (Site.K, Site.V)
    return [(q, predecessors(q[0], shape, heads=rng.random() < 0.7, kv_sites=sites)) for q in paths]


@pytest.mark.parametrize("patch_type", PATCH_TYPES)
@pytest.mark.parametrize("positional", [True, False])
def test_level_plans_each_first_node_once(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, patch_type: str, positional: bool
) -> None:
    """One ``expand_many`` level plans each (first node, rows read there, candidate list) once,
    however many frontier paths start there, and scores as the dense engine path by path; a
    second level on the same evaluator reuses the plans and gives the same bits."""
    ev = evaluator(setup, patch_type, positional)
    items = frontier(ev, positional, f"plan-{patch_type}-{positional}")
    kinds = {n.kind for p, cands in items for n in (*p, *cands)}
    assert {NodeKind.EMBED, NodeKind.ATTN, NodeKind.MLP} <= kinds
    want = dense(lambda: [ev.expand(p, c).per_prompt for p, c in items])
    calls = record_calls(monkeypatch, exact, "plan_extension", lambda cache, receiver, c: receiver)
    got = ev.expand_many(items)
    distinct = {(p[0], ev._needs(p)[0][0], tuple(c)) for p, c in items}
    assert len(calls) == len(distinct) < len(items)
    for (p, c), s, w in zip(items, got, want, strict=True):
        assert list(s.paths) == [(x, *p) for x in c]
        assert_same(s.per_prompt, w)
    calls.clear()
    again = ev.expand_many(items)
    assert not calls
    for a, b in zip(got, again, strict=True):
        assert torch.equal(a.per_prompt, b.per_prompt)


@pytest.mark.parametrize("patch_type", PATCH_TYPES)
@pytest.mark.parametrize("positional", [True, False])
def test_level_scores_match_hooks_reference(
    setup: dict[str, Any], patch_type: str, positional: bool
) -> None:
    """Independent check of a whole level: sampled candidates of frontier paths sharing their
    first node against TransformerLens hooks, path by path, 1e-6."""
    s = setup
    ev = evaluator(s, patch_type, positional)
    items = frontier(ev, positional, f"ref-{patch_type}-{positional}")[-6:]
    got = ev.expand_many(items)
    clean = ref.full_cache(s["model"], s["tokens"])
    cfc = ref.full_cache(s["model"], s["cf"])
    rng = random.Random(f"{patch_type}{positional}")
    for (p, cands), scores in zip(items, got, strict=True):
        for i in rng.sample(range(len(cands)), 2):
            want = ref.score_logit_difference(
                s["model"], s["tokens"], clean, cfc, patch_type, (cands[i], *p),
                s["target"], s["cf_target"],
            )  # fmt: skip
            assert_same(scores.per_prompt[i], want.detach())


def test_invalid_candidates_are_still_refused(setup: dict[str, Any]) -> None:
    """A candidate list that does not feed the first node is refused on every call, planned
    before or not (only valid lists are kept)."""
    ev = evaluator(setup, "counterfactual", positional=True)
    path = (Node.mlp(1, T - 1), Node.final(3, T - 1))
    bad = [Node.mlp(2, T - 1)]  # a later layer cannot feed mlp1
    for _ in range(2):
        with pytest.raises(Exception, match="does not feed"):
            ev.expand(path, bad)
    good = predecessors(path[0], ev.cache.shape)
    ev.expand(path, good)
    with pytest.raises(Exception, match="does not feed"):
        ev.expand(path, [*good, *bad])
