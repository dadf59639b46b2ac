"""Role-aligned batch scoring reuses work (issue 10, positional speed): one model run per length
group also serves its role layouts' own batches, and the memoised translation plans never leak
between paths or candidate lists."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pathdb.graph import Node, NodeKind, predecessors
from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts
from search.scorer import RoleAlignedScorer, _prompt_scorer, build_scorer


@pytest.fixture(scope="module")
def mixed() -> tuple[Any, PromptSet]:
    """One prompt of each role layout of lengths 15 and 16 of toy-ioi-large (the 15-token group
    has six layouts, the 16-token group two)."""
    model = load("toy-ioi-2l")
    every = load_prompts("toy-ioi-large", model, require_equal_length=False)
    picked = [
        i for ix, layout in every.position_axis().groups() if len(layout) <= 16 for i in ix[:1]
    ]
    return model, every.select(picked)


def test_layout_batches_reuse_the_group_run(
    mixed: tuple[Any, PromptSet], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, prompts = mixed
    runs: list[int] = []
    run_with_cache = model.run_with_cache

    def counted(tokens: torch.Tensor, **kw: Any) -> Any:
        runs.append(int(tokens.shape[0]))
        return run_with_cache(tokens, **kw)

    monkeypatch.setattr(model, "run_with_cache", counted)
    scorer = build_scorer(model, prompts)
    monkeypatch.undo()
    assert isinstance(scorer, RoleAlignedScorer)
    assert [len(lays) for lays in scorer.layouts] == [6, 2]
    assert sorted(runs) == sorted(
        2 * [g.cache.batch for g in scorer.groups]
    )  # clean + counterfactual
    # each layout's own batch scores exactly as a batch built from its prompts by a model run
    layouts = [lay for lays in scorer.layouts for lay in lays]
    for ix, layout in prompts.position_axis().groups():
        lay = next(lay for lay in layouts if lay.tokens == {s: t for t, s in enumerate(layout)})
        root = lay.scorer.root
        ref = _prompt_scorer(
            model, prompts.select(ix), "logit_difference", "counterfactual", True, root.position
        )
        for path in [(root,), (Node.attn(1, 0, "q", root.position), root)]:
            cands = predecessors(path[0], lay.scorer.shape)
            np.testing.assert_array_equal(
                lay.scorer.expand_exact_per_prompt(path, cands),
                ref.expand_exact_per_prompt(path, cands),
            )


def test_memoised_plans_match_a_fresh_scorer(mixed: tuple[Any, PromptSet]) -> None:
    model, prompts = mixed
    scorer = build_scorer(model, prompts)
    assert isinstance(scorer, RoleAlignedScorer)
    end, io = scorer.root.position, scorer.position_names.index("IO")
    # frontier paths through a position the layouts place differently (IO) and alike (END)
    paths = [
        (Node.attn(1, 0, "kv", end, io), scorer.root),
        (Node.attn(1, 0, "q", end), scorer.root),
    ]
    calls = []
    for p in paths:
        cands = predecessors(p[0], scorer.shape)
        calls += [
            (p, [c for c in cands if c.kind is not NodeKind.EMBED]),
            (p, [c for c in cands if c.kind is NodeKind.EMBED]),
        ]
    fresh = []  # each call on a scorer of its own
    for path, cands in calls:
        alone = build_scorer(model, prompts)
        assert isinstance(alone, RoleAlignedScorer)
        fresh.append((alone.expand_exact(path, cands), alone.expand_attribution(path, cands)))
    # one scorer: the same path with another list, another path with the same list, repeats
    for i in [0, 1, 2, 3, 3, 2, 1, 0]:
        path, cands = calls[i]
        np.testing.assert_array_equal(scorer.expand_exact(path, cands), fresh[i][0])
        np.testing.assert_array_equal(scorer.expand_attribution(path, cands), fresh[i][1])
        scorer.release(path)
