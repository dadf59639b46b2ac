"""The interface search strategies use to score paths: :class:`Evaluator` and :class:`Scores`.

Two implementations: :class:`search.exact.ExactEvaluator` (path message patching, exact) and
:class:`search.attribution.AttributionEvaluator` (path attribution patching, first order). Both
score *all* candidate extensions of one frontier path in one batched call (``expand``), and any
list of paths (``score_paths``). Scores are in the metric's units, relative to the clean run
(the clean value is ``baseline()``; 0 for the built-in metrics).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload, runtime_checkable

import torch
from torch import Tensor

from pathdb.graph import Node, Path

EXACT = "exact"
ATTRIBUTION = "attribution"


class ExtensionPaths(Sequence[Path]):
    """The paths ``(c, *tail)`` for candidates ``c``, built lazily (a search rarely reads them)."""

    __slots__ = ("candidates", "tail")

    def __init__(self, candidates: Sequence[Node], tail: Path) -> None:
        """Keep the candidate list and the shared tail; no per-candidate tuples are built."""
        self.candidates = candidates
        self.tail = tail

    def __len__(self) -> int:
        """Number of paths."""
        return len(self.candidates)

    @overload
    def __getitem__(self, i: int) -> Path: ...
    @overload
    def __getitem__(self, i: slice) -> list[Path]: ...
    def __getitem__(self, i: int | slice) -> Path | list[Path]:
        """The ``i``-th path (or a list for a slice)."""
        if isinstance(i, slice):
            return [(c, *self.tail) for c in self.candidates[i]]
        return (self.candidates[i], *self.tail)

    def __iter__(self) -> Iterator[Path]:
        """Paths in candidate order."""
        tail = self.tail
        return ((c, *tail) for c in self.candidates)

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same paths."""
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Scores:
    """Scores of a list of paths: per prompt ``[n, B]`` and the method that produced each one."""

    paths: Sequence[Path]
    per_prompt: Tensor  # [n, B], on the host (one copy back per expansion)
    methods: list[str]

    @property
    def mean(self) -> Tensor:
        """Batch-mean score per path, ``[n]`` (``ipe`` averages the metric over the prompts);
        bfloat16 / float16 scores are averaged in float32 so the mean adds no rounding of its own."""
        p = self.per_prompt
        return (p.float() if p.dtype in (torch.bfloat16, torch.float16) else p).mean(dim=1)

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
