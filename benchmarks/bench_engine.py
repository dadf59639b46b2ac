"""Candidate evaluations per second: batched exact / attribution vs one candidate at a time.

Usage: ``.venv/bin/python benchmarks/bench_engine.py [--quick]``. Prints a table and writes
``benchmarks/results/engine.json``. Models: (a) the bundled ``toy-ioi`` if it loads, else a random
4-layer/4-head/d128 model; (b) a random GPT-2-small-shaped model (12 layers, 12 heads, d768,
d_mlp 3072), 15-token prompts, 8 prompts per batch. Metric: logit difference, counterfactual patching.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pathdb.graph import Node, Site, predecessors
from search.activations import ActivationCache
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, build_metric


def random_model(n_layers: int, n_heads: int, d_model: int, d_mlp: int, d_vocab: int) -> HookedTransformer:
    """A seeded random pre-LN model of the given shape (float32)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_model // n_heads, d_mlp=d_mlp,
        d_vocab=d_vocab, n_ctx=64, act_fn="gelu_new", normalization_type="LN",
        positional_embedding_type="standard", seed=0,
    )
    return HookedTransformer(cfg).eval()


def small_model() -> tuple[HookedTransformer, str]:
    """The bundled toy-ioi model when available, else a random one of its shape."""
    try:
        from pathdb.models import load

        return load("toy-ioi"), "toy-ioi"
    except Exception:  # any failure: fall back to a random model of the same shape
        return random_model(4, 4, 128, 512, 1000), "random 4L/4H/d128"


def frontier_paths(n_layers: int, T: int) -> list[tuple[str, tuple[Node, ...]]]:
    """Frontier paths of depth 0..3 ending at FINAL(T-1)."""
    f = Node.final(n_layers, T - 1)
    top = n_layers - 1
    a = Node.attn(top, 0, Site.Q, T - 1)
    kv = Node.attn(top - 1, 1, Site.KV, T - 1, T - 3)
    m = Node.mlp(top - 2, T - 3)
    return [
        ("depth0 [FINAL]", (f,)),
        ("depth1 [a<q>]", (a, f)),
        ("depth2 [a<kv>,a<q>]", (kv, a, f)),
        ("depth3 [mlp,a<kv>,a<q>]", (m, kv, a, f)),
    ]


def rate(fn: Any, n: int, min_time: float = 1.0) -> float:
    """Candidates per second of ``fn()`` scoring ``n`` candidates (repeated for ``min_time``)."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n * reps / dt


def bench(model: HookedTransformer, name: str, batch: int, seq: int, quick: bool) -> list[dict[str, Any]]:
    """Rates for every frontier path on one model."""
    g = torch.Generator().manual_seed(0)
    V = model.cfg.d_vocab
    tokens = torch.randint(0, V, (batch, seq), generator=g)
    cf = torch.randint(0, V, (batch, seq), generator=g)
    target, cf_target = torch.randint(0, V, (batch,), generator=g), torch.randint(0, V, (batch,), generator=g)
    cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    root = Node.final(model.cfg.n_layers, seq - 1)
    metric = build_metric(cache, "logit_difference", root, target, cf_target)
    exact = ExactEvaluator(cache, metric, root)
    rows = []
    for label, path in frontier_paths(model.cfg.n_layers, seq):
        cands = predecessors(path[0], cache.shape)
        singles = cands[:: max(1, len(cands) // (20 if quick else 60))]
        attr = AttributionEvaluator(cache, metric, root, exact_complete=False)
        r_exact = rate(lambda: exact.expand(path, cands), len(cands), 0.5 if quick else 2.0)  # noqa: B023 (called within the iteration)
        r_single = rate(lambda: [exact.expand(path, [c]) for c in singles], len(singles), 0.5 if quick else 2.0)  # noqa: B023 (called within the iteration)

        def attr_fn() -> None:
            attr.release(path)  # include the VJP through the frontier node in the cost  # noqa: B023
            attr.expand(path, cands)  # noqa: B023

        r_attr = rate(attr_fn, len(cands), 0.5 if quick else 2.0)
        rows.append(
            dict(model=name, path=label, n_candidates=len(cands), exact_batched=r_exact,
                 exact_one_at_a_time=r_single, speedup=r_exact / r_single, attribution=r_attr)
        )
        print(f"{name:24s} {label:26s} {len(cands):6d} {r_exact:12.0f} {r_single:10.0f} "
              f"{r_exact / r_single:8.1f}x {r_attr:12.0f}", flush=True)
    return rows


def main() -> None:
    """Run both model shapes and write the JSON results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{'model':24s} {'frontier path':26s} {'cands':>6s} {'exact/s':>12s} {'1-at-a-time/s':>10s} "
          f"{'speedup':>9s} {'attrib/s':>12s}")
    small, small_name = small_model()
    rows = bench(small, small_name, 8, 15, args.quick)
    gpt2 = random_model(12, 12, 768, 3072, 50257)
    rows += bench(gpt2, "random GPT-2-small shape", 8, 15, args.quick)
    out = Path(__file__).parent / "results" / "engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                metric="logit_difference", patch_type="counterfactual", batch=8, seq_len=15)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
