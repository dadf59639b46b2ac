"""Evidence for differences between the tools: float64 reference scores and attribution estimates.

* :func:`float64_reference` re-scores paths exactly with pathdb on a float64 copy of the model, so
  each tool's float32 rounding error can be measured against the same reference (ipe cannot run in
  float64: its attention output projection casts to float32).
* :func:`embed_estimates` gives, for complete paths, both the exact score and the first-order
  estimate of prepending the EMBED node; ipe's attribution best-first queues EMBED candidates by
  the estimate, pathdb by the exact score, which explains their different top-n sets.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from ipe_compat.translate import Labels
from pathdb.graph import GraphError, ModelShape, Node, Site, parse_label
from pathdb.prompts import PromptSet
from search.scorer import PromptScorer, build_scorer


def to_float64(model: Any) -> Any:
    """A float64 copy of a HookedTransformer (the original is left untouched)."""
    m64 = copy.deepcopy(model).to(torch.float64)
    m64.cfg.dtype = torch.float64
    return m64


def _scorer(
    model: Any, prompts: PromptSet, patch_type: str, positional: bool, metric: str
) -> PromptScorer:
    sc = build_scorer(model, prompts, metric=metric, patch_type=patch_type, positional=positional)
    assert isinstance(sc, PromptScorer), "the ipe comparison uses equal-length prompt sets"
    return sc


def _nodes(labels: Labels, n_layers: int) -> tuple[Node, ...]:
    return tuple(parse_label(lab, n_layers) for lab in labels)


def float64_reference(
    model64: Any,
    prompts: PromptSet,
    patch_type: str,
    positional: bool,
    metric: str,
    paths: Iterable[Labels],
) -> dict[Labels, float]:
    """Exact float64 scores of complete paths (pathdb engine on the float64 model).

    Paths that are not edges of the model's graph (ipe's unsplit best-first pre-screen nodes
    feeding nodes at the wrong position) have no reference score and are left out.
    """
    sc = _scorer(model64, prompts, patch_type, positional, metric)
    keys = [k for k in paths if valid_path(k, sc.shape)]
    if not keys:
        return {}
    scores = sc.exact.score_paths([_nodes(k, model64.cfg.n_layers) for k in keys]).mean
    return {k: float(s) for k, s in zip(keys, scores.tolist(), strict=True)}


def valid_path(labels: Labels, shape: ModelShape) -> bool:
    """True when every node and edge of the path exists in the model's graph."""
    try:
        shape.validate_path(_nodes(labels, shape.n_layers))
    except GraphError:
        return False
    return True


def max_abs_error(scores: dict[Labels, float], reference: dict[Labels, float]) -> float | None:
    """Largest |score - reference| over the paths both have."""
    diffs = [abs(v - reference[k]) for k, v in scores.items() if k in reference]
    return max(diffs) if diffs else None


def embed_estimates(
    model: Any,
    prompts: PromptSet,
    patch_type: str,
    positional: bool,
    metric: str,
    paths: Iterable[Labels],
) -> list[dict[str, Any]]:
    """For complete paths: exact score and the linear estimate ipe queues the EMBED node with."""
    sc = _scorer(model, prompts, patch_type, positional, metric)
    out = []
    for labels in paths:
        nodes = _nodes(labels, model.cfg.n_layers)
        rest, start = nodes[1:], nodes[0]
        est = float(sc.expand_attribution(rest, [start])[0])
        exact = float(sc.expand_exact(rest, [start])[0])
        out.append({"path": " -> ".join(labels), "exact": exact, "estimate": est})
    return out


def _twin(node: Node) -> Node | None:
    """The other side (query <-> key/value) of the same head at the same positions, if any."""
    if node.head is None or node.site is None or node.kv_position is not None:
        return None
    other = Site.KV if node.site is Site.Q else Site.Q if node.site is Site.KV else None
    if other is None:
        return None
    return Node.attn(node.layer, node.head, other, node.position, None)


def twin_ties(
    model: Any,
    prompts: PromptSet,
    patch_type: str,
    positional: bool,
    metric: str,
    method: str,
    paths: Iterable[Labels],
) -> list[dict[str, Any]]:
    """Partial paths of the differing complete paths whose start ties exactly with its q/kv twin.

    A head node without a key/value position starts a path with the head's whole output, whether
    it is the query side or the key/value side, so both twins score the same; level-width then
    keeps one of them at the max_width cut-off by tie order (ipe: Python set order).
    """
    sc = _scorer(model, prompts, patch_type, positional, metric)
    score = sc.expand_exact if method == "exact" else sc.expand_attribution
    seen: dict[tuple[str, ...], dict[str, Any]] = {}
    for labels in paths:
        nodes = _nodes(labels, model.cfg.n_layers)
        for i in range(1, len(nodes) - 1):
            twin = _twin(nodes[i])
            key = labels[i:]
            if twin is None or key in seen:
                continue
            a, b = (float(x) for x in score(nodes[i + 1 :], [nodes[i], twin]))
            if a == b:
                seen[key] = {"partial": " -> ".join(key), "twin": twin.label, "score": a}
    return list(seen.values())
