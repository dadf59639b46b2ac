"""Exhaustive enumeration (ground truth) and the recall mode of the threshold search (issue 15).

Exhaustive scores every path of the 2-layer toy model exactly; it must count what
:func:`pathdb.graph.count_paths` predicts and agree with one-at-a-time TransformerLens-hooks scoring.
Recall mode must find >= 99% of the complete paths above the threshold (and >= 99.9% of their
|score| mass), where the plain threshold search can lose a quarter of them to cancellation.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from pathdb.graph import ModelShape, Node, NodeKind, Site, count_paths, predecessors
from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts
from search import SearchRequest, resume_search, run_loaded
from search.api import find_paths
from search.lookahead import StartLookahead
from search.scorer import build_scorer
from search.sinks import EvaluatedPath
from search.strategies import SearchParams
from tests import reference_hooks as ref
from tests.interrupts import interrupt_on_checkpoint
from tests.test_resume import EVERY_STEP, _paths


@pytest.fixture(scope="module")
def toy() -> tuple[Any, PromptSet]:
    model = load("toy-ioi-2l")
    prompts = load_prompts("toy-ioi-small", model)
    return model, prompts


_EXHAUSTIVE: dict[tuple[Any, ...], list[EvaluatedPath]] = {}


def _exhaustive(toy: tuple[Any, PromptSet], **kw: Any) -> list[EvaluatedPath]:
    """Every path scored by the exhaustive strategy (run once per configuration and cached)."""
    key = tuple(sorted(kw.items()))
    if key not in _EXHAUSTIVE:
        model, prompts = toy
        _EXHAUSTIVE[key] = find_paths(model, prompts, SearchParams(strategy="exhaustive"), **kw)
    return _EXHAUSTIVE[key]


def _score(p: EvaluatedPath) -> float:
    """A scored path's contribution (only the root row has none)."""
    assert p.contribution is not None, p.path
    return p.contribution


def _truth(toy: tuple[Any, PromptSet], **kw: Any) -> dict[tuple[Node, ...], float]:
    """Exact scores of every complete path."""
    return {p.path: _score(p) for p in _exhaustive(toy, **kw) if p.complete}


def test_count_paths_equals_brute_force_enumeration() -> None:
    shape = ModelShape(2, 2, 3)

    def walk(n: Node, left: int) -> tuple[int, int]:
        total = complete = 0
        for p in predecessors(n, shape):
            total += 1
            if p.kind is NodeKind.EMBED:
                complete += 1
            elif left > 1:
                t, c = walk(p, left - 1)
                total, complete = total + t, complete + c
        return total, complete

    for root in (Node.final(2, None), Node.final(2, 2), Node.final(2, 1)):
        assert count_paths(root, shape) == walk(root, 99)
        assert count_paths(root, shape, max_depth=2) == walk(root, 2)
    # depth 1 from a non-positional root: every sender of the model feeds the logits, one input
    assert count_paths(Node.final(2, None), shape, max_depth=1) == (1 + 2 * (2 * 2 + 1), 1)


@pytest.mark.parametrize("positional", [True, False], ids=["positional", "position-free"])
def test_exhaustive_evaluates_exactly_the_counted_paths(
    toy: tuple[Any, PromptSet], positional: bool
) -> None:
    model, prompts = toy
    paths = _exhaustive(toy, patch_type="zero", positional=positional, metric="logit_difference")
    shape = ModelShape(model.cfg.n_layers, model.cfg.n_heads, prompts.clean_tokens.shape[1])
    root = paths[0].path[-1]
    total, complete = count_paths(root, shape)
    assert len(paths) == total + 1  # + the root row
    assert sum(p.complete for p in paths) == complete
    assert len({p.path for p in paths}) == len(paths), "a path was evaluated twice"
    assert all(p.kept for p in paths)


@pytest.mark.parametrize("patch_type", ["counterfactual", "zero"])
def test_exhaustive_equals_one_at_a_time_hooks(toy: tuple[Any, PromptSet], patch_type: str) -> None:
    model, prompts = toy
    paths = [p for p in _exhaustive(toy, positional=False, patch_type=patch_type) if p.complete]
    tokens, cf_tokens, cf_target = prompts.clean_tokens, prompts.cf_tokens, prompts.cf_target_ids
    assert cf_tokens is not None and cf_target is not None
    clean = ref.full_cache(model, tokens)
    cf = ref.full_cache(model, cf_tokens) if patch_type == "counterfactual" else None
    for p in random.Random(0).sample(paths, 6):
        want = ref.score_logit_difference(
            model, tokens, clean, cf, patch_type, p.path, prompts.target_ids, cf_target
        ).mean()
        assert p.contribution == pytest.approx(float(want.detach()), abs=1e-4), p.path


def test_exhaustive_refuses_a_search_too_large(toy: tuple[Any, PromptSet], tmp_path: Path) -> None:
    model, prompts = toy
    with pytest.raises(ValueError, match="would evaluate 20,359 paths"):
        find_paths(model, prompts, SearchParams(strategy="exhaustive", max_paths=1000))
    db = tmp_path / "s.duckdb"
    res = CliRunner().invoke(
        app, ["search", "-m", "toy-ioi", "--strategy", "exhaustive", "--db", str(db)]
    )
    assert res.exit_code == 2 and "--max-paths" in res.output and "Traceback" not in res.output
    assert not db.exists()
    res = CliRunner().invoke(app, ["search", "--recall", "--store", "kept", "--db", str(db)])
    assert res.exit_code == 2 and "--store all" in res.output
    res = CliRunner().invoke(app, ["search", "--recall", "--partial-factor", "0", "--db", str(db)])
    assert res.exit_code == 2 and "partial_factor" in res.output
    assert not db.exists()


def _recall(
    found: set[tuple[Node, ...]], truth: dict[tuple[Node, ...], float], t: float
) -> tuple[float, float]:
    want = {k for k, v in truth.items() if abs(v) >= t}
    mass = sum(abs(truth[k]) for k in want)
    return len(want & found) / len(want), sum(abs(truth[k]) for k in want & found) / mass


METRICS = ("logit_difference", "target_logit_percentage")
# both patchings and both metrics position-free; positional (20,360 paths, the slow exhaustive
# pass) under zero patching, where cancellation hides the most paths (BENCHMARKS.md, recall)
CASES = [
    *((patch, False, metric) for patch in ("counterfactual", "zero") for metric in METRICS),
    *(("zero", True, metric) for metric in METRICS),
]


def _check_recall(
    toy: tuple[Any, PromptSet], truth: dict[tuple[Node, ...], float], t: float, **kw: Any
) -> tuple[str, set[tuple[Node, ...]]]:
    """Recall mode at ``t`` meets the target against ``truth``; returns both searches' recall
    and recall mode's complete kept paths."""
    model, prompts = toy
    depth = kw.pop("max_depth", None)
    full = find_paths(
        model, prompts, SearchParams(min_contribution=t, recall=True, max_depth=depth), **kw
    )
    plain = find_paths(model, prompts, SearchParams(min_contribution=t, max_depth=depth), **kw)
    found = {p.path for p in full if p.complete and p.kept}
    count, mass = _recall(found, truth, t)
    old = _recall({p.path for p in plain if p.complete and p.kept}, truth, t)
    shown = (
        f"t={t:.4g}: recall mode finds {count:.3f} of the paths ({mass:.4f} of the |score| mass), "
        f"the plain threshold search {old[0]:.3f} ({old[1]:.4f})"
    )
    assert count >= 0.99 and mass >= 0.999, shown
    assert len({p.path for p in full}) == len(full), "a path was evaluated twice"
    for p in full:  # every stored complete score is exact, and kept complete ones pass
        if p.complete:
            assert p.contribution == pytest.approx(truth[p.path], abs=1e-4)  # float32 rounding
            assert p.kept == (abs(_score(p)) >= t)
    return shown, found


@pytest.mark.parametrize(("patch_type", "positional", "metric"), CASES)
def test_recall_mode_finds_the_exhaustive_set(
    toy: tuple[Any, PromptSet], patch_type: str, positional: bool, metric: str
) -> None:
    """Two thresholds (10th and 50th strongest complete path); the plain search's recall is
    printed beside recall mode's (``pytest -s``)."""
    kw: dict[str, Any] = {"patch_type": patch_type, "positional": positional, "metric": metric}
    truth = _truth(toy, **kw)
    ranked = np.sort(np.abs(np.fromiter(truth.values(), dtype=float)))[::-1]
    thresholds = sorted({float(ranked[k]) for k in (10, 50) if ranked[k] > 1e-6}, reverse=True)
    assert len(thresholds) == 2, "the exhaustive set has non-zero complete paths"
    for t in thresholds:
        print(patch_type, positional, metric, _check_recall(toy, truth, t, **kw)[0])


@pytest.mark.parametrize(
    ("metric", "missed"),
    [
        ("target_logit_percentage", "input@12 m0@12 a1.h3<kv>@14:12 logits@14"),
        ("logit_difference", "input@12 m0@12 a1.h2<kv>@14:12 logits@14"),
    ],
)
def test_recall_mode_sees_through_cancellation(
    toy: tuple[Any, PromptSet], metric: str, missed: str
) -> None:
    """Zero patching, positional, t at the 200th strongest complete path: a partial (here
    ``a1.h3<kv>@14:12 logits@14``, score -3e-5) whose extensions cancel hides complete paths far
    above ``t``. Its own score and its ``input`` start pass nothing; the sign-split mass of its
    extensions does, so it is expanded. Depths <= 3 keep the exhaustive truth small."""
    kw: dict[str, Any] = {"patch_type": "zero", "positional": True, "metric": metric}
    full = _truth(toy, **kw)
    t = float(np.sort(np.abs(np.fromiter(full.values(), dtype=float)))[::-1][200])
    truth = {p: s for p, s in full.items() if len(p) <= 4}  # depth <= 3
    path = next(p for p in truth if " ".join(n.label for n in p) == missed)
    assert abs(truth[path]) >= t, "the hidden path is above the threshold"
    shown, found = _check_recall(toy, truth, t, **kw, max_depth=3)
    assert path in found, shown
    print(metric, shown)


@pytest.mark.parametrize("patch_type", ["counterfactual", "zero"])
@pytest.mark.parametrize("metric", METRICS)
def test_start_bounds_cover_exact_scores(
    toy: tuple[Any, PromptSet], patch_type: str, metric: str
) -> None:
    """The look-ahead's Cauchy-Schwarz bounds on ``input`` starts (no model evaluation) against
    their exhaustive exact scores below every depth-1 partial of the position-free graph: the exact
    scoring reuses the bounds' node steps and agrees with exhaustive; the bound covers the
    first-order response exactly, so ``|exact|`` exceeds it only by the tail's higher-order terms,
    which must stay within the slack ``1 / partial_factor`` that recall mode gives them wherever
    it matters: on every start above the lowest test threshold (the 50th strongest complete path)."""
    model, prompts = toy
    kw: dict[str, Any] = {"patch_type": patch_type, "positional": False, "metric": metric}
    truth = {p.path: _score(p) for p in _exhaustive(toy, **kw)[1:]}
    t = float(np.sort([abs(v) for p, v in truth.items() if p[0].kind is NodeKind.EMBED])[::-1][50])
    scorer = build_scorer(model, prompts, metric=metric, patch_type=patch_type, positional=False)
    root = _exhaustive(toy, **kw)[0].path
    tails = [root, *(p for p in truth if len(p) == 2 and p[0].kind is not NodeKind.EMBED)]
    worst, n = 0.0, 0
    for tail in tails:
        nodes = [c for c in predecessors(tail[0], scorer.shape) if c.kind is not NodeKind.EMBED]
        starts = [
            [s for s in predecessors(c, scorer.shape) if s.kind is NodeKind.EMBED] for c in nodes
        ]
        ahead = StartLookahead(scorer, tail, nodes, starts)
        bounds = ahead.bounds()
        assert bounds is not None
        exact = ahead.scores([np.arange(len(s)) for s in starts])
        for node, s, b, e in zip(nodes, starts, bounds, exact, strict=True):
            want = np.array([truth[(x, node, *tail)] for x in s])
            np.testing.assert_allclose(e, want, atol=1e-4)
            above = np.abs(want) >= t
            worst = max(worst, float(np.max(np.abs(want[above]) / b[above], initial=0.0)))
            n += int(above.sum())
    assert n >= 10, "starts above t below these tails"
    assert worst <= 1 / SearchParams().partial_factor, f"|exact| / bound reached {worst:.2f}"


@pytest.mark.parametrize("metric", METRICS)
def test_recall_mode_costs_at_most_3x_at_the_10th_path(
    toy: tuple[Any, PromptSet], metric: str
) -> None:
    """Positional zero patching, ``t`` at the 10th strongest complete path: where the plain search
    loses the most (0.55-0.64 recall), recall mode finds every path at <= 3x its exact evaluations
    (the look-ahead pays exact scores only for ``input`` starts whose bound reaches the slack)."""
    model, prompts = toy
    kw: dict[str, Any] = {"patch_type": "zero", "positional": True, "metric": metric}
    truth = _truth(toy, **kw)
    t = float(np.sort(np.abs(np.fromiter(truth.values(), dtype=float)))[::-1][10])
    plain = find_paths(model, prompts, SearchParams(min_contribution=t), **kw)
    full = find_paths(model, prompts, SearchParams(min_contribution=t, recall=True), **kw)
    count, mass = _recall({p.path for p in full if p.complete and p.kept}, truth, t)
    assert count == 1.0 and mass == 1.0
    assert len(full) <= 3 * len(plain), f"{len(full)} exact evaluations vs {len(plain)}"


def test_recall_mode_is_a_superset_and_counts_pruned(toy: tuple[Any, PromptSet]) -> None:
    model, prompts = toy
    params = SearchParams(min_contribution=0.1)
    plain = find_paths(model, prompts, params)
    full = find_paths(model, prompts, SearchParams(min_contribution=0.1, recall=True))
    plain_set = {p.path for p in plain if p.complete and p.kept}
    full_set = {p.path for p in full if p.complete and p.kept}
    assert plain_set <= full_set
    by_path = {p.path: p for p in full}
    for p in full:  # the tree stays whole: every kept path's parent is kept (or is the root)
        if p.kept and len(p.path) > 2:
            assert by_path[p.path[1:]].kept, p.path


def test_split_kv_counts() -> None:
    shape = ModelShape(2, 4, 15)
    root = Node.final(2, 14)
    assert count_paths(root, shape) == (20359, 10180)  # the 2-layer toy's positional graph
    assert count_paths(root, shape, kv_sites=(Site.K, Site.V))[1] > 10180


def test_runs_show_pruning_counters(toy: tuple[Any, PromptSet], tmp_path: Path) -> None:
    model, prompts = toy
    db = tmp_path / "s.duckdb"
    runner = CliRunner()
    args = ["search", "-m", "toy-ioi-2l", "-q", "-t", "0.1", "--db", str(db)]
    assert runner.invoke(app, [*args, "-n", "plain"]).exit_code == 0
    assert runner.invoke(app, [*args, "-n", "kept", "--store", "kept"]).exit_code == 0
    res = runner.invoke(
        app, ["sql", "SELECT name, n_pruned, pruned_mass FROM v_runs", "-o", "-", "--db", str(db)]
    )
    rows = {
        line.split(",")[0]: line.split(",")[1:]
        for line in res.output.splitlines()[1:]
        if "," in line
    }
    in_memory = find_paths(model, prompts, SearchParams(min_contribution=0.1))
    pruned = [p for p in in_memory if not p.complete and not p.kept]
    assert int(rows["plain"][0]) == len(pruned)
    assert float(rows["plain"][1]) == pytest.approx(sum(abs(_score(p)) for p in pruned), rel=1e-6)
    assert rows["kept"] == ["", ""], "a --store kept run has no pruned rows to count: NULL"
    res = runner.invoke(app, ["runs", "--db", str(db)])
    assert res.exit_code == 0 and "n_pruned" in res.output


@pytest.mark.parametrize("stop_at", [8])
def test_recall_mode_resumes_to_the_uninterrupted_result(
    toy: tuple[Any, PromptSet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int
) -> None:
    """Partials kept by the look-ahead wait on the frontier with their ``input`` starts already
    scored; a resumed run must neither score those again nor lose them (real DuckDB store)."""
    model, prompts = toy
    t = 0.1
    params = SearchParams(min_contribution=t, recall=True, checkpoint_every=EVERY_STEP)
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts="toy-ioi-small",
        params=params,
        patch_type="zero",
        positional=False,
    )
    db = tmp_path / "s.duckdb"
    full = run_loaded(req, model, prompts, db, run_name="full", quiet=True)
    stored = _paths(db, "full")
    rescued = [
        k
        for k, (s, kept, _, complete) in stored.items()
        if kept and not complete and s is not None and abs(s) < t
    ]
    assert rescued, "the look-ahead kept partials below the threshold"
    interrupt_on_checkpoint(monkeypatch, stop_at)
    with pytest.raises(KeyboardInterrupt):
        run_loaded(req, model, prompts, db, run_name="r", quiet=True)
    monkeypatch.undo()
    assert 0 < len(_paths(db, "r")) < len(stored)
    res = resume_search("r", db, quiet=True)
    assert res.status == "completed" and res.n_evaluated == full.n_evaluated
    assert _paths(db, "r") == stored
