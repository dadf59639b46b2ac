"""Edge-masked evaluation, faithfulness curves, CPR/CMD, the held-out set and stored evaluations.

The masked forward is checked against an independent implementation written here from the
weights (LayerNorm, attention and MLP by hand, every receiver input assembled from per-sender
clean / corrupted outputs), on hand-picked and random circuits, for every intervention.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pathdb.evaluate.curves import CurveBuilder, evaluate_run, mib_counts
from pathdb.evaluate.graph import EdgeGraph, EvaluationError, full_edge_table
from pathdb.evaluate.heldout import HELDOUT_SET, heldout_examples, write_heldout
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.evaluate.results import (
    INTERVENTIONS,
    CurvePoint,
    Evaluation,
    edges_needed,
    score_label,
    trapezoid_areas,
)
from pathdb.evaluate.session import setup
from pathdb.evaluate.storage import latest_evaluation, save_evaluation
from pathdb.models import load
from pathdb.prompts import PromptSet, load_prompts, parse_prompts
from pathdb.query.aggregate import edges as edge_table
from pathdb.store.db import current_revision, migrate, open_store
from search import SearchParams, SearchRequest, run_loaded


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One torch thread (the evaluator's default in the CLI; faster on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ independent implementation
def _ln(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + b


def _sender_outputs(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    """Every sender's output in a plain run, by EAP-IG node name ([B, T, D])."""
    _, cache = model.run_with_cache(tokens)
    out = {"input": cache["hook_embed"]}
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for h in range(model.cfg.n_heads):
            out[f"a{layer}.h{h}"] = z[:, :, h] @ model.blocks[layer].attn.W_O[h]
        out[f"m{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def reference_metric(model: Any, prompts: PromptSet, circuit: set[str], intervention: str) -> float:
    """Mean logit-difference drop of the masked model, computed layer by layer from the weights."""
    cfg = model.cfg
    tokens = prompts.clean_tokens
    clean = _sender_outputs(model, tokens)
    if intervention == "counterfactual":
        corr = _sender_outputs(model, prompts.cf_tokens)
    elif intervention == "zero":
        corr = {k: torch.zeros_like(v) for k, v in clean.items()}
    elif intervention == "mean":
        corr = {k: v.mean((0, 1), keepdim=True).expand_as(v) for k, v in clean.items()}
    else:
        corr = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in clean.items()}
    n = tokens.shape[1]
    base = model.W_pos[:n][None].expand(tokens.shape[0], n, -1)  # never patched
    cur = {"input": model.W_E[tokens]}
    order = ["input"]

    def receive(dst: str, senders: list[str]) -> Tensor:
        x = base.clone()
        for s in senders:
            x = x + (cur[s] if f"{s}->{dst}" in circuit else corr[s])
        return x

    for layer in range(cfg.n_layers):
        blk = model.blocks[layer]
        a = blk.attn
        senders = list(order)
        for h in range(cfg.n_heads):
            q_in, k_in, v_in = (
                _ln(receive(f"a{layer}.h{h}<{s}>", senders), blk.ln1.w, blk.ln1.b, cfg.eps)
                for s in "qkv"
            )
            q = q_in @ a.W_Q[h] + a.b_Q[h]
            k = k_in @ a.W_K[h] + a.b_K[h]
            v = v_in @ a.W_V[h] + a.b_V[h]
            scores = q @ k.transpose(1, 2) / math.sqrt(cfg.d_head)
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            cur[f"a{layer}.h{h}"] = (scores.softmax(-1) @ v) @ a.W_O[h]
        base = base + a.b_O
        order += [f"a{layer}.h{h}" for h in range(cfg.n_heads)]
        x = _ln(receive(f"m{layer}", list(order)), blk.ln2.w, blk.ln2.b, cfg.eps)
        mlp = blk.mlp
        cur[f"m{layer}"] = F.gelu(x @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
        order.append(f"m{layer}")
    final = receive("logits", order)[:, -1]

    def ld(resid: Tensor) -> Tensor:
        logits = _ln(resid, model.ln_final.w, model.ln_final.b, cfg.eps) @ model.W_U + model.b_U
        return (
            logits.gather(1, prompts.target_ids[:, None])[:, 0]
            - logits.gather(1, prompts.cf_target_ids[:, None])[:, 0]
        )

    clean_final = model(tokens, stop_at_layer=cfg.n_layers)[:, -1]
    return float((ld(clean_final) - ld(final)).mean())


HAND_PICKED = {
    "one edge into logits": {"input->logits"},
    "q-edge": {"input->a1.h0<q>", "a1.h0->logits"},
    "k-edge": {"input->a1.h2<k>", "a1.h2->logits"},
    "v-edge": {"a0.h1->a1.h3<v>", "input->a0.h1<q>", "a1.h3->logits"},
    "MLP edge": {"input->m0", "m0->logits"},
    "head -> MLP, same layer": {"input->a0.h3<v>", "a0.h3->m0", "m0->m1", "m1->logits"},
}


@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_masked_forward_matches_hand_computation(
    model64: Any, prompts64: PromptSet, intervention: str
) -> None:
    ev = MaskedEvaluator(model64, prompts64, "logit_difference", intervention)
    graph = ev.graph
    names = [e for e, _, _ in graph.spec.edges]
    rng = random.Random(7)
    circuits = {
        **HAND_PICKED,
        "random 40": set(rng.sample(names, 40)),
        "full": set(names),
        "empty": set(),
    }
    got = ev.metric_values(np.stack([graph.mask(c) for c in circuits.values()]))
    for (label, circuit), value in zip(circuits.items(), got, strict=True):
        want = reference_metric(model64, prompts64, circuit, intervention)
        assert value == pytest.approx(want, abs=1e-5), label
    full, empty = got[-2], got[-1]
    assert full == pytest.approx(0.0, abs=1e-9)  # the full circuit is the clean model
    if intervention == "counterfactual":  # the empty circuit is the counterfactual run
        logits_c = model64(prompts64.clean_tokens)[:, -1]
        logits_r = model64(prompts64.cf_tokens)[:, -1]
        t, c = prompts64.target_ids[:, None], prompts64.cf_target_ids[:, None]
        drop = (logits_c.gather(1, t) - logits_c.gather(1, c)) - (
            logits_r.gather(1, t) - logits_r.gather(1, c)
        )
        assert empty == pytest.approx(float(drop.mean()), abs=1e-9)


def test_length_groups_and_circuit_batches(model64: Any) -> None:
    """Mixed-length prompts are evaluated per length group (weighted mean), circuits in chunks."""
    recs = [ex.to_record() for ex in heldout_examples()[::8][:4]]
    lengths = {len(r["roles"]) for r in recs}
    assert len(lengths) > 1
    text = "\n".join(json.dumps(r) for r in recs)
    mixed = parse_prompts(text, model64, "mixed", require_equal_length=False)
    ev = MaskedEvaluator(model64, mixed, "logit_difference", "counterfactual")
    names = [e for e, _, _ in ev.graph.spec.edges]
    masks = np.stack([ev.graph.mask(random.Random(i).sample(names, 30)) for i in range(3)])
    per_prompt = []
    for r in recs:
        one = parse_prompts(json.dumps(r), model64, "one")
        per_prompt.append(
            MaskedEvaluator(model64, one, "logit_difference", "counterfactual").metric_values(masks)
        )
    np.testing.assert_allclose(ev.metric_values(masks), np.mean(per_prompt, axis=0), atol=1e-9)
    import pathdb.evaluate.masked as masked

    budget = masked.MEMORY_BUDGET
    masked.MEMORY_BUDGET = 1  # one circuit per forward
    try:
        np.testing.assert_allclose(ev.metric_values(masks), np.mean(per_prompt, axis=0), atol=1e-9)
    finally:
        masked.MEMORY_BUDGET = budget


def test_bad_inputs_raise_clear_errors(model64: Any, prompts64: PromptSet) -> None:
    with pytest.raises(EvaluationError, match="unknown intervention 'resample'"):
        MaskedEvaluator(model64, prompts64, "logit_difference", "resample")
    ev = MaskedEvaluator(model64, prompts64, "logit_difference", "zero")
    with pytest.raises(EvaluationError, match=r"'a5\.h0->logits' is not an edge"):
        ev.graph.mask(["a5.h0->logits"])


# ------------------------------------------------------------------ areas
@pytest.mark.parametrize(
    ("column", "rule", "stored"),
    [("score", "effect", "score"), ("score", "group", "score [group]"),
     ("abs_score", "group", "abs_score [group]"), ("neg_score", "effect", "neg_score")],
)  # fmt: skip
def test_the_edge_rule_round_trips_through_the_stored_score(
    column: str, rule: str, stored: str
) -> None:
    """An evaluation records the rule it judged in ``score``; the CLI reads it back from there."""
    assert score_label(column, rule) == stored
    ev = Evaluation(0, "r", "p", True, "counterfactual", "m", stored, 1, 1, 1.0, 0.0)
    assert ev.edge_rule == (column, rule)


def test_cpr_cmd_are_mib_trapezoids_on_a_made_up_curve() -> None:
    fr = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    f = [0.0, 0.1, -0.2, 0.3, 0.5, 0.7, 1.2, 0.9, 1.0, 1.0]
    under, between = trapezoid_areas(fr, f)
    hand_under = (
        0.001 * (0.0 + 0.1) / 2 + 0.003 * (0.1 - 0.2) / 2 + 0.005 * (-0.2 + 0.3) / 2
        + 0.01 * (0.3 + 0.5) / 2 + 0.03 * (0.5 + 0.7) / 2 + 0.05 * (0.7 + 1.2) / 2
        + 0.1 * (1.2 + 0.9) / 2 + 0.3 * (0.9 + 1.0) / 2 + 0.5 * (1.0 + 1.0) / 2
    )  # fmt: skip
    hand_between = (
        0.001 * (1.0 + 0.9) / 2 + 0.003 * (0.9 + 1.2) / 2 + 0.005 * (1.2 + 0.7) / 2
        + 0.01 * (0.7 + 0.5) / 2 + 0.03 * (0.5 + 0.3) / 2 + 0.05 * (0.3 + 0.2) / 2
        + 0.1 * (0.2 + 0.1) / 2 + 0.3 * (0.1 + 0.0) / 2 + 0.5 * 0.0
    )  # fmt: skip
    assert under == pytest.approx(hand_under, abs=1e-12)
    assert between == pytest.approx(hand_between, abs=1e-12)
    assert under == pytest.approx(0.95965, abs=1e-12)
    pts = [
        CurvePoint("abs", k, None, n, 0.0, fa, "scan")
        for k, n, fa in [(5, 4, 0.85), (10, 9, 0.95), (20, 18, 0.8)]
    ]
    assert (
        edges_needed(pts, 0.8) == 4
        and edges_needed(pts, 0.9) == 9
        and edges_needed(pts, 0.99) is None
    )


def test_mib_counts_use_int_of_fraction_times_edges() -> None:
    assert [k for k, _, _ in mib_counts(479)] == [0, 0, 2, 4, 9, 23, 47, 95, 239, 479]


# ------------------------------------------------------------------ held-out set
def test_bundled_heldout_set_is_reproducible_and_disjoint(tmp_path: Path) -> None:
    from importlib.resources import files

    bundled = (files("pathdb.data") / "prompts" / f"{HELDOUT_SET}.jsonl").read_text()
    assert write_heldout(tmp_path).read_text() == bundled
    small = [
        json.loads(line)
        for line in (files("pathdb.data") / "prompts" / "toy-ioi-small.jsonl")
        .read_text()
        .splitlines()
    ]
    held = [json.loads(line) for line in bundled.splitlines()]
    assert len(held) == 56
    pair = lambda r: frozenset((r["target"], r["cf_target"]))  # noqa: E731
    assert not {pair(r) for r in small} & {pair(r) for r in held}
    assert not {r["clean"].split(",")[0] for r in held} & {r["clean"].split(",")[0] for r in small}


# ------------------------------------------------------------------ curves on toy-ioi
@pytest.fixture(scope="module")
def toy_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A small exact search on toy-ioi (threshold 0.1) in a fresh store."""
    db = tmp_path_factory.mktemp("ev") / "s.duckdb"
    model = load("toy-ioi", device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    run_loaded(
        SearchRequest(params=SearchParams(min_contribution=0.1)),
        model,
        prompts,
        db,
        run_name="exact",
        quiet=True,
    )
    return db, model


def test_exact_path_scores_beat_random_edge_scores(toy_store: tuple[Path, Any]) -> None:
    db, model = toy_store
    recs = [ex.to_record() for ex in heldout_examples()[::4]]  # 14 prompts, all 7 templates
    prompts = parse_prompts(
        "\n".join(json.dumps(r) for r in recs), model, "heldout-14", require_equal_length=False
    )
    builder = CurveBuilder(MaskedEvaluator(model, prompts, "logit_difference", "counterfactual"))
    with open_store(db, read_only=True) as store:
        table = full_edge_table(builder.graph, edge_table(store.con, "exact"))
    rand = table.assign(score=np.random.default_rng(0).normal(size=len(table)))
    reqs = mib_counts(builder.graph.n_edges)
    exact = builder.edge_curve(table, "abs", "abs", reqs)
    random_ = builder.edge_curve(rand, "abs", "abs", reqs)
    for e, r in zip(exact, random_, strict=True):
        if e.fraction is not None and e.fraction >= 0.05:
            assert e.faithfulness >= r.faithfulness - 1e-9, (e, r)
    assert exact[-1].faithfulness == pytest.approx(1.0)


def test_evaluation_survives_upgrade_and_is_queryable(
    toy_store: tuple[Path, Any], tmp_path: Path
) -> None:
    src, model = toy_store
    db = tmp_path / "old.duckdb"
    db.write_bytes(src.read_bytes())
    con = duckdb.connect(str(db))
    migrate(con, "0003", down=True)  # an older store: no evaluation tables
    assert "evaluations" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    con.close()
    with open_store(db) as store:  # upgrades
        assert current_revision(store.con) == "0009"
        s = setup(store.con, "exact", model=model)
        assert (s.prompts, s.heldout, s.warning) == (HELDOUT_SET, True, None)
        assert s.evaluator.n_prompts == 56
        ev = evaluate_run(
            store.con,
            "exact",
            s.evaluator,
            prompts=s.prompts,
            heldout=True,
            counts=[30],
            paths=False,
        )
        eid = save_evaluation(store.con, ev)
    assert 0 < ev.cpr < 1 and 0 <= ev.cmd < 1
    assert ev.edges_80 is not None and ev.edges_80 <= 479
    with open_store(db, read_only=True) as store:
        back = latest_evaluation(store.con, "exact")
        assert back is not None and back.evaluation_id == eid
        assert (back.cpr, back.cmd, back.edges_80, back.points) == (
            ev.cpr,
            ev.cmd,
            ev.edges_80,
            ev.points,
        )
        rows = store.con.execute(
            "SELECT e.cpr, count(*) FROM evaluations e JOIN evaluation_points p USING (evaluation_id) "
            "JOIN runs r USING (run_id) WHERE r.name = 'exact' AND p.curve = 'abs' GROUP BY e.cpr"
        ).fetchall()
        assert rows[0][0] == ev.cpr and rows[0][1] == len(ev.curve("abs"))
    with open_store(db) as store:  # a writable re-open keeps it
        assert latest_evaluation(store.con, "exact") == back
    con = duckdb.connect(str(db))
    migrate(con, "0003", down=True)
    migrate(con, "head")
    assert con.execute("SELECT count(*) FROM evaluations").fetchall() == [(0,)]
    con.close()


def test_own_prompts_warn_and_unknown_scores_refused(toy_store: tuple[Path, Any]) -> None:
    db, model = toy_store
    with open_store(db, read_only=True) as store:
        s = setup(store.con, "exact", prompts="toy-ioi-small", model=model)
        assert not s.heldout and s.warning is not None and "searched on" in s.warning
        with pytest.raises(EvaluationError, match="unknown edge score 'best'"):
            evaluate_run(
                store.con, "exact", s.evaluator, prompts=s.prompts, heldout=False, score="best"
            )


def test_full_edge_table_fills_unscored_edges_with_zero() -> None:
    graph = EdgeGraph.of(2, 4)
    scored = pd.DataFrame({"edge": ["input->logits", "a0.h1->a1.h2<k>"], "score": [2.0, -1.0]})
    t = full_edge_table(graph, scored)
    assert len(t) == graph.n_edges == 110
    assert t.set_index("edge").loc["a0.h1->a1.h2<k>", ["src", "dst", "src_kind", "dst_kind", "score"]].tolist() == [
        "a0.h1", "a1.h2", "attn", "attn", -1.0,
    ]  # fmt: skip
    assert (t["score"] != 0).sum() == 2
