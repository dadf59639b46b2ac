"""The position-free edge rules that rescale a run's ``effect`` edge table (:func:`pathdb.query.aggregate.edges`).

``group`` makes every receiver input's edges sum to the input's measured group effect;
``refined`` (the default of runs that stored it) is the group rule with each edge capped by its
sender's widest input chain, then the order of the top edges refined by edge-masked forwards on the
search prompts (:mod:`pathdb.evaluate.refine` measures it; the store keeps the result per edge,
:mod:`pathdb.store.effects`). Every rule here rescales an edge's ``score`` and scales its
``abs_score``, ``pos_score`` and ``neg_score`` by the same factor, so the columns stay consistent;
docs/semantics.md, "Edge rules", says why each exists and what it measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd


def rescaled(table: pd.DataFrame, new: pd.Series) -> pd.DataFrame:
    """``table`` with ``score`` replaced by ``new`` and ``abs_score`` / ``pos_score`` / ``neg_score``
    scaled by ``new / score`` (positive and negative parts swap where the factor is negative; an
    edge scored 0 keeps its columns), re-sorted by ``|score|`` then name; counts stay."""
    t = table.copy()
    s = t["score"].astype(float)
    factor = (new / s.where(s.ne(0), 1.0)).where(s.ne(0), 1.0)
    pos, neg = t["pos_score"] * factor, t["neg_score"] * factor
    flip = factor.lt(0)
    t["score"] = new
    t["abs_score"] = t["abs_score"] * factor.abs()
    t["pos_score"], t["neg_score"] = pos.where(~flip, neg), neg.where(~flip, pos)
    t = t.assign(_a=t["score"].abs()).sort_values(["_a", "edge"], ascending=[False, True])
    return t.drop(columns="_a").reset_index(drop=True)


def group_rule(table: pd.DataFrame, effects: Mapping[str, float]) -> pd.DataFrame:
    """The ``group`` edge rule on a position-free ``effect`` table: every receiver input ``r`` with a
    group effect ``G_r`` (``effects``: the metric change when all of ``r``'s incoming edges are
    corrupted together) gets the part of it its edges' scores do not add up to, shared in proportion
    to ``|score|``: ``score' = score + (G_r - sum score) * |score| / sum |score|``, so the scores into
    ``r`` sum to ``G_r`` (additive inputs such as values and logits barely change; redundant ones,
    such as a saturated attention pattern's keys, get their joint effect back)."""
    receiver = table["edge"].str.split("->").str[1]
    s = table["score"].astype(float)
    total = s.groupby(receiver).transform("sum")
    size = s.abs().groupby(receiver).transform("sum")
    group = receiver.map(dict(effects)).astype(float)
    known = group.notna() & size.gt(0)
    return rescaled(
        table, s + ((group - total) * s.abs() / size.where(known, 1.0)).where(known, 0.0)
    )


def _depth(node: str) -> float:
    """A node's place in the edge graph's topological order (``input``, ``a0.h*``, ``m0``, ...)."""
    if node in ("input", "logits"):
        return -math.inf if node == "input" else math.inf
    return 2 * int(node[1:].split(".")[0]) + node.startswith("m")


def sender_capped(table: pd.DataFrame) -> pd.Series:
    """Each edge's score with ``|score|`` capped by its sender's *widest input chain*: the largest,
    over input -> sender chains of table edges, of the smallest ``|score|`` on the chain (an edge
    out of a node that only weak edges feed carries little clean signal in a circuit, where that
    node's inputs are corrupted); signs are kept. One pass in topological order of receivers."""
    width: dict[str, float] = {"input": math.inf}
    capped = pd.Series(0.0, index=table.index)
    for dst, rows in sorted(table.groupby("dst"), key=lambda kv: _depth(str(kv[0]))):
        cap = rows["src"].map(lambda s: width.get(str(s), 0.0)).astype(float)
        value = np.minimum(rows["score"].abs().astype(float), cap)
        capped[rows.index] = value
        width[str(dst)] = float(value.max())
    return capped * np.where(table["score"] < 0, -1.0, 1.0)


def refined_rule(table: pd.DataFrame, refined: Mapping[str, float]) -> pd.DataFrame:
    """The ``refined`` edge rule on a ``group`` table: :func:`sender_capped` scores, then the scores
    the refinement stored for the top edges (``refined``: edge -> score, the capped magnitudes handed
    out in the refined order, :func:`pathdb.evaluate.refine.refine_order`) replace theirs."""
    new = sender_capped(table)
    stored = table["edge"].map(dict(refined))
    return rescaled(table, stored.where(stored.notna(), new).astype(float))
