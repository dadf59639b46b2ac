"""Compare two scored path sets (label tuple -> score): overlap, score agreement, differences."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ipe_compat.translate import Labels

# Scores are target_logit_percentage values (percent points): 1e-4 here is 1e-6 of the clean logit.
# Below it both tools only see float32 noise (ipe's exactly-zero paths come out as +-1e-5), and ipe
# orders tied candidates by set iteration order, so sets are compared above this floor.
SCORE_FLOOR = 1e-4
# Relative differences are only meaningful well above the float32 noise (~2e-5 percent points).
REL_FLOOR = 1e-2


def rel_diff(a: float, b: float) -> float:
    """Relative difference ``|a - b| / max(|a|, |b|)`` (0 when both are 0)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


@dataclass
class PathSetComparison:
    """How two tools' complete-path sets relate (above the score floor)."""

    n_ipe: int
    n_pathdb: int
    n_ipe_above_floor: int
    n_pathdb_above_floor: int
    n_shared: int
    identical: bool
    max_rel_score_diff: float | None  # over shared paths with |score| >= rel_floor
    max_abs_score_diff: float | None
    only_ipe: list[dict[str, Any]] = field(default_factory=list)
    only_pathdb: list[dict[str, Any]] = field(default_factory=list)
    worst_shared: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the results file."""
        return asdict(self)


def _row(labels: Labels, score: float, other: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"path": " -> ".join(labels), "score": score}
    if other is not None:
        row["other_score"] = other
    return row


def compare_sets(
    ipe: Mapping[Labels, float],
    pathdb: Mapping[Labels, float],
    *,
    floor: float = SCORE_FLOOR,
    rel_floor: float = REL_FLOOR,
    max_listed: int = 10,
) -> PathSetComparison:
    """Compare the paths of both tools whose |score| exceeds ``floor`` (by node-label sequence).

    A path above the floor in one tool counts as shared when the other tool found it at all,
    so a score sitting exactly at a threshold is reported as a score difference, not a miss.
    """
    a = {k: v for k, v in ipe.items() if abs(v) > floor}
    b = {k: v for k, v in pathdb.items() if abs(v) > floor}
    keys = set(a) | set(b)
    shared = [k for k in keys if k in ipe and k in pathdb]
    only_a = sorted((k for k in a if k not in pathdb), key=lambda k: -abs(a[k]))
    only_b = sorted((k for k in b if k not in ipe), key=lambda k: -abs(b[k]))
    big = [k for k in shared if max(abs(ipe[k]), abs(pathdb[k])) >= rel_floor]
    diffs = sorted(((rel_diff(ipe[k], pathdb[k]), k) for k in big), reverse=True)
    return PathSetComparison(
        n_ipe=len(ipe),
        n_pathdb=len(pathdb),
        n_ipe_above_floor=len(a),
        n_pathdb_above_floor=len(b),
        n_shared=len(shared),
        identical=not only_a and not only_b,
        max_rel_score_diff=diffs[0][0] if diffs else None,
        max_abs_score_diff=max((abs(ipe[k] - pathdb[k]) for k in shared), default=None),
        only_ipe=[_row(k, a[k]) for k in only_a[:max_listed]],
        only_pathdb=[_row(k, b[k]) for k in only_b[:max_listed]],
        worst_shared=[_row(k, ipe[k], pathdb[k]) for _, k in diffs[:3]],
    )
