"""Candidate evaluations per second of the path engine: batched vs one candidate at a time.

Usage: ``.venv/bin/python benchmarks/bench_engine.py [--quick] [--threads N] [--profile]
[--device cpu|cuda|cuda:N|auto] [--dtype float32|bfloat16|float16|float64]``.
Prints a table and writes ``benchmarks/results/engine.json``. Scores come back to the host once per
``expand`` call, so the timings include the device's work (no extra synchronisation needed).

Models: (a) the bundled ``toy-ioi`` (4L/4H/d128) if it loads, else a random model of that shape;
(b) a random GPT-2-small-shaped model (12 layers, 12 heads, d768, d_mlp 3072, vocab 50257).
Both on 8 random prompts of 15 tokens, logit difference, counterfactual patching.

What is measured, per frontier path (depth 0..3, ending at FINAL of the last position), over the
full default candidate list ``predecessors(path[0])``:

- ``exact_batched``: ``ExactEvaluator.expand(path, candidates)`` (one call, all candidates), with
  the shared-step cache off (a repeated call would otherwise reuse its own first step: the
  per-path rate is the cost of one full expansion; sharing shows in the end-to-end rows).
- ``exact_dense``: the same call with ``ExactEvaluator.dense`` (the engine before issue 22: every
  row of a non-positional message, chunks sized by intermediates only), in the same run.
- ``exact_one_at_a_time``: the *same* evaluator called with a single candidate per call
  (``expand(path, [c])``) on an evenly spaced sample of the same candidates; the honest baseline
  for what batching buys (same node functions, same metric, only the candidate axis differs).
- ``exact_level``: ``ExactEvaluator.expand_many`` of a search level: the frontier path and its
  siblings with every other head in place of its last head (frontier paths sharing all nodes but
  that one, as a threshold level holds them), all candidates of each; candidates per second over
  the level (the shared steps are computed once), next to ``exact_level_per_path``: the same
  paths one ``expand`` each (depth >= 2).
- ``attribution_with_gradient``: as a search does it per frontier path: drop the path's cached
  gradient (no retired tier), then ``AttributionEvaluator.expand`` = one VJP through ``path[0]``
  (its parent's gradient stays cached, as in a search) + scoring all candidates.
- ``attribution_scoring``: ``expand`` with the path's gradient already cached (pure scoring).

Non-positional rows (``nonpos``): toy-ioi with its bundled ``toy-ioi-small`` prompts (the
counterfactual changes one position, so start messages are row-sparse), frontier paths of depth
1 and 3 without positions.

End to end (``find_paths``, threshold strategy, toy-ioi + its bundled small prompt set when
available): evaluated paths returned per second of wall time, per method; exact also with
``dense`` (before) and non-positional.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import time
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pathdb.graph import Node, Site, predecessors
from pathdb.models import move_model
from search.activations import ActivationCache
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, build_metric


def random_model(
    n_layers: int, n_heads: int, d_model: int, d_mlp: int, d_vocab: int
) -> HookedTransformer:
    """A seeded random pre-LN model of the given shape (float32)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_model // n_heads,
        d_mlp=d_mlp,
        d_vocab=d_vocab,
        n_ctx=64,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=0,
    )
    return HookedTransformer(cfg).eval()


def small_model(device: str = "cpu", dtype: str = "float32") -> tuple[HookedTransformer, str]:
    """The bundled toy-ioi model when available, else a random one of its shape."""
    try:
        from pathdb.models import load

        return load("toy-ioi", device=device, dtype=dtype), "toy-ioi"
    except Exception:  # any failure: fall back to a random model of the same shape
        return move_model(random_model(4, 4, 128, 512, 1000), device, dtype), "random 4L/4H/d128"


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


def nonpos_paths(n_layers: int) -> list[tuple[str, tuple[Node, ...]]]:
    """Non-positional frontier paths of depth 1 and 3 ending at FINAL."""
    f = Node.final(n_layers, None)
    top = n_layers - 1
    a = Node.attn(top, 0, Site.Q, None)
    kv = Node.attn(top - 1, 1, Site.KV, None, None)
    m = Node.mlp(top - 2, None)
    return [("nonpos depth1 [a<q>]", (a, f)), ("nonpos depth3 [mlp,a<kv>,a<q>]", (m, kv, a, f))]


def siblings(path: tuple[Node, ...], n_heads: int) -> list[tuple[Node, ...]]:
    """``path`` and the paths with each other head of its last head's layer in that place."""
    last = path[-2]
    return [
        (*path[:-2], Node.attn(last.layer, h, last.site or Site.Q, last.position), path[-1])
        for h in range(n_heads)
    ]


def dense_rate(fn: Any, n: int, min_time: float) -> float:
    """:func:`rate` with the dense engine forced (``ExactEvaluator.dense``)."""
    ExactEvaluator.dense = True
    try:
        return rate(fn, n, min_time)
    finally:
        ExactEvaluator.dense = False


def rate(fn: Any, n: int, min_time: float, repeats: int = 3) -> float:
    """Best of ``repeats`` rates (items/s) of ``fn()`` handling ``n`` items, each timed for
    ``min_time`` seconds after a warm-up call (best-of filters out the shared machine's load)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        reps, t0 = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = max(best, n * reps / dt)
    return best


def bench(
    model: HookedTransformer, name: str, batch: int, seq: int, quick: bool, prompts: Any = None
) -> list[dict[str, Any]]:
    """Rates for every frontier path on one model (random prompts; with ``prompts``, that prompt
    set and the non-positional frontier paths)."""
    g = torch.Generator().manual_seed(0)
    V = model.cfg.d_vocab
    tokens = torch.randint(0, V, (batch, seq), generator=g)
    cf = torch.randint(0, V, (batch, seq), generator=g)
    target, cf_target = (
        torch.randint(0, V, (batch,), generator=g),
        torch.randint(0, V, (batch,), generator=g),
    )
    paths = frontier_paths(model.cfg.n_layers, seq)
    root = Node.final(model.cfg.n_layers, seq - 1)
    if prompts is not None:
        tokens, cf, target, cf_target = (
            prompts.clean_tokens,
            prompts.cf_tokens,
            prompts.target_ids,
            prompts.cf_target_ids,
        )
        paths = nonpos_paths(model.cfg.n_layers)
        root = Node.final(model.cfg.n_layers, None)
    cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    metric = build_metric(cache, "logit_difference", root, target, cf_target)
    exact = ExactEvaluator(cache, metric, root, share_steps=False)
    t_min = 0.3 if quick else 1.0
    rows = []
    for label, path in paths:
        cands = predecessors(path[0], cache.shape)
        singles = cands[:: max(1, len(cands) // (20 if quick else 60))]
        attr = AttributionEvaluator(cache, metric, root, exact_complete=False, retired_bytes=0)
        r_exact = rate(lambda: exact.expand(path, cands), len(cands), t_min)  # noqa: B023 (called within the iteration)
        r_dense = dense_rate(lambda: exact.expand(path, cands), len(cands), t_min)  # noqa: B023
        r_single = rate(lambda: [exact.expand(path, [c]) for c in singles], len(singles), t_min)  # noqa: B023

        def attr_with_gradient() -> None:
            attr.release(path)  # noqa: B023 (recompute the frontier path's own VJP every call)
            attr.expand(path, cands)  # noqa: B023

        r_attr = rate(attr_with_gradient, len(cands), t_min)
        r_score = rate(lambda: attr.expand(path, cands), len(cands), t_min)  # noqa: B023
        r_level = r_level_paths = None
        if len(path) >= 3:
            level = [
                (p, predecessors(p[0], cache.shape)) for p in siblings(path, model.cfg.n_heads)
            ]
            n_level = sum(len(c) for _, c in level)
            r_level = rate(lambda: exact.expand_many(level), n_level, t_min)  # noqa: B023
            r_level_paths = rate(
                lambda: [exact.expand(p, c) for p, c in level],  # noqa: B023
                n_level,
                t_min,
            )
        rows.append(
            dict(
                model=name,
                path=label,
                n_candidates=len(cands),
                exact_batched=r_exact,
                exact_dense=r_dense,
                sparse_speedup=r_exact / r_dense,
                exact_one_at_a_time=r_single,
                speedup=r_exact / r_single,
                attribution_with_gradient=r_attr,
                attribution_scoring=r_score,
                exact_level=r_level,
                exact_level_per_path=r_level_paths,
            )
        )
        level_text = "" if r_level is None else f" {r_level:10.0f} {r_level_paths:10.0f}"
        print(
            f"{name:24s} {label:24s} {len(cands):5d} {r_dense:10.0f} {r_exact:10.0f} {r_single:9.0f} "
            f"{r_exact / r_single:7.1f}x {r_attr:10.0f} {r_score:10.0f}{level_text}",
            flush=True,
        )
    return rows


def end_to_end(
    quick: bool, profile: bool, device: str = "cpu", dtype: str = "float32"
) -> list[dict[str, Any]]:
    """``find_paths`` (threshold) evaluations per second on toy-ioi with its small prompt set."""
    from search.api import find_paths
    from search.strategies import Method, SearchParams

    try:
        from pathdb.models import load
        from pathdb.prompts import load_prompts

        model = load("toy-ioi", device=device, dtype=dtype)
        prompts = load_prompts("toy-ioi-small", model)
    except Exception as exc:  # the bundled model / prompts are not installed
        print(f"end-to-end skipped: toy-ioi unavailable ({exc})")
        return []
    rows = []
    runs: list[tuple[Method, bool, bool]] = [
        ("exact", True, False),
        ("exact", True, True),
        ("exact", False, False),
        ("exact", False, True),
        ("attribution", True, False),
        ("hybrid", True, False),
    ]
    for method, positional, dense in runs:
        params = SearchParams(
            strategy="threshold", method=method, min_contribution=0.05, max_time=60
        )
        best = 0.0
        n = 0
        ExactEvaluator.dense = dense
        try:
            for _ in range(1 if quick else 3):
                t0 = time.perf_counter()
                n = (
                    len(find_paths(model, prompts, params, positional=positional)) - 1
                )  # minus the root
                best = max(best, n / (time.perf_counter() - t0))
            label = f"{method}{' (dense, before)' if dense else ''}"
            rows.append(
                dict(
                    method=method,
                    positional=positional,
                    dense=dense,
                    min_contribution=0.05,
                    evaluated=n,
                    evaluations_per_s=best,
                    seconds=n / best,
                )
            )
            print(
                f"find_paths threshold {label:24s} positional={positional!s:5s} min_contribution=0.05 "
                f"{n:7d} paths {n / best:7.2f} s {best:9.0f} /s",
                flush=True,
            )
            if profile:
                prof = cProfile.Profile()
                prof.runcall(find_paths, model, prompts, params, positional=positional)
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        finally:
            ExactEvaluator.dense = False
    return rows


def main() -> None:
    """Run both model shapes and the end-to-end search, and write the JSON results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on this shared 2-core machine a second "
        "OpenMP thread makes small ops orders of magnitude slower under load)",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the end-to-end searches")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    ap.add_argument(
        "--dtype", default="float32", help="float32 (default), bfloat16, float16, float64"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    print(f"threads={torch.get_num_threads()} load average before: {load_before}")
    print(
        f"{'model':24s} {'frontier path':24s} {'cands':>5s} {'dense/s':>10s} {'exact/s':>10s} {'1-at-a-time/s':>9s} "
        f"{'speedup':>8s} {'attr+grad/s':>10s} {'attr score/s':>10s} {'level/s':>10s} "
        f"{'level 1-by-1/s':>10s}"
    )
    small, small_name = small_model(args.device, args.dtype)
    rows = bench(small, small_name, 8, 15, args.quick)
    if small_name == "toy-ioi":
        from pathdb.prompts import load_prompts

        rows += bench(
            small,
            "toy-ioi (toy-ioi-small)",
            8,
            15,
            args.quick,
            load_prompts("toy-ioi-small", small),
        )
    gpt2 = move_model(random_model(12, 12, 768, 3072, 50257), args.device, args.dtype)
    rows += bench(gpt2, "random GPT-2-small shape", 8, 15, args.quick)
    e2e = end_to_end(args.quick, args.profile, args.device, args.dtype)
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    meta = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        device=args.device,
        dtype=args.dtype,
        cpus=os.cpu_count(),
        load_average_before=load_before,
        load_average_after=load_after,
        metric="logit_difference",
        patch_type="counterfactual",
        batch=8,
        seq_len=15,
        exact_dense="ExactEvaluator.dense: the engine before issue 22, same run",
        one_at_a_time="same ExactEvaluator, expand(path, [c]) once per candidate, on an evenly "
        "spaced sample of the same candidate list",
        attribution_with_gradient="per call: release(path) then expand(path, all candidates): "
        "one VJP through path[0] + scoring",
        exact_level="expand_many of the frontier path and its siblings (every head in place of its "
        "last head), candidates per second; exact_level_per_path: the same paths one expand each",
        rates="best of 3 timed windows, candidates (or evaluated paths) per second",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=rows, end_to_end=e2e), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
