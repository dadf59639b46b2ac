"""Each search strategy finds exactly what a plain one-candidate-at-a-time reference search finds.

The references below are written the obvious way (a Python loop per candidate, scoring each path
alone with ``score_paths``), following the IPE definitions; the strategies under test score whole
candidate batches and add pre-screens. Models are float64 so batched and single scores agree to
~1e-12 and no threshold decision can flip on rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pathdb.graph import Node, NodeKind, Path, Site, predecessors
from search.scorer import PromptScorer, build_scorer
from search.sinks import MemorySink
from search.strategies import SearchParams, SearchRun
from tests.search_fixtures import random_prompt_set


@pytest.fixture(scope="module")
def scorer() -> PromptScorer:
    torch.manual_seed(3)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=24, n_heads=2, d_head=12, d_mlp=48, n_ctx=8, d_vocab=17,
        act_fn="gelu", normalization_type="LN", dtype=torch.float64, seed=3,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()
    return build_scorer(model, random_prompt_set(17, 3, 4, seed=5), metric="logit_difference")


def _passes(s: float, thr: float, neg: bool) -> bool:
    return abs(s) >= thr if neg else s >= thr


def _exact(sc: PromptScorer, path: Path) -> float:
    return float(sc.exact.score_paths([path]).mean[0])


def _attr(sc: PromptScorer, path: Path) -> float:
    return float(sc.expand_attribution(path[1:], [path[0]])[0])


def _heads(n: Node, sc: PromptScorer) -> list[Node]:
    return [
        Node.attn(n.layer, h, n.site or Site.Q, n.position, n.kv_position)
        for h in range(sc.shape.n_heads)
    ]


def _sources(n: Node) -> list[Node]:
    assert n.position is not None
    return [
        Node.attn(n.layer, n.head, n.site or Site.KV, n.position, k) for k in range(n.position + 1)
    ]


def _collapse_kv(cands: list[Node]) -> list[Node]:
    out: list[Node] = []
    for c in cands:
        if c.kind is NodeKind.ATTN and c.is_kv:
            c = Node.attn(c.layer, c.head, c.site or Site.KV, c.position, None)
        if c not in out:
            out.append(c)
    return out


def reference_threshold(
    sc: PromptScorer,
    thr: float,
    neg: bool,
    *,
    method: str = "exact",
    batch_heads: bool = False,
    batch_positions: bool = False,
) -> dict[Path, tuple[float, bool]]:
    """Every evaluated path -> (score, kept), one candidate at a time."""
    seen: dict[Path, tuple[float, bool]] = {}
    frontier: list[Path] = [(sc.root,)]
    while frontier:
        nxt: list[Path] = []
        for path in frontier:
            cands = predecessors(path[0], sc.shape, heads=not batch_heads)
            if batch_positions:
                cands = _collapse_kv(cands)
            todo = list(cands)
            while todo:
                c = todo.pop(0)
                p = (c, *path)
                if c.kind is NodeKind.EMBED or method == "exact":
                    s = _exact(sc, p)
                else:
                    s = _attr(sc, p)
                    if method == "hybrid" and _passes(s, thr, neg):
                        s = _exact(sc, p)
                ok = _passes(s, thr, neg)
                seen[p] = (s, ok)
                if not ok or c.kind is NodeKind.EMBED:
                    continue
                if batch_heads and c.kind is NodeKind.ATTN and c.head is None:
                    todo.extend(_heads(c, sc))
                elif (
                    batch_positions
                    and c.kind is NodeKind.ATTN
                    and c.is_kv
                    and c.kv_position is None
                ):
                    todo.extend(_sources(c))
                else:
                    nxt.append(p)
        frontier = nxt
    return seen


def _run(sc: PromptScorer, **kw: object) -> MemorySink:
    sink = MemorySink()
    SearchRun(sc, sink, SearchParams(**kw)).run([sink.root(sc.root)])  # type: ignore[arg-type]
    return sink


def _as_dict(sink: MemorySink) -> dict[Path, tuple[float, bool]]:
    out = {}
    for e in sink.paths[1:]:
        assert e.path not in out, f"path evaluated twice: {e.path}"
        assert e.contribution is not None
        out[e.path] = (e.contribution, e.kept)
    return out


def _assert_same(got: dict[Path, tuple[float, bool]], want: dict[Path, tuple[float, bool]]) -> None:
    assert set(got) == set(want)
    for p, (s, kept) in want.items():
        gs, gk = got[p]
        assert math.isclose(gs, s, rel_tol=1e-9, abs_tol=1e-12), p
        assert gk == kept, p


@pytest.mark.parametrize("neg", [True, False])
@pytest.mark.parametrize("method", ["exact", "attribution", "hybrid"])
def test_threshold_matches_reference_on_every_evaluated_path(
    scorer: PromptScorer, method: str, neg: bool
) -> None:
    thr = 0.02
    want = reference_threshold(scorer, thr, neg, method=method)
    got = _as_dict(
        _run(
            scorer, strategy="threshold", method=method, min_contribution=thr, include_negative=neg
        )
    )
    assert any(k for _, k in want.values() if k)  # the search found something
    assert any(p[0].kind is NodeKind.EMBED and k for p, (_, k) in want.items())
    _assert_same(got, want)


@pytest.mark.parametrize(("bh", "bp"), [(True, False), (False, True), (True, True)])
def test_threshold_prescreens_match_reference(scorer: PromptScorer, bh: bool, bp: bool) -> None:
    thr = 0.02
    want = reference_threshold(scorer, thr, True, batch_heads=bh, batch_positions=bp)
    got = _as_dict(_run(scorer, min_contribution=thr, batch_heads=bh, batch_positions=bp))
    _assert_same(got, want)


def _complete_kept(sink: MemorySink) -> dict[Path, float]:
    return {
        e.path: e.contribution
        for e in sink.paths
        if e.complete and e.kept and e.contribution is not None
    }


def _screen_children(n: Node, sc: PromptScorer, bh: bool, bp: bool) -> list[Node] | None:
    if bh and n.kind is NodeKind.ATTN and n.head is None:
        return _heads(n, sc)
    if bp and n.kind is NodeKind.ATTN and n.is_kv and n.kv_position is None:
        return _sources(n)
    return None


def reference_best_first(
    sc: PromptScorer, top_n: int, neg: bool, method: str, bh: bool = False, bp: bool = False
) -> dict[Path, float]:
    """A list-based priority queue: pop the best |score|, expand, one candidate at a time.

    A popped pre-screen node is replaced by its children (scored alone), as IPE does lazily."""
    queue: list[tuple[float, int, Path, float]] = [(0.0, 0, (sc.root,), 0.0)]
    tie = 1
    done: dict[Path, float] = {}
    while queue and len(done) < top_n:
        queue.sort(key=lambda t: (-t[0], t[1]))
        _, _, path, score = queue.pop(0)
        if path[0].kind is NodeKind.EMBED:
            if neg or score > 0:
                done[path] = score
            continue
        kids = _screen_children(path[0], sc, bh, bp)
        if kids is not None:
            for k in kids:
                p = (k, *path[1:])
                s = _exact(sc, p)
                queue.append((abs(s) if neg else s, tie, p, s))
                tie += 1
            continue
        cands = predecessors(path[0], sc.shape, heads=not bh)
        if bp:
            cands = _collapse_kv(cands)
        for c in cands:
            p = (c, *path)
            s = _exact(sc, p) if (method == "exact" or c.kind is NodeKind.EMBED) else _attr(sc, p)
            queue.append((abs(s) if neg else s, tie, p, s))
            tie += 1
    return done


@pytest.mark.parametrize("method", ["exact", "attribution"])
@pytest.mark.parametrize("neg", [True, False])
def test_best_first_matches_reference(scorer: PromptScorer, method: str, neg: bool) -> None:
    want = reference_best_first(scorer, 6, neg, method)
    sink = _run(scorer, strategy="best-first", method=method, top_n=6, include_negative=neg)
    got = _complete_kept(sink)
    assert len(want) == 6
    assert set(got) == set(want)
    for p, s in want.items():
        assert math.isclose(got[p], s, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize(("bh", "bp"), [(True, False), (False, True), (True, True)])
def test_best_first_prescreens_match_reference(scorer: PromptScorer, bh: bool, bp: bool) -> None:
    want = reference_best_first(scorer, 5, True, "exact", bh, bp)
    got = _complete_kept(
        _run(scorer, strategy="best-first", top_n=5, batch_heads=bh, batch_positions=bp)
    )
    assert set(got) == set(want) and len(want) == 5
    for p, s in want.items():
        assert math.isclose(got[p], s, rel_tol=1e-9, abs_tol=1e-12)


def test_best_first_bounded_queue_keeps_the_best(scorer: PromptScorer) -> None:
    """With a queue bound, the search still returns top_n results and never holds more entries."""
    sink = _run(scorer, strategy="best-first", top_n=4, max_queue=30)
    assert len(_complete_kept(sink)) == 4
    assert len(sink.frontier) <= 30


def reference_level_width(
    sc: PromptScorer, width: int, neg: bool, method: str, bh: bool = False, bp: bool = False
) -> dict[Path, float]:
    """Per depth: expand everything, keep the ``width`` best incomplete extensions; selected
    pre-screen nodes are then replaced by their children and the level is re-selected."""
    level: list[Path] = [(sc.root,)]
    done: dict[Path, float] = {}
    while level:
        cands: list[tuple[float, int, Path]] = []
        for path in level:
            preds = predecessors(path[0], sc.shape, heads=not bh)
            if bp:
                preds = _collapse_kv(preds)
            for c in preds:
                p = (c, *path)
                s = (
                    _exact(sc, p)
                    if (method == "exact" or c.kind is NodeKind.EMBED)
                    else _attr(sc, p)
                )
                if c.kind is NodeKind.EMBED:
                    if neg or s >= 0:
                        done[p] = s
                elif neg or s >= 0:
                    cands.append((abs(s) if neg else s, len(cands), p))
        cands.sort(key=lambda t: (-t[0], t[1]))
        best = cands[:width]
        if bh or bp:
            split: list[tuple[float, int, Path]] = []
            pending = [(s, p) for s, _, p in best]
            while pending:
                s, p = pending.pop()
                kids = _screen_children(p[0], sc, bh, bp)
                if kids is None:
                    split.append((s, len(split), p))
                    continue
                for k in kids:
                    q = (k, *p[1:])
                    v = _exact(sc, q)
                    if neg or v >= 0:
                        pending.append((abs(v) if neg else v, q))
            split.sort(key=lambda t: (-t[0], t[1]))
            best = split[:width]
        level = [p for _, _, p in best]
    return done


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_level_width_matches_reference(scorer: PromptScorer, method: str) -> None:
    want = reference_level_width(scorer, 5, True, method)
    sink = _run(scorer, strategy="level-width", method=method, max_width=5)
    got = _complete_kept(sink)
    assert set(got) == set(want)
    for p, s in want.items():
        assert math.isclose(got[p], s, rel_tol=1e-9, abs_tol=1e-12)
    # the kept incomplete paths are exactly the selected beam entries: at most max_width per depth
    by_depth: dict[int, int] = {}
    for e in sink.paths[1:]:
        if e.kept and not e.complete:
            by_depth[len(e.path)] = by_depth.get(len(e.path), 0) + 1
    assert by_depth and max(by_depth.values()) <= 5


@pytest.mark.parametrize(("bh", "bp"), [(True, False), (True, True)])
def test_level_width_prescreens_match_reference(scorer: PromptScorer, bh: bool, bp: bool) -> None:
    want = reference_level_width(scorer, 4, True, "exact", bh, bp)
    got = _complete_kept(
        _run(scorer, strategy="level-width", max_width=4, batch_heads=bh, batch_positions=bp)
    )
    assert set(got) == set(want)
    for p, s in want.items():
        assert math.isclose(got[p], s, rel_tol=1e-9, abs_tol=1e-12)


def test_max_depth_stops_extension(scorer: PromptScorer) -> None:
    sink = _run(scorer, min_contribution=0.02, max_depth=1)
    assert max(len(e.path) for e in sink.paths) == 2


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"strategy": "best-first", "top_n": 0}, "top_n must be > 0"),
        ({"strategy": "level-width", "max_width": 0}, "max_width"),
        ({"min_contribution": 0.0}, "min_contribution must be > 0"),
        ({"method": "attribution", "batch_heads": True}, "pre-screens of the exact method"),
        ({"strategy": "best-first", "method": "hybrid"}, "threshold strategy"),
        ({"strategy": "sideways"}, "unknown strategy"),
    ],
)
def test_invalid_parameters_are_refused(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        SearchParams(**kw).validate(positional=True)  # type: ignore[arg-type]


def test_batch_positions_needs_a_positional_root() -> None:
    with pytest.raises(ValueError, match="positional root"):
        SearchParams(batch_positions=True).validate(positional=False)
