"""The engine and whole searches on a CUDA GPU against CPU float64 (``pytest -m cuda``).

Every test here is marked ``cuda`` and skipped without a GPU (CI has none: there the CPU-side
device guard of ``tests/test_device_guard.py`` covers the same bug class). ``benchmarks/gpu_check.sh``
runs them on the GPU machine; :func:`search_parity` is also what it records in ``gpu.json``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from pathdb.graph import Node, predecessors
from search.activations import PATCH_TYPES
from search.strategies import SearchParams
from tests.test_device_guard import L, T, _candidates, _evaluators, _inputs, _paths

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOLERANCE = 1e-4  # metric units (logits for logit difference)


def search_parity(
    params: SearchParams, *, patch: str, positional: bool, device: str = "cuda", dtype: str = "float32",
    model: str = "toy-ioi", prompts: str = "toy-ioi-small",
) -> dict[str, Any]:  # fmt: skip
    """Run one batch search on ``device`` in ``dtype`` and on the CPU in float64; the evaluated
    paths must be the same, with the same kept flags and methods, and every score within
    :data:`TOLERANCE` of float64's. Returns counts, the largest difference and both wall times."""
    import time

    from pathdb.models import load
    from pathdb.prompts import load_prompts
    from search.api import find_paths

    runs = []
    for where, dt in ((device, dtype), ("cpu", "float64")):
        m = load(model, device=where, dtype=dt)
        t0 = time.perf_counter()
        found = find_paths(
            m,
            load_prompts(prompts, m),
            copy.deepcopy(params),
            patch_type=patch,
            positional=positional,
        )
        runs.append(({p.path: p for p in found}, time.perf_counter() - t0))
    (got, seconds), (ref, cpu_seconds) = runs
    assert got.keys() == ref.keys(), (
        f"{len(got.keys() ^ ref.keys())} paths evaluated on one device only"
    )
    worst = 0.0
    for path, r in ref.items():
        g = got[path]
        assert (g.kept, g.complete, g.method) == (r.kept, r.complete, r.method), path
        if r.contribution is not None:
            assert g.contribution is not None
            worst = max(worst, abs(g.contribution - r.contribution))
    assert worst <= TOLERANCE, f"max |score - float64 score| = {worst:.3g} > {TOLERANCE}"
    return {
        "method": params.method, "patch": patch, "positional": positional, "device": device,
        "dtype": dtype, "min_contribution": params.min_contribution, "n_paths": len(ref),
        "n_complete_kept": sum(p.complete and p.kept for p in ref.values()),
        "max_abs_diff": worst, "seconds": seconds, "cpu_float64_seconds": cpu_seconds,
    }  # fmt: skip


@pytest.mark.parametrize("patch", PATCH_TYPES)
@pytest.mark.parametrize("positional", [True, False], ids=["positional", "position-free"])
@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_search_on_cuda_equals_cpu_float64(method: str, positional: bool, patch: str) -> None:
    """Whole searches on CUDA equal CPU float64 path for path (the demo's own threshold for the
    demo configuration and for zero patching, whose positional toy-ioi search keeps no complete
    path at 0.1; 0.1 elsewhere to bound the CPU reference's time)."""
    demo = method == "exact" and positional and patch == "counterfactual"
    threshold = 0.05 if demo or patch == "zero" else 0.1
    params = SearchParams(method=method, min_contribution=threshold)  # type: ignore[arg-type]
    res = search_parity(params, patch=patch, positional=positional)
    assert res["n_complete_kept"] > 0


@pytest.mark.parametrize("patch", PATCH_TYPES)
def test_expand_on_cuda_matches_cpu(patch: str) -> None:
    """Exact and attribution expansions of every node kind on CUDA (float64) equal the CPU's."""
    model, tokens, cf, target, cf_target = _inputs(patch)
    for positional in (True, False):
        root = Node.final(L, T - 1 if positional else None)
        ref_exact, ref_attr = _evaluators(model, tokens, cf, target, cf_target, patch, root)
        exact, attr = _evaluators(
            copy.deepcopy(model).to("cuda"), tokens, cf, target, cf_target, patch, root
        )
        assert exact.cache.device.type == "cuda"
        for path in _paths(positional):
            cands = _candidates(path[0], exact.cache.shape)
            for ev, ref in ((exact, ref_exact), (attr, ref_attr)):
                got, want = ev.expand(path, cands), ref.expand(path, cands)
                torch.testing.assert_close(got.per_prompt, want.per_prompt, rtol=1e-9, atol=1e-9)
        full = [
            (c, *p) for p in _paths(positional) for c in predecessors(p[0], exact.cache.shape)[:3]
        ]
        torch.testing.assert_close(
            attr.score_paths(full).per_prompt, ref_attr.score_paths(full).per_prompt
        )
