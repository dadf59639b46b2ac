"""Faithfulness curves, CPR and CMD (MIB circuit-localization track) for a stored run.

For a circuit C, ``F(C) = (m(C) - m(empty)) / (m(full) - m(empty))`` with ``m`` the run's metric
averaged over the evaluation prompts (:class:`pathdb.evaluate.masked.MaskedEvaluator`).
Curves (one point per circuit size):

* ``signed``: the top-n edges by signed score, n = ``int(f * n_edges)`` for MIB's fractions
  :data:`MIB_FRACTIONS` (and user counts); **CPR** = area under it (trapezoid over the fractions);
* ``abs``: the top-n edges by ``|score|``; **CMD** = area between it and 1 (trapezoid of ``|1 - F|``);
* ``paths``: the union of the edges of the top-k complete kept paths (by ``|contribution|``).

Edge scores are those ``pathdb export`` writes by default (:func:`pathdb.store.effects.default_edge_rule`):
the ``refined`` rule for a run that stored its refined scores, the ``group`` rule
(:mod:`pathdb.evaluate.groups`: the edge effects rescaled by the group effects the search stored)
for one that stored only group effects, else the run's edge effects
(:func:`pathdb.query.aggregate.edges` with ``rule='effect'``: every evaluated path on its first
edge, kv paths half on ``<k>``, half on ``<v>``); the rule is recorded in the evaluation's
``score`` (``score [refined]``). ``rule`` chooses one (``group`` / ``refined`` on a run without
its stored inputs measures them with the model on its search prompts).
Edge circuits are pruned of edges not on an input -> logits chain (the query layer's
:func:`pathdb.query.aggregate.prune_edges`); every real edge the run did not score has score 0.
The top-n selection is MIB's default; :func:`greedy_edges` is MIB's ``apply_greedy`` (grown from
the logits up), which :class:`CurveBuilder` offers for comparison (``selection='greedy'``).
"Edges needed for 80% / 90%" are the fewest circuit edges among the ``abs`` points reaching it,
after a bisection (to ``scan_step`` edges) between the last MIB point below and the first at or
above each target.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Sequence

import duckdb
import numpy as np
import pandas as pd

from pathdb.evaluate.graph import EvaluationError, full_edge_table
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.evaluate.positional import PositionalEvaluator, PositionalGraph, run_edges
from pathdb.evaluate.positional import path_edge_ranks as positional_path_ranks
from pathdb.evaluate.results import (
    SCORES,
    TARGETS,
    CurvePoint,
    Evaluation,
    edges_needed,
    score_label,
    trapezoid_areas,
)
from pathdb.query.aggregate import edges as edge_table
from pathdb.query.aggregate import prune_edges, select_edges
from pathdb.query.common import RunInfo, resolve_run
from pathdb.query.expand import SITE_EXPANSION, complete_kept_selection, edge_chain_cte
from pathdb.store.effects import default_edge_rule

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: edge rules a faithfulness evaluation can judge (:func:`pathdb.query.aggregate.edges`)
EVAL_RULES = ("effect", "group", "refined")
PATH_COUNTS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)


def top_edges(table: pd.DataFrame, k: int, by: str) -> list[str]:
    """The top-``k`` edges of ``table`` by ``by`` (``signed`` | ``abs``), pruned to input -> logits chains."""
    return list(prune_edges(select_edges(table, top_k=k, threshold=None, by=by))["edge"])


def greedy_edges(table: pd.DataFrame, k: int, by: str) -> list[str]:
    """``k`` edges chosen as MIB's ``apply_greedy`` does (an alternative to top-n that MIB's
    evaluation offers): grown from the logits up, always taking the best-ranked edge (by ``by``)
    into a node already in the circuit; then pruned to input -> logits chains like top-n."""
    key = table["score"].abs() if by == "abs" else table["score"]
    into: dict[str, list[tuple[float, str]]] = {}
    for edge, dst, value in zip(table["edge"], table["dst"], key, strict=True):
        into.setdefault(str(dst), []).append((-float(value), str(edge)))
    src = dict(zip(table["edge"], table["src"], strict=True))
    heap = list(into.get("logits", []))
    heapq.heapify(heap)
    chosen: set[str] = set()
    reached = {"logits"}
    while heap and len(chosen) < k:
        _, edge = heapq.heappop(heap)
        chosen.add(edge)
        parent = str(src[edge])
        if parent not in reached:
            reached.add(parent)
            for item in into.get(parent, []):
                heapq.heappush(heap, item)
    sel = table[table["edge"].isin(chosen)]
    return list(prune_edges(sel)["edge"])


SELECTIONS = {"top-n": top_edges, "greedy": greedy_edges}


def path_edge_ranks(con: duckdb.DuckDBPyConnection, info: RunInfo) -> pd.DataFrame:
    """For every position-free edge on a complete kept path: the best rank (1 = largest
    ``|contribution|``) of a path through it; a kv-side destination gives its ``<k>`` and ``<v>`` edge."""
    sel = complete_kept_selection(str(int(info.run_id)))
    sql = f"""WITH RECURSIVE ranked AS (
  SELECT path_id, row_number() OVER (ORDER BY abs(c) DESC, path_id) AS rank FROM ({sel})),
{edge_chain_cte(f"SELECT run_id, path_id, prompt_idx, c, node_id, parent_id FROM ({sel})")}
SELECT sn.component || '->' || dn.component || coalesce('<' || sx.esite || '>', '') AS edge,
       min(r.rank) AS rank
FROM chain ch JOIN ranked r USING (path_id)
JOIN nodes sn ON sn.run_id = ch.run_id AND sn.node_id = ch.src_id
JOIN nodes dn ON dn.run_id = ch.run_id AND dn.node_id = ch.dst_id
LEFT JOIN {SITE_EXPANSION} ON sx.site = dn.site
GROUP BY ALL ORDER BY rank, edge"""
    return con.sql(sql).df()


class CurveBuilder:
    """Evaluates circuits (deduplicated, batched) and turns metrics into faithfulness."""

    def __init__(
        self, evaluator: MaskedEvaluator | PositionalEvaluator, selection: str = "top-n"
    ) -> None:
        """Evaluate the full and the empty circuit (the normalisation's two ends); circuits of
        ``k`` edges are chosen by ``selection`` (:data:`SELECTIONS`: MIB's top-n or greedy)."""
        if selection not in SELECTIONS:
            raise EvaluationError(
                f"unknown circuit selection {selection!r}; choose one of {', '.join(SELECTIONS)}"
            )
        self.select = SELECTIONS[selection]
        self.evaluator = evaluator
        self.graph = evaluator.graph
        real = self.graph.real()
        self.m_full, self.m_empty = (
            float(v) for v in evaluator.metric_values(np.stack([real, ~real]))
        )
        if abs(self.m_full - self.m_empty) < 1e-9:
            raise EvaluationError(
                "the full and the empty circuit score the same on these prompts (the corruption "
                "changes nothing), so faithfulness is undefined; use other prompts or --intervention"
            )

    def faithfulness(self, metric: float) -> float:
        """Normalised faithfulness of a metric value."""
        return (metric - self.m_empty) / (self.m_full - self.m_empty) + 0.0  # no -0.0

    def evaluate(self, circuits: Sequence[Sequence[str]]) -> list[float]:
        """Mean metric of each circuit (edge-name lists); identical circuits are run once."""
        keys = [frozenset(c) for c in circuits]
        unique = list(dict.fromkeys(keys))
        values: dict[frozenset[str], float] = {}
        if unique:
            masks = np.stack([self.graph.mask(u) for u in unique])
            values = dict(
                zip(unique, (float(v) for v in self.evaluator.metric_values(masks)), strict=True)
            )
        return [values[k] for k in keys]

    def edge_curve(
        self,
        table: pd.DataFrame,
        by: str,
        name: str,
        counts: Iterable[tuple[int, float | None, str]],
    ) -> list[CurvePoint]:
        """Points of the top-k-edges curve ranked ``by`` for ``(k, fraction, source)`` requests."""
        reqs = list(counts)
        circuits = [self.select(table, k, by) for k, _, _ in reqs]
        metrics = self.evaluate(circuits)
        return [
            CurvePoint(name, k, frac, len(c), m, self.faithfulness(m), src)
            for (k, frac, src), c, m in zip(reqs, circuits, metrics, strict=True)
        ]

    def edge_curves(
        self, table: pd.DataFrame, counts: Sequence[int] = (), scan_step: int = 5
    ) -> list[CurvePoint]:
        """The ``signed`` and ``abs`` curves of an edge-score table (MIB points, ``counts``, and the
        bisection that resolves the edges needed for each target)."""
        reqs = mib_counts(self.graph.n_edges) + [(int(c), None, "user") for c in counts]
        points = self.edge_curve(table, "signed", "signed", reqs) + self.edge_curve(
            table, "abs", "abs", reqs
        )
        return points + self.refine(table, [p for p in points if p.curve == "abs"], scan_step)

    def refine(self, table: pd.DataFrame, points: list[CurvePoint], step: int) -> list[CurvePoint]:
        """Bisect the ``abs`` curve between the MIB points around each target faithfulness, down to
        ``step`` edges, so that "edges needed" is resolved finely (few extra circuits)."""
        done: dict[int, CurvePoint] = {p.k: p for p in points}
        for target in TARGETS:
            ks = sorted(done)
            above = [k for k in ks if done[k].faithfulness >= target]
            if not above:
                continue
            hi = above[0]
            lo = max([k for k in ks if k < hi], default=0)
            while hi - lo > step:
                mid = (lo + hi) // 2
                if mid not in done:
                    done[mid] = self.edge_curve(table, "abs", "abs", [(mid, None, "scan")])[0]
                lo, hi = (mid, hi) if done[mid].faithfulness < target else (lo, mid)
        return [p for k, p in sorted(done.items()) if p.source == "scan"]

    def path_curve(self, ranks: pd.DataFrame) -> list[CurvePoint]:
        """Points of the union-of-top-k-paths curve (k from :data:`PATH_COUNTS` and all paths)."""
        if ranks.empty:
            return []
        n_paths = int(ranks["rank"].max())
        ks = sorted({k for k in PATH_COUNTS if k < n_paths} | {n_paths})
        circuits = [list(ranks.loc[ranks["rank"] <= k, "edge"]) for k in ks]
        metrics = self.evaluate(circuits)
        return [
            CurvePoint("paths", k, None, len(c), m, self.faithfulness(m), "paths")
            for k, c, m in zip(ks, circuits, metrics, strict=True)
        ]


def mib_counts(
    n_edges: int, fractions: Sequence[float] = MIB_FRACTIONS
) -> list[tuple[int, float | None, str]]:
    """MIB's circuit sizes ``int(f * n_edges)`` for each fraction."""
    return [(int(f * n_edges), f, "mib") for f in fractions]


def areas(points: Sequence[CurvePoint]) -> tuple[float, float]:
    """(CPR, CMD): area under the ``signed`` curve, area between the ``abs`` curve and 1 (MIB points)."""
    signed = [p for p in points if p.curve == "signed" and p.source == "mib"]
    absolute = [p for p in points if p.curve == "abs" and p.source == "mib"]
    cpr = trapezoid_areas([p.fraction or 0.0 for p in signed], [p.faithfulness for p in signed])[0]
    cmd = trapezoid_areas(
        [p.fraction or 0.0 for p in absolute], [p.faithfulness for p in absolute]
    )[1]
    return cpr, cmd


def evaluate_run(
    con: duckdb.DuckDBPyConnection,
    run: int | str,
    evaluator: MaskedEvaluator | PositionalEvaluator,
    *,
    prompts: str,
    heldout: bool,
    score: str = "score",
    counts: Sequence[int] = (),
    paths: bool = True,
    scan_step: int = 5,
    rule: str | None = None,
) -> Evaluation:
    """Build the ``signed``, ``abs`` (and ``paths``) curves of a stored run and score them (edge
    scores by ``rule``: ``effect``, ``group`` or ``refined``; None: the run's default,
    :func:`pathdb.store.effects.default_edge_rule`, and ``effect`` for positional circuits)."""
    if score not in SCORES:
        raise EvaluationError(f"unknown edge score {score!r}; choose one of {', '.join(SCORES)}")
    if rule is not None and rule not in EVAL_RULES:
        raise EvaluationError(f"unknown edge rule {rule!r}; choose one of {', '.join(EVAL_RULES)}")
    bad = [c for c in counts if c < 0]
    if bad:
        raise EvaluationError(f"edge counts must be >= 0, got {bad}")
    start = time.perf_counter()
    info = resolve_run(con, run)
    positional = isinstance(evaluator, PositionalEvaluator)
    if rule is None:
        rule = "effect" if positional else default_edge_rule(con, info.run_id)[0]
    graph = evaluator.graph
    spec = graph.base.spec if isinstance(graph, PositionalGraph) else graph.spec
    if (info.n_layers, info.n_heads) != (spec.n_layers, spec.n_heads):
        raise EvaluationError(
            f"run {info.name!r} is of another model shape than the evaluation model"
        )
    if isinstance(evaluator, PositionalEvaluator):
        if rule != "effect":
            raise EvaluationError(f"the {rule} edge rule is position-free; drop --positional")
        table = evaluator.graph.table(run_edges(con, info), score)
    elif rule in ("group", "refined"):
        from pathdb.evaluate.groups import rule_edges

        table = full_edge_table(
            evaluator.graph, rule_edges(con, info.run_id, rule, evaluator.model), score
        )
    else:
        scored = edge_table(con, info.run_id, positional=False, rule="effect")
        table = full_edge_table(evaluator.graph, scored, score)
    builder = CurveBuilder(evaluator)
    points = builder.edge_curves(table, counts, scan_step)
    if paths:
        ranks = positional_path_ranks(con, info) if positional else path_edge_ranks(con, info)
        points += builder.path_curve(ranks)
    cpr, cmd = areas(points)
    abs_all = [p for p in points if p.curve == "abs"]
    n = graph.n_edges
    return Evaluation(
        run_id=info.run_id, run_name=info.name, heldout=heldout,
        prompts=f"{prompts} [positional]" if positional else prompts,
        intervention=evaluator.intervention, metric=evaluator.metric_name,
        score=score_label(score, rule),
        n_prompts=evaluator.n_prompts, n_edges_total=n, m_full=builder.m_full, m_empty=builder.m_empty,
        points=points, cpr=cpr, cmd=cmd, edges_80=edges_needed(abs_all, TARGETS[0]),
        edges_90=edges_needed(abs_all, TARGETS[1]), wall_s=time.perf_counter() - start,
    )  # fmt: skip
