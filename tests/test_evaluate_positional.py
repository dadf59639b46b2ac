"""Positional circuits (edges between (node, position) pairs, masked per position) against the
position-free evaluation and an independent TransformerLens hooks computation written here; the
``pathdb evaluate --positional`` CLI and its refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from pathdb.evaluate.graph import EvaluationError
from pathdb.evaluate.masked import MaskedEvaluator
from pathdb.evaluate.positional import PositionalEvaluator
from pathdb.prompts import PromptSet
from tests.arch_models import family_model
from tests.cli_process import pathdb
from tests.test_evaluate_arch import _ld, hooked_effect, random_prompts
from tests.test_methods import _senders

TOL = 1e-5
N = 6  # prompt length of the tiny-model tests


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("family", ["gpt2", "llama3", "gemma2", "neox"])
def test_full_empty_and_every_position_of_a_position_free_circuit(family: str) -> None:
    """Full positional circuit = clean, empty = corrupted; a position-free circuit with all its
    positions = the position-free evaluation (GQA, rotary, caps, windows, post-norms, parallel)."""
    model = family_model(family, seed=1)
    prompts = random_prompts(model, n=N)
    base = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    ev = PositionalEvaluator(base, N)
    full = base.graph.real()
    circuits = [full & (np.random.default_rng(s).random(full.shape) < 0.4) for s in range(2)]
    real = ev.graph.real()
    got = ev.metric_values(np.stack([real, ~real, *(ev.graph.expand(c) for c in circuits)]))
    assert prompts.cf_tokens is not None
    with torch.no_grad():
        clean = _ld(prompts, model(prompts.clean_tokens))
        corrupted = _ld(prompts, model(prompts.cf_tokens))
    assert abs(got[0]) < TOL
    assert abs(got[1] - float((clean - corrupted).mean())) < TOL
    want = base.metric_values(np.stack(circuits))
    assert np.abs(want).min() > 1e-2
    np.testing.assert_allclose(got[2:], want, atol=TOL, rtol=0)


def _hand_positional(model: Any, prompts: PromptSet, edge: str) -> float:
    """Mean ``ld(clean) - ld(patched)`` when one positional edge gets the counterfactual message,
    by hand on TL's own forward (grouped attention ungrouped; rotary through TL's tables)."""
    src, dst = edge.split("->")
    sender, pos = src.split("@")
    k = int(pos)
    assert prompts.cf_tokens is not None
    diff = (
        _senders(model, prompts.clean_tokens)[sender] - _senders(model, prompts.cf_tokens)[sender]
    )[:, k]
    comp, where = dst.split("@")
    hooks: list[tuple[str, Callable[..., Any]]]
    if comp in ("logits",) or comp.startswith("m"):
        name = (
            f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
            if comp == "logits"
            else f"blocks.{int(comp[1:])}.hook_mlp_in"
        )

        def at_pos(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[:, k] -= diff
            return act

        hooks = [(name, at_pos)]
    else:
        layer_s, rest = comp[1:].split(".h")
        head_s, site = rest.rstrip(">").split("<")
        layer, head = int(layer_s), int(head_s)
        attn, ln1 = model.blocks[layer].attn, model.blocks[layer].ln1
        if site == "q":

            def q_in(act: Tensor, hook: Any) -> Tensor:
                act = act.clone()
                act[:, k, head] -= diff
                return act

            hooks = [(f"blocks.{layer}.hook_q_input", q_in)]
        else:
            q = int(where.split(":")[0])
            seen: dict[str, Tensor] = {}

            def keep(act: Tensor, hook: Any) -> None:
                seen[hook.name.split(".")[-1]] = act

            def patched_input() -> Tensor:
                x = seen["hook_resid_pre"].clone()
                x[:, k] -= diff
                return ln1(x)

            def pattern(act: Tensor, hook: Any) -> Tensor:
                keys = patched_input() @ attn.W_K[head] + attn.b_K[head]  # [b, n, dh]
                if model.cfg.positional_embedding_type == "rotary":
                    keys = attn.apply_rotary(keys[:, :, None])[:, :, 0]
                qv = seen["hook_rot_q" if "hook_rot_q" in seen else "hook_q"][:, q, head]
                scores = torch.einsum("be,bne->bn", qv, keys[:, : q + 1]) / attn.attn_scale
                act = act.clone()
                act[:, head, q, : q + 1] = scores.softmax(-1)
                return act

            def z(act: Tensor, hook: Any) -> Tensor:
                v_new = patched_input()[:, k] @ attn.W_V[head] + attn.b_V[head]
                v_old = seen["hook_v"][:, k, head]
                act = act.clone()
                act[:, q, head] += seen["hook_pattern"][:, head, q, k, None] * (v_new - v_old)
                return act

            pre = f"blocks.{layer}"
            hooks = [(f"{pre}.hook_resid_pre", keep), (f"{pre}.attn.hook_q", keep),
                     (f"{pre}.attn.hook_rot_q", keep), (f"{pre}.attn.hook_v", keep)]  # fmt: skip
            if site == "k":
                hooks.append((f"{pre}.attn.hook_pattern", pattern))
            else:
                hooks += [(f"{pre}.attn.hook_pattern", keep), (f"{pre}.attn.hook_z", z)]
    return hooked_effect(model, prompts, hooks)


# a query at one position; a key and a value read by one query from one source (the same source
# for two queries: different edges); an MLP input; the logits
EDGES = [
    "a0.h1@3->a1.h2<q>@3", "input@2->a1.h3<k>@5:2", "input@2->a1.h3<k>@4:2",
    "a0.h0@1->a1.h1<v>@4:1", "m0@5->m1@5", "a1.h2@5->logits@5",
]  # fmt: skip


def test_one_positional_edge_matches_hooks() -> None:
    """Removing one positional edge from the full circuit = the hooks computation (Llama-3: GQA,
    rotary); a key edge acts on one query only."""
    model = family_model("llama3", seed=2)
    prompts = random_prompts(model, n=N, seed=4)
    ev = PositionalEvaluator(
        MaskedEvaluator(model, prompts, "logit_difference", "counterfactual"), N
    )
    real = ev.graph.real()
    got = ev.metric_values(np.stack([real & ~ev.graph.mask([e]) for e in EDGES]))
    want = [_hand_positional(model, prompts, e) for e in EDGES]
    assert min(abs(w) for w in want) > 1e-4
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert abs(got[1] - got[2]) > 1e-4  # one source, two queries: two edges


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """toy-ioi-2l: a positional path run, a position-free one and an ``eap`` edge run."""
    from pathdb.models import load
    from pathdb.prompts import load_prompts
    from search import SearchParams, SearchRequest, run_loaded
    from search.methods.run import AttributeRequest, attribute

    db = tmp_path_factory.mktemp("pos") / "s.duckdb"
    model = load("toy-ioi-2l", device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    for name, positional in (("pos", True), ("free", False)):
        req = SearchRequest(model="toy-ioi-2l", positional=positional,
                            params=SearchParams(min_contribution=0.05))  # fmt: skip
        run_loaded(req, model, prompts, db, run_name=name, quiet=True)
    attribute(AttributeRequest(method="eap", model="toy-ioi-2l", device="cpu"), db, run_name="eap")
    return db


def test_cli_evaluate_positional_run(runs: Path) -> None:
    """``pathdb evaluate RUN --positional`` stores a positional evaluation: the full circuit of every
    positional edge is faithful and the top positional paths reach 80% with a few edges."""
    from pathdb.store.db import open_store

    r = pathdb("evaluate", "pos", "--positional", "--db", str(runs), cwd=runs.parent)
    assert r.returncode == 0, r.stderr
    assert "CPR" in r.stdout and "searched on" in r.stderr
    with open_store(runs, read_only=True) as store:
        total, prompts = store.con.execute(
            "SELECT n_edges_total, prompts FROM evaluations ORDER BY evaluation_id DESC LIMIT 1"
        ).fetchall()[0]
        pts = store.con.execute(
            "SELECT curve, n_edges, faithfulness, fraction FROM evaluation_points ORDER BY point"
        ).fetchall()
    assert prompts.endswith("[positional]")
    assert total == 7376  # toy-ioi-2l's 110 edges over 15 positions
    full = [(n, f) for c, n, f, frac in pts if frac == 1.0]  # every edge (pruned of dead ends)
    assert len(full) == 2 and all(abs(f - 1) < 1e-4 and n < total for n, f in full)
    paths = [(n, f) for c, n, f, _ in pts if c == "paths"]
    assert any(f >= 0.8 and n < 0.01 * total for n, f in paths)


def test_positional_refused_for_position_free_edge_and_role_runs(
    runs: Path, tmp_path: Path
) -> None:
    """One line naming the run and the fix (CLI: before the model is loaded)."""
    import shutil

    from pathdb.evaluate.session import positional_length
    from pathdb.store.db import open_store

    r = pathdb("evaluate", "free", "--positional", "--db", str(runs), cwd=runs.parent)
    assert r.returncode != 0
    msg = r.stderr.strip()
    assert "position-free" in msg and "drop --positional" in msg and "Traceback" not in msg
    with open_store(runs, read_only=True) as store:
        with pytest.raises(EvaluationError, match="edge-score run") as err:
            positional_length(store.con, "eap")
        assert "\n" not in str(err.value)
        assert positional_length(store.con, "pos") == 15
    roles = tmp_path / "roles.duckdb"  # the same run on a role axis (as mixed-length runs store)
    shutil.copy(runs, roles)
    with open_store(roles) as store:
        store.con.execute(
            "INSERT INTO positions SELECT run_id, 0, 'BOS' FROM runs WHERE name = 'pos'"
        )
        with pytest.raises(EvaluationError, match="role-aligned positions"):
            positional_length(store.con, "pos")


def test_positional_prompts_of_another_length_are_refused() -> None:
    """Prompts whose length differs from the circuit's positions: one line with the fix."""
    model = family_model("gpt2", seed=1)
    base = MaskedEvaluator(model, random_prompts(model, n=N), "logit_difference", "counterfactual")
    with pytest.raises(EvaluationError, match="exactly 7 tokens") as err:
        PositionalEvaluator(base, N + 1)
    assert "\n" not in str(err.value)
