"""Cost of the issue-11 architecture features: a Llama-3-shaped model next to the GPT-2-small shape.

Usage: ``nice -n 10 .venv/bin/python benchmarks/bench_arch.py [--quick] [--threads N]
[--layers L] [--threshold T] [--max-time S]``. Prints a table and writes
``benchmarks/results/arch.json``.

Models (random weights, float32, seeded; both with ``--layers`` layers, default 4, and a
1000-token vocabulary, so only the block shapes differ):

- GPT-2-small shape: 12 heads, d_model 768, d_head 64, d_mlp 3072, GELU MLP, LayerNorm, learned
  positions (``bench_engine.random_model``);
- Llama-3 shape: 16 query / 4 key-value heads (GQA), d_model 2048, d_head 128, SwiGLU d_mlp 8192,
  RMSNorm, rotary on the whole head (base 500000, Llama-3.1's NTK-by-parts scaling).

Prompts: 8 random prompts x 16 tokens, logit difference, counterfactual patching. Measured, as
``bench_engine.py`` measures them (its ``frontier_paths`` and ``rate`` helpers): exact batched,
attribution including the frontier path's VJP, and attribution scoring candidates/s for the depth-1
path ``[a<q>]`` and the depth-3 path ``[mlp, a<kv>, a<q>]``, over all of ``predecessors(path[0])``;
"wide chunks" is one timed exact call on an evenly spaced sample of ~120 of those candidates with
``ExactEvaluator(chunk_bytes=64 MiB)`` instead of the default 2 MiB (the default sizes candidate
chunks by their intermediates only, so a wide MLP's weights are re-read for every few candidates);
then one exact threshold search per model (``SearchRun``, the strategy ``pathdb search`` runs).

FLOPs per candidate (counted analytically; 2 per multiply-add, 1 per elementwise op; ``B``
prompts, every positional node works on one residual row per prompt; ``D`` d_model, ``dh`` d_head,
``F`` d_mlp, ``T`` tokens, ``r`` rotary dims, ``M`` = 3 MLP matrices if gated else 2)::

    norm      = 6D (LayerNorm) | 4D (RMSNorm)             rope = 3r (0 without rotary)
    act       = 8F (gelu_new) | 4F (SiLU) + F for the gate product
    MLP  node = 2D + norm + 2*M*D*F + act                   (x - m, LN2, W_in[/W_gate], W_out, f(x)-f(x-m))
    a<q> node = 2D + norm + 2*D*dh + dh + rope + 4*T*dh + 5T + 2*dh*D
                (query of one head, scores against all T cached keys, softmax, pattern @ v, W_O)
    a<kv> node (one source) = 2D + norm + 2*(2*D*dh + dh) + rope + 2dh + 5 + 3dh + 2*dh*D
                (key and value of one head from the perturbed source row, one score, W_O)
    metric    = norm + 4D + 1                              (ln_final, two unembedding columns)
    exact FLOP / candidate = B * (sum over the path's nodes + metric)
    attribution scoring FLOP / candidate = 2*B*D           (start message . gradient row)

GQA adds nothing per candidate: nodes are per *query* head and the seam expands the shared
key/value weights once, so an a<kv> node costs what an MHA head with the same ``dh`` costs.
Achieved FLOP/s = FLOP per candidate x candidates/s (the attribution VJP through ``path[0]`` is
not counted, so "attribution incl. gradient" has no FLOP/s column).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from bench_engine import frontier_paths, random_model, rate
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pathdb.graph import Node, NodeKind, predecessors
from pathdb.prompts import PromptRecord, PromptSet
from search.activations import ActivationCache
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, build_metric
from search.scorer import build_scorer
from search.sinks import MemorySink
from search.strategies import SearchParams, SearchRun, check_size

BATCH, SEQ, VOCAB = 8, 16, 1000
PATHS = ("depth1 [a<q>]", "depth3 [mlp,a<kv>,a<q>]")
WIDE_CHUNK = 64 * 2**20  # the "wide chunks" column: ExactEvaluator(chunk_bytes=64 MiB)


def llama_model(n_layers: int) -> HookedTransformer:
    """A seeded random Llama-3-shaped model (float32): GQA 16/4, SwiGLU, RMSNorm, rotary."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=2048, n_heads=16, d_head=128, n_key_value_heads=4, d_mlp=8192,
        d_vocab=VOCAB, n_ctx=64, act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_dim=128, rotary_adjacent_pairs=False, rotary_base=500000.0,
        use_NTK_by_parts_rope=True, NTK_by_parts_factor=8.0, NTK_by_parts_low_freq_factor=1.0,
        NTK_by_parts_high_freq_factor=4.0, NTK_original_ctx_len=8192,
        original_architecture="LlamaForCausalLM", seed=0,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def random_prompts(
    seed: int = 0, *, batch: int = BATCH, seq: int = SEQ, name: str = "random"
) -> PromptSet:
    """``batch`` random clean / counterfactual prompts of ``seq`` tokens (of a ``VOCAB``-token
    vocabulary) with random targets."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, VOCAB, (batch, seq), generator=g)
    cf = torch.randint(0, VOCAB, (batch, seq), generator=g)
    tgt = torch.randint(0, VOCAB, (batch,), generator=g)
    cft = torch.randint(0, VOCAB, (batch,), generator=g)
    recs = [
        PromptRecord(
            "",
            "",
            "",
            "",
            None,
            toks[i].tolist(),
            [""] * seq,
            cf[i].tolist(),
            int(tgt[i]),
            int(cft[i]),
            i + 1,
        )
        for i in range(batch)
    ]
    return PromptSet(recs, toks, cf, tgt, cft, torch.full((batch,), seq), name)


def node_flops(cfg: Any) -> dict[str, float]:
    """Per-row FLOPs of each node kind's exact step and of the metric (the docstring's formulas)."""
    D, dh, F, T = cfg.d_model, cfg.d_head, cfg.d_mlp, SEQ
    norm = 4 * D if cfg.normalization_type.startswith("RMS") else 6 * D
    rope = 3 * (cfg.rotary_dim or dh) if cfg.positional_embedding_type == "rotary" else 0
    n_mat = 3 if cfg.gated_mlp else 2
    act = (4 * F + F) if cfg.gated_mlp else 8 * F
    return {
        "mlp": 2 * D + norm + 2 * n_mat * D * F + act,
        "attn_q": 2 * D + norm + 2 * D * dh + dh + rope + 4 * T * dh + 5 * T + 2 * dh * D,
        "attn_kv": 2 * D + norm + 2 * (2 * D * dh + dh) + rope + 2 * dh + 5 + 3 * dh + 2 * dh * D,
        "final": 0,
        "metric": norm + 4 * D + 1,
    }


def path_flops(cfg: Any, path: tuple[Node, ...]) -> float:
    """FLOPs one exact candidate evaluation of ``(c, *path)`` computes, over all ``BATCH`` prompts."""
    f = node_flops(cfg)
    total = f["metric"]
    for n in path:
        if n.kind is NodeKind.MLP:
            total += f["mlp"]
        elif n.kind is NodeKind.ATTN:
            assert n.position is not None and (not n.is_kv or n.kv_position is not None)
            total += f["attn_kv"] if n.is_kv else f["attn_q"]
    return BATCH * total


def candidate_rates(
    model: HookedTransformer, name: str, prompts: PromptSet, quick: bool
) -> list[dict[str, Any]]:
    """Exact and attribution candidates/s (and FLOP/s) for the depth-1 and depth-3 frontier paths."""
    cache = ActivationCache.build(model, prompts.clean_tokens, prompts.cf_tokens, "counterfactual")
    root = Node.final(model.cfg.n_layers, SEQ - 1)
    metric = build_metric(
        cache, "logit_difference", root, prompts.target_ids, prompts.cf_target_ids
    )
    exact = ExactEvaluator(cache, metric, root)
    wide = ExactEvaluator(cache, metric, root, chunk_bytes=WIDE_CHUNK)
    t_min, reps = (0.3, 1) if quick else (1.0, 3)
    rows = []
    for label, path in frontier_paths(model.cfg.n_layers, SEQ):
        if label not in PATHS:
            continue
        cands = predecessors(path[0], cache.shape)
        attr = AttributionEvaluator(cache, metric, root, exact_complete=False)
        r_exact = rate(lambda: exact.expand(path, cands), len(cands), t_min, reps)  # noqa: B023 (called within the iteration)

        def attr_with_gradient() -> None:
            attr.release(path)  # noqa: B023 (recompute the frontier path's own VJP every call)
            attr.expand(path, cands)  # noqa: B023

        r_attr = rate(attr_with_gradient, len(cands), t_min, reps)
        r_score = rate(lambda: attr.expand(path, cands), len(cands), t_min, reps)  # noqa: B023
        sample = cands[:: max(1, len(cands) // 120)]
        wide.expand(path, sample[:2])  # warm-up (memoised per-head pieces)
        t0 = time.perf_counter()
        wide.expand(path, sample)
        r_wide = len(sample) / (time.perf_counter() - t0)
        n_rows = 1 if path[0].position is not None else SEQ  # message rows (chunk rule)
        flop = path_flops(model.cfg, path)
        flop_attr = 2 * BATCH * model.cfg.d_model
        rows.append(dict(
            model=name, path=label, n_candidates=len(cands), exact_flop_per_candidate=flop,
            exact_chunk=exact._chunk_size(path, n_rows), exact_batched=r_exact, exact_gflop_s=flop * r_exact / 1e9,
            exact_wide_chunk=wide._chunk_size(path, n_rows), exact_wide=r_wide, exact_wide_n=len(sample),
            exact_wide_gflop_s=flop * r_wide / 1e9, attribution_with_gradient=r_attr, attribution_scoring=r_score,
            attribution_flop_per_candidate=flop_attr, attribution_scoring_gflop_s=flop_attr * r_score / 1e9,
        ))  # fmt: skip
        print(f"{name:18s} {label:24s} {len(cands):5d} {flop / 1e6:8.2f}M {r_exact:8.0f} {flop * r_exact / 1e9:6.2f} "
              f"{r_wide:8.0f} {flop * r_wide / 1e9:6.2f} {r_attr:8.0f} {r_score:8.0f} {flop_attr * r_score / 1e9:6.2f}",
              flush=True)  # fmt: skip
    return rows


def threshold_search(
    model: HookedTransformer, name: str, prompts: PromptSet, threshold: float, max_time: float
) -> dict[str, Any]:
    """One exact threshold search (the scorer and strategy ``pathdb search`` uses); setup (activation
    cache, start-message banks) and search timed apart."""
    params = SearchParams(
        strategy="threshold", method="exact", min_contribution=threshold, max_time=max_time
    )
    t0 = time.perf_counter()
    scorer = build_scorer(model, prompts)
    check_size(params, scorer.root, scorer.shape)
    sink = MemorySink()
    t1 = time.perf_counter()
    stats = SearchRun(scorer, sink, params).run([sink.root(scorer.root)])
    search_s = time.perf_counter() - t1
    row = dict(model=name, method="exact", min_contribution=threshold, max_time=max_time, setup_s=t1 - t0,
               search_s=search_s, evaluated=stats.evaluated, expanded=stats.expanded, complete=stats.complete,
               kept_complete=stats.kept_complete, depth=stats.depth, stop_reason=stats.stop_reason,
               evaluations_per_s=stats.evaluated / search_s)  # fmt: skip
    print(
        f"{name:18s} threshold/exact t={threshold}: {stats.evaluated} evaluated, {stats.expanded} expanded, "
        f"{stats.kept_complete} complete kept, depth {stats.depth}, setup {t1 - t0:.1f} s, search {search_s:.1f} s "
        f"({stats.stop_reason}), {stats.evaluated / search_s:.0f}/s",
        flush=True,
    )
    return row


def main() -> None:
    """Both model shapes: candidate rates, one threshold search each; write the JSON results."""
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick", action="store_true", help="shorter timing windows (0.3 s, one window)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--layers", type=int, default=4, help="layers of both models (default 4)")
    ap.add_argument(
        "--threshold", type=float, default=0.15, help="threshold search min_contribution"
    )
    ap.add_argument("--max-time", type=float, default=90.0, help="cap per threshold search (s)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "arch.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    print(f"threads={torch.get_num_threads()} load average before: {load_before}")
    print(
        f"{'model':18s} {'frontier path':24s} {'cands':>5s} {'FLOP/cand':>9s} {'exact/s':>8s} {'GFLOP/s':>6s} "
        f"{'wide/s':>8s} {'GFLOP/s':>6s} {'attr+g/s':>8s} {'attr/s':>8s} {'GFLOP/s':>6s}"
    )
    prompts = random_prompts()
    rows, searches = [], []
    for name, build in (
        ("GPT-2-small shape", lambda: random_model(args.layers, 12, 768, 3072, VOCAB)),
        ("Llama-3 shape", lambda: llama_model(args.layers)),
    ):
        t0 = time.perf_counter()
        model = build()
        print(f"{name}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        rows += candidate_rates(model, name, prompts, args.quick)
        searches.append(threshold_search(model, name, prompts, args.threshold, args.max_time))
        del model
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                cpus=os.cpu_count(), load_average_before=load_before, load_average_after=load_after,
                nice=os.nice(0), n_layers=args.layers, d_vocab=VOCAB, batch=BATCH, seq_len=SEQ,
                metric="logit_difference", patch_type="counterfactual", quick=args.quick,
                flops="analytic, see the docstring of benchmarks/bench_arch.py",
                rates="best of the timed windows, candidates per second")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(dict(meta=meta, results=rows, threshold_search=searches), indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
