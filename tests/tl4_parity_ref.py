"""TransformerLens 3.9 side of the cross-major parity test (tests/test_tl4_parity.py): run in the
TL 3.9 environment as ``python -m tests.tl4_parity_ref``, it reads a JSON list of requests on stdin (model,
prompts, path labels), loads the model through pathdb's HookedTransformer route and prints the
engine's exact scores and the independent TL-hooks reference's (tests/reference_hooks_arch.py)."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from pathdb.graph import Node, parse_label
from pathdb.models import load
from search.activations import ActivationCache
from search.exact import ExactEvaluator, build_metric
from tests import reference_hooks_arch as ref


def scores(req: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Exact and reference scores ``[path][prompt]`` of the request's paths on its model."""
    model = load(req["model"], device="cpu")
    tokens, cf = torch.tensor(req["tokens"]), torch.tensor(req["cf"])
    target, cf_target = torch.tensor(req["target"]), torch.tensor(req["cf_target"])
    L = model.cfg.n_layers
    paths = [tuple(parse_label(s, L) for s in labels) for labels in req["paths"]]
    cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    root = Node.final(L, tokens.shape[1] - 1)
    ev = ExactEvaluator(
        cache, build_metric(cache, "logit_difference", root, target, cf_target), root
    )
    exact = ev.score_paths(paths).per_prompt
    clean, cfc = ref.full_cache(model, tokens), ref.full_cache(model, cf)
    reference = [
        ref.score_logit_difference(
            model, tokens, clean, cfc, "counterfactual", p, target, cf_target
        )
        for p in paths
    ]
    return {"exact": exact.tolist(), "reference": [r.tolist() for r in reference]}


if __name__ == "__main__":
    print(json.dumps([scores(r) for r in json.load(sys.stdin)]))
