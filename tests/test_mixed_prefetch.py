"""Level prefetch of exact input starts on mixed-length prompt sets (issue 10, positional speed).

The attribution and hybrid methods score a frontier path's ``input`` starts exactly; a threshold
search hands a whole level of them to the scorer at once (``prefetch_exact``). The grouped scorers
(:class:`RoleAlignedScorer` per length group and role layout, :class:`LengthGroupedScorer` per
length) pass each batch its part of the level, so each batch scores it in one shared pass. These
tests check that a prefetched input start has exactly the bits of the unprefetched call, whatever
else is in its level, and that whole searches store identical rows with and without the prefetch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pathdb.graph import Node, NodeKind, Path, Site, predecessors
from pathdb.models import load
from pathdb.prompts import load_prompts
from search.api import find_paths
from search.exact import ExactEvaluator
from search.scorer import (
    AnyScorer,
    LengthGroupedScorer,
    PromptScorer,
    RoleAlignedScorer,
    build_scorer,
)
from search.strategies import SearchParams

pytestmark = pytest.mark.usefixtures("one_thread")

SCORERS = (PromptScorer, LengthGroupedScorer, RoleAlignedScorer)


@pytest.fixture(scope="module")
def sets() -> dict[str, Any]:
    """toy-ioi-2l with one prompt of every role layout of toy-ioi-large (12 layouts, lengths
    15-18), and the whole 16-token group of that set (equal length, several layouts)."""
    model = load("toy-ioi-2l")
    every = load_prompts("toy-ioi-large", model, require_equal_length=False)
    one_each = [ix[0] for ix, _ in every.position_axis().groups()]
    equal = next(g for ix, g in every.by_length() if int(every.lengths[ix[0]]) == 16)
    return {"model": model, "mixed": every.select(one_each), "equal": equal}


class Spy:
    """Counts what reaches the exact evaluators: prefetched levels (their sizes) and
    ``expand`` calls the prefetch did not serve (each computed alone)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.levels: list[int] = []
        self.unserved = 0
        prefetch, expand_many = ExactEvaluator.prefetch, ExactEvaluator.expand_many

        def spy_prefetch(ev: ExactEvaluator, items: Any) -> None:
            if items:
                self.levels.append(len(items))
            prefetch(ev, items)

        def spy_expand_many(ev: ExactEvaluator, items: Any, *, batched: bool = True) -> Any:
            self.unserved += not batched
            return expand_many(ev, items, batched=batched)

        monkeypatch.setattr(ExactEvaluator, "prefetch", spy_prefetch)
        monkeypatch.setattr(ExactEvaluator, "expand_many", spy_expand_many)


def no_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take ``prefetch_exact`` off every scorer (the strategies then score path by path)."""
    for cls in SCORERS:
        monkeypatch.delattr(cls, "prefetch_exact")


def frontier(scorer: AnyScorer) -> list[Path]:
    """Frontier paths through positions the role layouts place alike (END) and differently (IO,
    S1), over every node kind (the axis positions of a role-aligned scorer, else token indices)."""
    root = scorer.root
    end = root.position
    names = getattr(scorer, "position_names", None)
    io, s1 = (names.index("IO"), names.index("S1")) if names else (5, 3)
    if end is None:
        io = s1 = None
    head = Node.attn(1, 0, Site.Q, end)
    kv_io = Node.attn(1, 1, Site.KV, end, io)
    mlp_io, mlp_s1 = Node.mlp(0, io), Node.mlp(0, s1)
    return [
        (root,),
        (head, root),
        (kv_io, root),
        (mlp_io, kv_io, root),
        (Node.attn(0, 1, Site.KV, io, s1), kv_io, root),
        (mlp_s1, Node.attn(1, 0, Site.KV, end, s1), root),
    ]


def levels(scorer: AnyScorer, *, inputs_only: bool) -> list[tuple[Path, list[Node]]]:
    """Each frontier path with its candidates (only its ``input`` starts: what the attribution
    method scores exactly)."""
    out = []
    for p in frontier(scorer):
        cands = predecessors(p[0], scorer.shape)
        out.append((p, [c for c in cands if c.kind is NodeKind.EMBED] if inputs_only else cands))
    return out


@pytest.mark.parametrize(
    ("which", "positional", "kind"),
    [
        ("mixed", True, RoleAlignedScorer),
        ("mixed", False, LengthGroupedScorer),
        ("equal", True, PromptScorer),
    ],
)
@pytest.mark.parametrize("inputs_only", [True, False])
def test_prefetched_scores_have_the_unprefetched_bits(
    sets: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    which: str,
    positional: bool,
    kind: type,
    inputs_only: bool,
) -> None:
    """Every ``expand_exact`` of a prefetched level is served by the prefetch, and a path scores
    the same bits whether its level is prefetched whole or it is prefetched alone. Its ``input``
    starts (one candidate per batch: what the attribution method scores exactly) have exactly
    the bits of the call without a prefetch; a whole candidate list agrees with it up to float
    rounding (the exact engine chunks a level pass node by node, a single call path by path)."""
    model, prompts = sets["model"], sets[which]
    make = lambda: build_scorer(model, prompts, positional=positional)  # noqa: E731
    plain, spy = make(), Spy(monkeypatch)
    assert isinstance(plain, kind)
    items = levels(plain, inputs_only=inputs_only)
    want = [plain.expand_exact(p, c) for p, c in items]
    assert spy.unserved > 0
    got: list[list[np.ndarray]] = []
    for level in (items, items[-2:-1]):  # the whole level, and one path in a level of its own
        scorer, spy.unserved = make(), 0
        scorer.prefetch_exact(level)
        got.append([scorer.expand_exact(p, c) for p, c in level])
        assert spy.unserved == 0, "every expand_exact of the level is served by the prefetch"
    assert np.array_equal(got[1][0], got[0][-2])
    for g, w in zip(got[0], want, strict=True):
        if inputs_only:
            assert g.dtype == w.dtype and np.array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("which", "positional", "method", "patch_type"),
    [
        ("mixed", True, "attribution", "counterfactual"),
        ("mixed", True, "attribution", "mean"),
        ("mixed", True, "hybrid", "zero"),
        ("mixed", False, "attribution", "counterfactual"),
        ("equal", True, "attribution", "counterfactual"),
    ],
)
def test_search_rows_are_unchanged_by_the_prefetch(
    sets: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    which: str,
    positional: bool,
    method: str,
    patch_type: str,
) -> None:
    """A threshold search with the level prefetch stores exactly the rows (paths, score bits,
    methods, kept flags) of the same search scoring path by path, and scores its ``input``
    starts in levels (no exact call left to score alone)."""
    params = SearchParams(method=method, min_contribution=0.1)  # type: ignore[arg-type]

    def search() -> list[tuple[Path, bytes, str, bool, bool]]:
        out = find_paths(
            sets["model"], sets[which], params, positional=positional, patch_type=patch_type
        )
        return [
            (p.path, np.float64(p.contribution or 0.0).tobytes(), p.method, p.kept, p.complete)
            for p in out
        ]

    spy = Spy(monkeypatch)
    got = search()
    assert max(spy.levels) > 1
    if method == "attribution":  # hybrid's confirmations are exact calls of their own
        assert spy.unserved == 0
    no_prefetch(monkeypatch)
    spy.levels.clear()
    want = search()
    assert not spy.levels
    assert sum(m == "exact" for _, _, m, _, _ in want) > 10
    assert len(want) > 200
    assert got == want
