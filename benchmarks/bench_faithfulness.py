"""Faithfulness of pathdb's circuits on held-out prompts (MIB's CPR / CMD, edges for 80% / 90%).

Searches the bundled ``toy-ioi`` (or ``--model toy-ioi-llama``) on ``toy-ioi-small`` (through
``search.runner.run_loaded``, the code path of ``pathdb search``), then evaluates each run's exported edge scores with the
edge-masked forward on the bundled held-out set ``toy-ioi-heldout`` (7 other templates, other
names; counterfactual patching, logit difference), exactly as ``pathdb evaluate RUN`` does.
Every configuration is searched twice: default and ``--split-kv``, and judged under three edge
rules: ``effect`` (the default of export and evaluate: every evaluated path on its first edge, kv
paths half on ``<k>``, half on ``<v>``), ``paths`` (complete kept paths through the edge, kv halved)
and ``paths, kv copied`` (the rule before issue 12 item 5: a kv path's full score on both edges).
``kv-rules`` compares k/v splits of the effect rule on the default search (the design measurement
of item 5). ``eap`` is the edge attribution patching baseline (every edge scored by a gradient, on
the same search prompts; on ``toy-ioi`` computed here with TransformerLens hooks, on other models
by ``pathdb attribute --method eap``'s code, since the hooks here assume one key/value head per
query head). Usage::

    python benchmarks/bench_faithfulness.py [--model toy-ioi-llama] [--configs exact,...,kv-rules,eap] [--out FILE]

Results are merged into the output file by model, run name and edge rule, so the configurations
can be run in separate invocations (each stays around a minute on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pathdb.evaluate.curves import CurveBuilder, areas, evaluate_run
from pathdb.evaluate.graph import EdgeGraph, full_edge_table
from pathdb.evaluate.heldout import HELDOUT_SET
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.evaluate.results import CurvePoint, edges_needed
from pathdb.evaluate.session import setup
from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.query import edges
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, run_loaded
from search.methods.eap import eap

CONFIGS: dict[str, dict[str, Any]] = {
    "exact": {"method": "exact"},
    "attribution": {"method": "attribution"},
    "hybrid": {"method": "hybrid"},
    "exact-best-first": {"method": "exact", "strategy": "best-first", "top_n": 100},
    "exact-level-width": {"method": "exact", "strategy": "level-width", "max_width": 100},
    "exact-t0.01": {"method": "exact", "min_contribution": 0.01},
    "attribution-t0.01": {"method": "attribution", "min_contribution": 0.01},
}
COUNTS = (50, 75, 100, 150, 200, 300)
MODELS = ("toy-ioi", "toy-ioi-llama")
RULES = ("effect", "paths", "paths, kv copied")
KV_WEIGHTS = ((0.5, 0.5), (1.0, 1.0), (0.0, 1.0), (0.1, 0.9), (0.25, 0.75))  # (k part, v part)


def rule_table(con: Any, run: str, rule: str, kv: tuple[float, float] = (0.5, 0.5)) -> pd.DataFrame:
    """The run's position-free edge scores under ``rule`` (a kv path's ``kv`` parts on <k>, <v>)."""
    t = edges(con, run, positional=False, rule="paths" if rule.startswith("paths") else "effect")
    shared = t["kv_paths"].gt(0) & t["kv_paths"].eq(t["n_paths"])  # rows of kv paths only
    if rule == "paths, kv copied":
        kv = (1.0, 1.0)
    for site, w in zip(("k", "v"), kv, strict=True):
        t.loc[shared & t["dst_site"].eq(site), "score"] *= 2 * w  # the store splits 0.5 / 0.5
    return t


def edge_graph(builder: CurveBuilder) -> EdgeGraph:
    """The builder's position-free graph (every circuit here is position-free)."""
    assert isinstance(builder.graph, EdgeGraph)
    return builder.graph


def curve_row(points: list[CurvePoint], cpr: float, cmd: float) -> dict[str, Any]:
    """CPR, CMD, edges for 80 / 90 % and the abs curve at :data:`COUNTS` of one set of curves."""
    abs_pts = [p for p in points if p.curve == "abs"]
    return {
        "cpr": round(cpr, 4), "cmd": round(cmd, 4),
        "edges_80": edges_needed(abs_pts, 0.8), "edges_90": edges_needed(abs_pts, 0.9),
        "faithfulness_abs_at": {p.k: round(p.faithfulness, 4) for p in abs_pts if p.source == "user"},
        "n_circuits": len(points),
    }  # fmt: skip


def search(
    name: str, split: bool, model_name: str, model: Any, prompts: Any, db: Path
) -> tuple[str, Any]:
    """Search configuration ``name`` (``--split-kv`` when ``split``) into ``db``."""
    run = f"{name}{'-split-kv' if split else ''}"
    params = SearchParams(split_kv=split, **({"min_contribution": 0.05} | CONFIGS[name]))
    req = SearchRequest(model=model_name, params=params)
    return run, run_loaded(req, model, prompts, db, run_name=run, quiet=True, replace=True)


def run_config(
    name: str, model_name: str, model: Any, prompts: Any, db: Path
) -> list[dict[str, Any]]:
    """Search ``name`` default and with --split-kv; judge each on toy-ioi-heldout under every rule
    (the ``effect`` row times one full ``pathdb evaluate`` curve, paths curve included)."""
    rows = []
    for split in (False, True):
        run, res = search(name, split, model_name, model, prompts, db)
        with open_store(db, read_only=True) as store:
            base = {
                "model": model_name, "run": run, "config": name, "split_kv": split, "search_s": round(res.wall_s, 2),
                "complete_kept_paths": res.n_kept_complete,
            }  # fmt: skip
            t0 = time.perf_counter()
            s = setup(store.con, run, model=model)
            ev = evaluate_run(
                store.con, run, s.evaluator, prompts=s.prompts, heldout=s.heldout, counts=COUNTS
            )
            curve_s = time.perf_counter() - t0
            builder = CurveBuilder(s.evaluator)
            for rule in RULES:
                t = rule_table(store.con, run, rule)
                if rule == "effect":
                    row = curve_row(ev.points, ev.cpr, ev.cmd) | {"curve_s": round(curve_s, 2)}
                else:
                    points = builder.edge_curves(full_edge_table(edge_graph(builder), t), COUNTS)
                    row = curve_row(points, *areas(points)) | {"curve_s": None}
                rows.append(
                    base | {"rule": rule, "scored_edges": int(t["score"].ne(0).sum())} | row
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def run_kv_rules(model_name: str, model: Any, prompts: Any, db: Path) -> list[dict[str, Any]]:
    """The k/v split of the effect rule on the default exact search: fixed splits, and the exact
    k-only / v-only scores of a ``--split-kv`` search."""
    rows = []
    for split in (False, True):
        run, res = search("exact", split, model_name, model, prompts, db)
        with open_store(db, read_only=True) as store:
            builder = CurveBuilder(setup(store.con, run, model=model).evaluator)
            for kv in KV_WEIGHTS[:1] if split else KV_WEIGHTS:
                t = rule_table(store.con, run, "effect", kv)
                points = builder.edge_curves(full_edge_table(edge_graph(builder), t), COUNTS)
                rows.append({
                    "model": model_name, "run": run, "config": "kv-rules", "split_kv": split, "search_s": round(res.wall_s, 2),
                    "complete_kept_paths": res.n_kept_complete,
                    "rule": "effect, exact k / v (split-kv search)" if split else f"effect, k/v = {kv[0]}/{kv[1]}",
                    "scored_edges": int(t["score"].ne(0).sum()), "curve_s": None,
                } | curve_row(points, *areas(points)))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def eap_scores(model: Any, prompts: Any, graph: EdgeGraph) -> pd.DataFrame:
    """Edge attribution patching (EAP) baseline: ``(clean - corrupted sender output) . d ld / d input``
    of the receiver, summed over positions, averaged over the prompts (positive = supports ld)."""
    cfg = model.cfg
    grads: dict[str, torch.Tensor] = {}

    def outputs(tokens: torch.Tensor) -> torch.Tensor:
        _, cache = model.run_with_cache(tokens)
        outs = [cache["hook_embed"]]
        for layer in range(cfg.n_layers):
            z = cache[f"blocks.{layer}.attn.hook_z"]
            outs += [z[:, :, h] @ model.blocks[layer].attn.W_O[h] for h in range(cfg.n_heads)]
            outs.append(cache[f"blocks.{layer}.hook_mlp_out"])
        return torch.stack(outs, 2).detach()  # [b, n, F, D]

    diff = outputs(prompts.clean_tokens) - outputs(prompts.cf_tokens)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)

    def keep(act: torch.Tensor, hook: Any) -> None:
        act.register_hook(lambda g, name=hook.name: grads.__setitem__(name, g.detach()))

    names = [f"blocks.{layer}.hook_{s}_input" for layer in range(cfg.n_layers) for s in "qkv"]
    names += [f"blocks.{layer}.hook_mlp_in" for layer in range(cfg.n_layers)]
    names.append(f"blocks.{cfg.n_layers - 1}.hook_resid_post")
    with torch.enable_grad():
        logits = model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(n, keep) for n in names])[
            :, -1
        ]
        ld = logits.gather(1, prompts.target_ids[:, None]) - logits.gather(
            1, prompts.cf_target_ids[:, None]
        )
        ld.mean().backward()
    model.set_use_split_qkv_input(False)
    model.set_use_hook_mlp_in(False)
    rows = []
    for edge, f, col in graph.spec.edges:
        dst = graph.spec.backward[col]
        if dst == "logits":
            g = grads[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
        elif dst.startswith("m"):
            g = grads[f"blocks.{int(dst[1:])}.hook_mlp_in"]
        else:
            layer, head = (int(x) for x in dst[1:].split("<")[0].split(".h"))
            g = grads[f"blocks.{layer}.hook_{dst[-2]}_input"][:, :, head]
        rows.append((edge, float((diff[:, :, f] * g).sum())))  # grads are of the mean ld
    return pd.DataFrame(rows, columns=["edge", "score"])


def library_eap_scores(model: Any, prompts: Any, graph: EdgeGraph) -> pd.DataFrame:
    """EAP as ``pathdb attribute --method eap`` computes it (the masked forward's gradient; any
    architecture the evaluator supports), as an ``edge, score`` table (positive = supports ld)."""
    res = eap(MaskedEvaluator(model, prompts, "logit_difference", "counterfactual"))
    return pd.DataFrame(
        [(edge, float(res.scores[f, col])) for edge, f, col in graph.spec.edges],
        columns=["edge", "score"],
    )


def run_eap(model_name: str, model: Any, prompts: Any) -> dict[str, Any]:
    """Score every edge with EAP on the search prompts and evaluate on toy-ioi-heldout."""
    heldout = load_prompts(HELDOUT_SET, model, require_equal_length=False)
    builder = CurveBuilder(MaskedEvaluator(model, heldout, "logit_difference", "counterfactual"))
    hooks = model_name == "toy-ioi"  # the toy-ioi row predates the library method
    t0 = time.perf_counter()
    graph = edge_graph(builder)
    scores = (eap_scores if hooks else library_eap_scores)(model, prompts, graph)
    table = full_edge_table(graph, scores)
    score_s = time.perf_counter() - t0
    points = builder.edge_curves(table, COUNTS)
    cpr, cmd = areas(points)
    run = "eap (edge attribution patching)" + ("" if hooks else ", pathdb attribute --method eap")
    row = {
        "model": model_name, "run": run, "config": "eap", "split_kv": None, "search_s": round(score_s, 2),
        "complete_kept_paths": None, "rule": "eap", "scored_edges": builder.graph.n_edges, "curve_s": None,
    } | curve_row(points, cpr, cmd)  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    """Run the chosen configurations and merge their rows into the results file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--configs",
        default=",".join([*CONFIGS, "kv-rules", "eap"]),
        help="comma-separated: " + ", ".join([*CONFIGS, "kv-rules", "eap"]),
    )
    ap.add_argument("--model", choices=MODELS, default="toy-ioi", help="bundled model to search")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "faithfulness.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load(args.model, device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for r in data.get("results", []):  # rows from before --model searched toy-ioi
        r.setdefault("model", "toy-ioi")
    results = {(r["model"], r["run"], r["rule"]): r for r in data.get("results", []) if "rule" in r}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            db = Path(tmp) / "f.duckdb"
            if name == "eap":
                rows = [run_eap(args.model, model, prompts)]
            elif name == "kv-rules":
                rows = run_kv_rules(args.model, model, prompts, db)
            else:
                rows = run_config(name, args.model, model, prompts, db)
            for row in rows:
                results[row["model"], row["run"], row["rule"]] = row
    order = [*CONFIGS, "kv-rules", "eap"]
    data = {
        "models": list(MODELS), "search_prompts": "toy-ioi-small", "eval_prompts": "toy-ioi-heldout (56)",
        "intervention": "counterfactual", "metric": "logit_difference", "min_contribution": "0.05 unless the config says",
        "threads": 1, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "results": sorted(results.values(), key=lambda r: (MODELS.index(r["model"]), order.index(r["config"]), bool(r["split_kv"]))),
    }  # fmt: skip
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
