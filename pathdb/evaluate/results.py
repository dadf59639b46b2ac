"""Results of a faithfulness evaluation (plain data, no torch): curve points, the evaluation
record, MIB's trapezoid areas and the edges needed for a target faithfulness."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TARGETS = (0.8, 0.9)
SCORES = ("score", "abs_score", "pos_score", "neg_score")
INTERVENTIONS = ("counterfactual", "zero", "mean", "mean-positional")


@dataclass(frozen=True)
class CurvePoint:
    """One evaluated circuit: curve name, requested size k (edges, or paths for ``paths``),
    MIB fraction (``None`` for user / scan counts and path points), circuit edges after pruning,
    mean metric and normalised faithfulness; ``source`` is ``mib``, ``user``, ``scan`` or ``paths``."""

    curve: str
    k: int
    fraction: float | None
    n_edges: int
    metric: float
    faithfulness: float
    source: str


@dataclass
class Evaluation:
    """A run's faithfulness evaluation: settings, reference metrics, every point, CPR/CMD."""

    run_id: int
    run_name: str
    prompts: str
    heldout: bool
    intervention: str
    metric: str
    score: str
    n_prompts: int
    n_edges_total: int
    m_full: float
    m_empty: float
    points: list[CurvePoint] = field(default_factory=list)
    cpr: float = float("nan")
    cmd: float = float("nan")
    edges_80: int | None = None
    edges_90: int | None = None
    wall_s: float = 0.0
    evaluation_id: int | None = None

    def curve(self, name: str) -> list[CurvePoint]:
        """The points of one curve, by circuit size."""
        return sorted((p for p in self.points if p.curve == name), key=lambda p: (p.k, p.n_edges))

    @property
    def edge_rule(self) -> tuple[str, str]:
        """(score column, edge rule) of the ranking judged, read back from :attr:`score`."""
        column, _, tag = self.score.partition(" [")
        return column, tag.rstrip("]") or "effect"

    def settings(self) -> dict[str, Any]:
        """The settings as a plain dict (stored as JSON)."""
        d = asdict(self)
        return {
            k: d[k] for k in ("prompts", "heldout", "intervention", "metric", "score", "n_prompts")
        }


def score_label(column: str, rule: str) -> str:
    """An evaluation's ``score``: the score column ranked, tagged with a rule other than
    ``effect`` (``score [group]``; :attr:`Evaluation.edge_rule` reads it back)."""
    return column if rule == "effect" else f"{column} [{rule}]"


def trapezoid_areas(
    fractions: Sequence[float], faithfulness: Sequence[float]
) -> tuple[float, float]:
    """MIB's areas over a curve: (area under it, area between it and 1), trapezoid rule on ``fractions``."""
    under = between = 0.0
    for i in range(len(fractions) - 1):
        dx = fractions[i + 1] - fractions[i]
        under += dx * (faithfulness[i] + faithfulness[i + 1]) / 2
        between += dx * (abs(1 - faithfulness[i]) + abs(1 - faithfulness[i + 1])) / 2
    return under, between


def edges_needed(points: Iterable[CurvePoint], target: float) -> int | None:
    """The fewest circuit edges among ``points`` whose faithfulness reaches ``target`` (None: none)."""
    hits = [p.n_edges for p in points if p.faithfulness >= target]
    return min(hits) if hits else None
