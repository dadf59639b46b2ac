"""Faithfulness of pathdb's circuits on held-out prompts (MIB's CPR / CMD, edges for 80% / 90%).

Searches the bundled ``toy-ioi`` (or ``--model toy-ioi-llama``) on ``toy-ioi-small`` (through
``search.runner.run_loaded``, the code path of ``pathdb search``), then evaluates each run's exported edge scores with the
edge-masked forward on the bundled held-out set ``toy-ioi-heldout`` (7 other templates, other
names; counterfactual patching, logit difference), exactly as ``pathdb evaluate RUN`` does.
Every configuration is searched twice: default and ``--split-kv``, and judged under five edge
rules: ``refined`` (the default of export and evaluate: ``group`` with each edge capped by its
sender's widest input chain and the top edges' order refined by masked forwards on the search
prompts, which the search stored), ``group`` (the effect rule with each receiver input's
edges summing to its group effect, which the search measured on its prompts and stored), ``effect``
(every evaluated path on its first edge, kv paths half on ``<k>``, half on ``<v>``), ``paths``
(complete kept paths through the edge, kv halved) and ``paths, kv copied`` (the rule before issue
12 item 5: a kv path's full score on both edges). ``group_effects_s`` and ``refine_s`` are the
parts of ``search_s`` spent measuring the stored group effects and refined scores (timed again
separately after the search).
``selection`` judges the default search's group scores and EAP's under MIB's two circuit
selections (top-n, pruned: the MIB default; greedy from the logits up: MIB's ``apply_greedy``), and
reports the faithfulness of circuits counted after pruning (the largest top-k whose pruned
circuit has at most N edges) beside MIB's count (top-N requested, then pruned). ``kv-rules`` compares k/v splits of the effect rule on the default search (the
design measurement of item 5): fixed splits, splits by first-order (EAP) shares and by the head's
k / v group effects, path sums on k/v edges, and the union-of-top-k-paths order. ``eap`` is the edge attribution patching baseline (every edge scored by a gradient, on
the same search prompts; on ``toy-ioi`` computed here with TransformerLens hooks, on other models
by ``pathdb attribute --method eap``'s code, since the hooks here assume one key/value head per
query head). ``rule-ideas`` takes the ``refined`` rule apart on the default search
(search-prompt quantities only): the group rule over exact single-edge effects, each of its two
steps alone, and the refinement's zone size. Usage::

    python benchmarks/bench_faithfulness.py [--model toy-ioi-llama] [--configs exact,...,kv-rules,eap,selection,rule-ideas] [--out FILE]

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

import numpy as np
import pandas as pd
import torch

from pathdb.evaluate.curves import SELECTIONS, CurveBuilder, areas, evaluate_run, path_edge_ranks
from pathdb.evaluate.graph import EdgeGraph, full_edge_table
from pathdb.evaluate.groups import (
    receiver_effects,
    rule_edges,
    rule_inputs,
    search_evaluator,
    search_group_effects,
)
from pathdb.evaluate.heldout import HELDOUT_SET
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.evaluate.refine import MAX, STEP, refine_order, refined_scores
from pathdb.evaluate.results import CurvePoint, edges_needed
from pathdb.evaluate.session import setup
from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.query import edges
from pathdb.query.common import resolve_run
from pathdb.query.edge_rules import group_rule, sender_capped
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
RULES = ("refined", "group", "effect", "paths", "paths, kv copied")
KV_WEIGHTS = ((0.5, 0.5), (1.0, 1.0), (0.0, 1.0), (0.1, 0.9), (0.25, 0.75))  # (k part, v part)
REFINE_STEPS = (5, 10, 15)  # zone sizes of the ranking refinement (rule-ideas; up to MAX edges)


def rule_table(
    con: Any, run: str, rule: str, kv: tuple[float, float] = (0.5, 0.5), model: Any = None
) -> pd.DataFrame:
    """The run's position-free edge scores under ``rule`` (a kv path's ``kv`` parts on <k>, <v>)."""
    if rule in ("group", "refined"):
        return rule_edges(con, run, rule, model)
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
) -> tuple[str, Any, tuple[float, float]]:
    """Search configuration ``name`` (``--split-kv`` when ``split``) into ``db``; also the seconds
    measuring the group effects and the refined scores take (parts of the search's wall time,
    timed again here)."""
    run = f"{name}{'-split-kv' if split else ''}"
    params = SearchParams(split_kv=split, **({"min_contribution": 0.05} | CONFIGS[name]))
    req = SearchRequest(model=model_name, params=params)
    res = run_loaded(req, model, prompts, db, run_name=run, quiet=True, replace=True)
    t0 = time.perf_counter()
    measured = search_group_effects(model, prompts, req.metric, req.patch_type)
    t1 = time.perf_counter()
    assert measured is not None
    with open_store(db, read_only=True) as store:
        refined_scores(store.con, resolve_run(store.con, run).run_id, measured[1], measured[0])
    return run, res, (t1 - t0, time.perf_counter() - t1)


def run_config(
    name: str, model_name: str, model: Any, prompts: Any, db: Path
) -> list[dict[str, Any]]:
    """Search ``name`` default and with --split-kv; judge each on toy-ioi-heldout under every rule
    (the default ``group`` row times one full ``pathdb evaluate`` curve, paths curve included)."""
    rows = []
    for split in (False, True):
        run, res, (effects_s, refine_s) = search(name, split, model_name, model, prompts, db)
        with open_store(db, read_only=True) as store:
            base = {
                "model": model_name, "run": run, "config": name, "split_kv": split, "search_s": round(res.wall_s, 2),
                "group_effects_s": round(effects_s, 2), "refine_s": round(refine_s, 2),
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
                t = rule_table(store.con, run, rule, model=model)
                if rule == "refined":  # the default: what `pathdb evaluate RUN` judges
                    assert ev.score == "score [refined]", ev.score
                    row = curve_row(ev.points, ev.cpr, ev.cmd) | {"curve_s": round(curve_s, 2)}
                else:
                    points = builder.edge_curves(full_edge_table(edge_graph(builder), t), COUNTS)
                    row = curve_row(points, *areas(points)) | {"curve_s": None}
                rows.append(
                    base | {"rule": rule, "scored_edges": int(t["score"].ne(0).sum())} | row
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def kv_shares(t: pd.DataFrame, share: Any) -> pd.DataFrame:
    """``t`` with each kv pair's total ``<k> + <v>`` score re-split: ``<k>`` gets ``share(edge)``."""
    t = t.copy()
    kv = t["dst_site"].isin(["k", "v"]) & t["kv_paths"].eq(t["n_paths"])
    pair = t["edge"].str[:-3]
    total = t["score"].where(kv, 0.0).groupby(pair).transform("sum")  # <k> + <v>, not <q>
    k = t.loc[kv, "edge"].map(share)
    t.loc[kv, "score"] = total[kv] * k.where(t.loc[kv, "dst_site"].eq("k"), 1 - k)
    return t


def candidate_tables(con: Any, run: str, model: Any) -> dict[str, pd.DataFrame]:
    """Edge tables of the k/v candidates on the search prompts' model quantities (never held-out):
    (a) k/v shares by first-order attribution ``|a_k| / (|a_k| + |a_v|)`` of the sender's edges
    (the masked forward's gradient), (b) by the head's k / v group effects, and the ``group`` rule;
    (d) the effect rule with path sums on k/v edges."""
    ev = search_evaluator(con, run, model)
    w = torch.zeros((1, *ev.graph.shape), requires_grad=True)
    with torch.enable_grad():
        ev.masked_metric(w).sum().backward()
    assert w.grad is not None
    grad = {n: abs(float(w.grad[0, f, b])) for n, f, b in ev.graph.spec.edges}
    group = receiver_effects(ev)
    eff = rule_table(con, run, "effect")
    p = rule_table(con, run, "paths")
    paths = dict(zip(p["edge"], p["score"], strict=True))
    head = {e: e.split("->")[1][:-3] for e in eff["edge"]}

    def first_order(e: str) -> float:
        k, v = grad[e[:-3] + "<k>"], grad[e[:-3] + "<v>"]
        return k / (k + v) if k + v else 0.5

    def by_group(e: str) -> float:
        k, v = abs(group[head[e] + "<k>"]), abs(group[head[e] + "<v>"])
        return k / (k + v) if k + v else 0.5

    kv_edge = eff["dst_site"].isin(["k", "v"])
    return {
        "effect, k/v by first-order (EAP) shares of the edge": kv_shares(eff, first_order),
        "effect, k/v by the head's k / v group effects": kv_shares(eff, by_group),
        "group": rule_edges(con, run, "group", model),
        "effect; path sums on k/v edges": eff.assign(
            score=eff["score"].where(~kv_edge, eff["edge"].map(paths).fillna(0.0))
        ),
    }


def path_order_row(builder: CurveBuilder, con: Any, run: str) -> dict[str, Any]:
    """Edges for 80% / 90% and faithfulness at :data:`COUNTS` edges of the union-of-top-k-paths
    circuits at every k (the order ``pathdb evaluate``'s ``paths`` curve samples)."""
    ranks = path_edge_ranks(con, resolve_run(con, run))
    ks = range(1, int(ranks["rank"].max()) + 1)
    circuits = [list(ranks.loc[ranks["rank"] <= k, "edge"]) for k in ks]
    metrics = builder.evaluate(circuits)
    pts = [(len(c), builder.faithfulness(m)) for c, m in zip(circuits, metrics, strict=True)]

    def needed(target: float) -> int | None:
        return min((n for n, f in pts if f >= target), default=None)

    at = {c: round(max((f for n, f in pts if n <= c), default=0.0), 4) for c in COUNTS}
    return {"cpr": None, "cmd": None, "edges_80": needed(0.8), "edges_90": needed(0.9),
            "faithfulness_abs_at": at, "n_circuits": len(pts), "max_edges": pts[-1][0]}  # fmt: skip


def run_kv_rules(model_name: str, model: Any, prompts: Any, db: Path) -> list[dict[str, Any]]:
    """The k/v split of the effect rule on the default exact search: fixed splits, model-computed
    splits, the group rule, path sums on k/v and the path order; and the exact k-only / v-only
    scores of a ``--split-kv`` search."""
    rows = []
    for split in (False, True):
        run, res, _ = search("exact", split, model_name, model, prompts, db)
        with open_store(db, read_only=True) as store:
            builder = CurveBuilder(setup(store.con, run, model=model).evaluator)
            tables = {
                "effect, exact k / v (split-kv search)" if split else f"effect, k/v = {kv[0]}/{kv[1]}":
                rule_table(store.con, run, "effect", kv) for kv in (KV_WEIGHTS[:1] if split else KV_WEIGHTS)
            } | ({} if split else candidate_tables(store.con, run, model))  # fmt: skip
            base = {"model": model_name, "run": run, "config": "kv-rules", "split_kv": split,
                    "search_s": round(res.wall_s, 2), "complete_kept_paths": res.n_kept_complete, "curve_s": None}  # fmt: skip
            for rule, t in tables.items():
                points = builder.edge_curves(full_edge_table(edge_graph(builder), t), COUNTS)
                row = {"rule": rule, "scored_edges": int(t["score"].ne(0).sum())}
                rows.append(base | row | curve_row(points, *areas(points)))
                print(json.dumps(rows[-1]), flush=True)
            if not split:
                row = {"rule": "union of the top-k paths (path order)", "scored_edges": None}
                rows.append(base | row | path_order_row(builder, store.con, run))
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


def pruned_budget_row(builder: CurveBuilder, table: pd.DataFrame) -> dict[int, float]:
    """Faithfulness at :data:`COUNTS` counted after pruning: for each N, the circuit of the largest
    top-k (by ``|score|``, the builder's selection) whose pruned circuit has at most N edges."""
    out = {}
    for n in COUNTS:
        k = n
        while k < len(table) and len(builder.select(table, k + 1, "abs")) <= n:
            k += 1
        m = builder.evaluate([builder.select(table, k, "abs")])[0]
        out[n] = round(builder.faithfulness(m), 4)
    return out


def run_selection(model_name: str, model: Any, prompts: Any, db: Path) -> list[dict[str, Any]]:
    """The default search's scores (its default rule, ``refined``) and EAP's, under MIB's top-n and
    greedy selections, with faithfulness at N edges counted MIB's way and after pruning."""
    run, res, _ = search("exact", False, model_name, model, prompts, db)
    with open_store(db, read_only=True) as store:
        ev = setup(store.con, run, model=model).evaluator
        assert isinstance(ev, MaskedEvaluator)
        tables = {"refined": full_edge_table(ev.graph, rule_edges(store.con, run, "refined"))}
    tables["eap"] = full_edge_table(ev.graph, eap_scores(model, prompts, ev.graph))
    rows = []
    for selection in SELECTIONS:
        builder = CurveBuilder(ev, selection)
        for rule, table in tables.items():
            points = builder.edge_curves(table, COUNTS)
            row = {"model": model_name, "run": f"{run} ({selection})" if rule == "refined" else
                   f"eap ({selection})", "config": "selection", "split_kv": False,
                   "search_s": round(res.wall_s, 2), "complete_kept_paths": None,
                   "rule": f"{rule}, {selection}", "scored_edges": int(table["score"].ne(0).sum()),
                   "curve_s": None}  # fmt: skip
            row |= curve_row(points, *areas(points))
            row["faithfulness_abs_at_pruned"] = pruned_budget_row(builder, table)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def masked_group_effects(model: Any, prompts: Any) -> dict[str, float]:
    """The group effects as the edge-masked forward gives them (one masked forward per receiver
    input, every edge into it corrupted): the route :func:`search_group_effects` replaced."""
    ev = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    real = ev.graph.real()
    cols = sorted({b for _, _, b in ev.graph.spec.edges})
    masks = [real]
    for b in cols:
        m = real.copy()
        m[:, b] = False
        masks.append(m)
    values = ev.metric_values(masks)  # type: ignore[arg-type]  # stacked by np.asarray
    return {
        ev.graph.spec.backward[b]: float(v - values[0])
        for b, v in zip(cols, values[1:], strict=True)
    }


def run_cost(model_name: str, model: Any, prompts: Any, db: Path) -> list[dict[str, Any]]:
    """Wall time of the default exact search with and without measuring and storing the group
    effects and the refined scores that start from them (``search.runner._group_effects``
    replaced by a no-op), and of measuring the effects alone
    (:func:`search_group_effects`) against the edge-masked route (:func:`masked_group_effects`),
    5 alternating rounds (medians); also the largest difference of the two routes' effects (the
    model's float32: rounding only, the float64 equality is tests/test_group_effects_fast.py)."""
    import search.runner as runner

    measure = runner._group_effects
    times: dict[str, list[float]] = {"with": [], "without": [], "fast": [], "masked": []}
    req = SearchRequest(model=model_name, params=SearchParams(min_contribution=0.05))
    effects: dict[str, dict[str, float]] = {}
    try:
        for _ in range(5):
            for mode in ("with", "without"):
                runner._group_effects = measure if mode == "with" else (lambda driver: None)
                t0 = time.perf_counter()
                run_loaded(req, model, prompts, db, run_name="cost", quiet=True, replace=True)
                times[mode].append(round(time.perf_counter() - t0, 2))
            for mode in ("fast", "masked"):
                t0 = time.perf_counter()
                if mode == "fast":
                    measured = search_group_effects(model, prompts, req.metric, req.patch_type)
                    assert measured is not None
                    got = measured[0]
                else:
                    got = masked_group_effects(model, prompts)
                times[mode].append(round(time.perf_counter() - t0, 3))
                effects[mode] = got
    finally:
        runner._group_effects = measure
    fast, masked = effects["fast"], effects["masked"]
    diff = max(abs(fast[r] - masked[r]) for r in masked)
    row = {"model": model_name, "run": "exact (search cost)", "config": "cost", "split_kv": False,
           "rule": "group effects (and refined scores) stored vs not", "search_s_with": sorted(times["with"])[2],
           "search_s_without": sorted(times["without"])[2],
           "group_effects_s": sorted(times["fast"])[2],
           "group_effects_masked_s": sorted(times["masked"])[2],
           "max_abs_diff_fast_vs_masked": diff, "dtype": str(model.cfg.dtype), "rounds": times}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def score_table(names: list[str], score: dict[str, float]) -> pd.DataFrame:
    """An ``effect``-layout table (edge, score and its abs / pos / neg parts) of per-edge scores."""
    s = pd.Series([score[n] for n in names], dtype=float)
    return pd.DataFrame({"edge": names, "score": s, "abs_score": s.abs(),
                         "pos_score": s.clip(lower=0), "neg_score": s.clip(upper=0)})  # fmt: skip


def exact_edge_effects(ev: MaskedEvaluator) -> dict[str, float]:
    """Each edge's own effect on ``ev``'s prompts, ``m(only this edge corrupted) - m(full)`` (the
    group effects' sign): one edge-masked forward per edge."""
    real = ev.graph.real()
    masks = [real]
    for _, f, b in ev.graph.spec.edges:
        m = real.copy()
        m[f, b] = False
        masks.append(m)
    values = ev.metric_values(np.stack(masks))
    return {
        name: float(v - values[0])
        for (name, _, _), v in zip(ev.graph.spec.edges, values[1:], strict=True)
    }


def refined_table(table: pd.DataFrame, ev: MaskedEvaluator, step: int) -> pd.DataFrame:
    """A full edge table with its top edges re-ordered by :func:`refine_order` (zones of ``step``)."""
    scores = refine_order(table, ev, step)
    return table.assign(score=table["edge"].map(scores).fillna(table["score"]))


def run_rule_ideas(model_name: str, model: Any, prompts: Any, db: Path) -> list[dict[str, Any]]:
    """The ``refined`` rule taken apart on the default exact search (every quantity on its search
    prompts, judged on the held-out set): the group rule, (1) the group rule over exact
    single-edge effects instead of the path-effect scores, (2) sender-capped scores alone, (3) the
    group ranking refined alone, and (2) + (3) (the ``refined`` rule) at several zone sizes;
    ``extra_s`` is what each adds to the stored group rule."""
    run, res, _ = search("exact", False, model_name, model, prompts, db)
    with open_store(db, read_only=True) as store:
        judge = CurveBuilder(setup(store.con, run, model=model).evaluator)
        ev = search_evaluator(store.con, run, model)
        graph = edge_graph(judge)
        group = full_edge_table(graph, rule_edges(store.con, run, "group", model))
        stored = full_edge_table(graph, rule_edges(store.con, run, "refined"))
        effects = rule_inputs(store.con, run, "group").effects
    assert effects is not None
    names = [name for name, _, _ in graph.spec.edges]
    t0 = time.perf_counter()
    exact = group_rule(score_table(names, exact_edge_effects(ev)), effects)
    capped = group.assign(score=sender_capped(group))
    tables = {"(0) group": (group, 0.0),
              "(1) group rule over exact single-edge effects": (full_edge_table(graph, exact), time.perf_counter() - t0),
              "(2) group, sender-capped (widest input chain)": (capped, 0.0)}  # fmt: skip
    t0 = time.perf_counter()
    tables[f"(3) group, refined on the search prompts (zones of {STEP}, to {MAX})"] = (
        refined_table(group, ev, STEP), time.perf_counter() - t0)  # fmt: skip
    for step in REFINE_STEPS:
        t0 = time.perf_counter()
        both = refined_table(capped, ev, step)
        extra_s = time.perf_counter() - t0
        if step == STEP:  # the default: what the search stored
            assert np.allclose(both["score"], stored["score"], rtol=1e-9, atol=0), (
                "stored != refined"
            )
        label = "refined (default)" if step == STEP else "(2) + (3)"
        tables[f"{label}: sender-capped, then refined (zones of {step}, to {MAX})"] = (
            both,
            extra_s,
        )
    rows = []
    for rule, (table, extra_s) in tables.items():
        points = judge.edge_curves(table, COUNTS)
        row = {"model": model_name, "run": run, "config": "rule-ideas", "split_kv": False,
               "search_s": round(res.wall_s, 2), "complete_kept_paths": res.n_kept_complete,
               "curve_s": None, "rule": rule, "extra_s": round(extra_s, 2),
               "scored_edges": int(table["score"].ne(0).sum())}  # fmt: skip
        rows.append(row | curve_row(points, *areas(points)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    """Run the chosen configurations and merge their rows into the results file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--configs",
        default=",".join([*CONFIGS, "kv-rules", "eap", "selection", "cost", "rule-ideas"]),
        help="comma-separated: "
        + ", ".join([*CONFIGS, "kv-rules", "eap", "selection", "cost", "rule-ideas"]),
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
            elif name == "selection":
                rows = run_selection(args.model, model, prompts, db)
            elif name == "cost":
                rows = run_cost(args.model, model, prompts, db)
            elif name == "rule-ideas":
                rows = run_rule_ideas(args.model, model, prompts, db)
            else:
                rows = run_config(name, args.model, model, prompts, db)
            for row in rows:
                results[row["model"], row["run"], row["rule"]] = row
    order = [*CONFIGS, "kv-rules", "eap", "selection", "cost", "rule-ideas"]
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
