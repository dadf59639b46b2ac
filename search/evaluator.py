"""The interface search strategies use to score paths: :class:`Evaluator` and :class:`Scores`.

Two implementations: :class:`search.exact.ExactEvaluator` (path message patching, exact) and
:class:`search.attribution.AttributionEvaluator` (path attribution patching, first order). Both
score *all* candidate extensions of one frontier path in one batched call (``expand``), and any
list of paths (``score_paths``). Scores are in the metric's units, relative to the clean run
(the clean value is ``baseline()``; 0 for the built-in metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from pathdb.graph import Node, Path

EXACT = "exact"
ATTRIBUTION = "attribution"


@dataclass
class Scores:
    """Scores of a list of paths: per prompt ``[n, B]`` and the method that produced each one."""

    paths: list[Path]
    per_prompt: Tensor  # [n, B], on CPU
    methods: list[str]

    @property
    def mean(self) -> Tensor:
        """Batch-mean score per path, ``[n]`` (``ipe`` averages the metric over the prompts)."""
        return self.per_prompt.mean(dim=1)

    def __len__(self) -> int:
        """Number of scored paths."""
        return len(self.paths)

    def as_list(self) -> list[tuple[Path, float, str]]:
        """``(path, batch-mean score, method)`` triples."""
        means = self.mean.tolist()
        return list(zip(self.paths, means, self.methods, strict=True))


@runtime_checkable
class Evaluator(Protocol):
    """What a search strategy needs from a scoring engine."""

    method: str

    def baseline(self) -> float:
        """Batch-mean metric value of the clean run (0 for built-in metrics)."""
        ...

    def expand(self, path: Sequence[Node], candidates: Sequence[Node]) -> Scores:
        """Scores of ``(c, *path)`` for every candidate ``c`` (all in one batched evaluation)."""
        ...

    def score_paths(self, paths: Sequence[Sequence[Node]]) -> Scores:
        """Scores of complete or partial paths, in the given order."""
        ...

    def release(self, path: Sequence[Node]) -> None:
        """Forget any per-path state of ``path`` (it left the frontier)."""
        ...
