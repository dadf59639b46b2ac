"""Mean patching on prompt sets of different token lengths (issue 10).

The reference output of a sender is the mean over the whole prompt set at each role position (over
the prompts that have it; a key/value source's output over the prompts with both positions), or,
without roles, at each offset from the last token. Batch scores must be the mean of per-prompt
scores patched against that same reference, which the tests compute independently with
TransformerLens hooks (exact: re-run patching; attribution: a central difference of the exact
score along the start message). Equal-length sets keep the batch mean position by position.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from pathdb.graph import Node, predecessors
from pathdb.models import load
from pathdb.positions import UNLABELLED, token_names
from pathdb.prompts import PromptSet, load_prompts, parse_prompts
from pathdb.store.db import open_store
from search.scorer import LengthGroupedScorer, PromptScorer, RoleAlignedScorer, build_scorer
from tests.cli_process import ROOT, pathdb
from tests.reference_hooks import full_cache, logit_difference, sender_output, step

LARGE = ROOT / "pathdb" / "data" / "prompts" / "toy-ioi-large.jsonl"


@pytest.fixture(scope="module")
def model() -> Any:
    return load("toy-ioi-2l", dtype="float64")


@pytest.fixture(scope="module")
def mixed(model: Any) -> PromptSet:
    """Eight toy-ioi-large prompts: two role layouts of each length 15-18, interleaved."""
    every = load_prompts("toy-ioi-large", model, require_equal_length=False)
    by_len: dict[int, dict[tuple[str, ...], int]] = {}
    for i, r in enumerate(every.records):
        by_len.setdefault(len(r.tokens), {}).setdefault(tuple(r.roles or []), i)
    picked = [list(layouts.values())[j] for j in range(2) for _, layouts in sorted(by_len.items())]
    chosen = every.select(picked)
    assert (
        len({int(n) for n in chosen.lengths}) == 4
        and len({tuple(r.roles or []) for r in chosen.records}) == 8
    )
    return chosen


@pytest.fixture(scope="module")
def caches(model: Any, mixed: PromptSet) -> list[dict[str, Tensor]]:
    """Every hook activation of each prompt's clean run (TransformerLens, one prompt at a time)."""
    return [full_cache(model, torch.tensor([r.tokens])) for r in mixed.records]


def _translate(node: Node, names: Sequence[str], axis: Sequence[str]) -> Node | None:
    """``node`` (axis positions) at one prompt's token indices, from that prompt's own names."""
    if node.position is None:
        return node
    index = {n: i for i, n in enumerate(names)}
    pos = index.get(axis[node.position])
    kv = node.kv_position
    if kv is not None:
        kv = index.get(axis[kv])
        if kv is None or pos is None or kv > pos:
            return None
    return None if pos is None else Node(node.kind, node.layer, node.head, node.site, pos, kv)


def _start_messages(
    model: Any, caches: list[dict[str, Tensor]], names: list[list[str]], start: list[Node | None]
) -> list[Tensor | None]:
    """Per prompt, ``out - reference`` of its start node (``[1, T, D]``, None where it has none),
    the reference averaged over the prompts that have each position name."""
    outs = [
        None if n is None else sender_output(model, c, n)[0]
        for c, n in zip(caches, start, strict=True)
    ]
    acc: dict[str, list[Tensor]] = {}
    for out, nm, node in zip(outs, names, start, strict=True):
        if out is None or node is None:
            continue
        rows = range(len(nm)) if node.position is None else [node.position]
        for t in rows:
            acc.setdefault(nm[t], []).append(out[t])
    mean = {n: torch.stack(v).mean(0) for n, v in acc.items()}
    msgs: list[Tensor | None] = []
    for out, nm, node in zip(outs, names, start, strict=True):
        if out is None or node is None:
            msgs.append(None)
            continue
        m = out.clone()
        for t in range(len(nm)) if node.position is None else [node.position]:
            m[t] = m[t] - mean[nm[t]]
        msgs.append(m[None])
    return msgs


def _hook_score(
    model: Any, rec: Any, cache: dict[str, Tensor], path: Sequence[Node], msg: Tensor
) -> float:
    """Exact score ``ld(clean) - ld(clean - m)`` of one prompt whose start message is ``msg``."""
    tokens = torch.tensor([rec.tokens])
    m = msg
    for node in path[1:]:
        m = step(model, tokens, cache, node, m)
    root = tokens.shape[1] - 1 if path[-1].position is None else path[-1].position
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, root]
    t, cf = torch.tensor([rec.target_id]), torch.tensor([rec.cf_target_id])
    with torch.no_grad():
        return float(
            logit_difference(model, final, t, cf)[0]
            - logit_difference(model, final - m[:, root], t, cf)[0]
        )


def _reference_batch_score(
    model: Any,
    prompts: PromptSet,
    caches: list[dict[str, Tensor]],
    names: list[list[str]],
    axis: Sequence[str],
    path: Sequence[Node],
    method: str,
) -> float:
    """Mean over prompts of the path's score against the whole-set mean (0 where a prompt lacks it);
    attribution is the derivative of the exact score along the start message (central difference)."""
    moved = [[_translate(n, nm, axis) for n in path] for nm in names]
    whole = [None if any(n is None for n in p) else [n for n in p if n is not None] for p in moved]
    msgs = _start_messages(model, caches, names, [None if p is None else p[0] for p in whole])
    total, eps = 0.0, 1e-4
    for rec, cache, p, m in zip(prompts.records, caches, whole, msgs, strict=True):
        if p is None or m is None:
            continue
        if method == "attribution":
            up, down = (
                _hook_score(model, rec, cache, p, eps * m),
                _hook_score(model, rec, cache, p, -eps * m),
            )
            total += (up - down) / (2 * eps)
        else:
            total += _hook_score(model, rec, cache, p, m)
    return total / len(prompts)


def _random_paths(scorer: Any, names: list[list[str]], n: int, seed: int) -> list[tuple[Node, ...]]:
    """``n`` random paths to the root (2-3 nodes): at least a third starting at a key/value source
    and a third through a position some prompts lack (when such paths exist)."""
    rng, axis = random.Random(seed), getattr(scorer, "position_names", ())
    pool: list[tuple[Node, ...]] = []
    for _ in range(300):
        path = [scorer.root]
        for _ in range(rng.randint(1, 2)):
            senders = predecessors(path[-1], scorer.shape)
            if not senders:
                break
            path.append(rng.choice(senders))
        pool.append(tuple(reversed(path)))
    pool = list(dict.fromkeys(p for p in pool if len(p) > 1))
    kv = [p for p in pool if p[0].kv_position is not None]
    partial = [p for p in pool if any(_translate(x, nm, axis) is None for nm in names for x in p)]
    picked = kv[: n // 3] + partial[: n // 3]
    return picked + [p for p in pool if p not in picked][: n - len(picked)]


@pytest.fixture(scope="module")
def scorers(model: Any, mixed: PromptSet) -> dict[bool, Any]:
    """Mean-patching scorers of the mixed set, positional (roles) and position-free."""
    return {p: build_scorer(model, mixed, patch_type="mean", positional=p) for p in (True, False)}


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_batch_score_is_the_mean_against_the_whole_set_mean(
    model: Any,
    mixed: PromptSet,
    caches: list[dict[str, Tensor]],
    scorers: dict[bool, Any],
    positional: bool,
    method: str,
) -> None:
    scorer = scorers[positional]
    assert isinstance(scorer, RoleAlignedScorer if positional else LengthGroupedScorer)
    assert len(scorer.groups) == 4
    names = [token_names(r.roles or []) for r in mixed.records]
    axis = scorer.position_names if isinstance(scorer, RoleAlignedScorer) else ()
    paths = _random_paths(scorer, names, 5, seed=5)
    if positional:
        assert any(p[0].kv_position is not None for p in paths)
        assert any(_translate(x, nm, axis) is None for p in paths for nm in names for x in p)
    expand = scorer.expand_attribution if method == "attribution" else scorer.expand_exact
    for path in paths:
        got = float(expand(path[1:], [path[0]])[0])
        want = _reference_batch_score(model, mixed, caches, names, axis, path, method)
        assert got == pytest.approx(want, abs=1e-5), path


def test_without_roles_the_mean_aligns_by_offset_from_the_last_token(
    model: Any, mixed: PromptSet, caches: list[dict[str, Tensor]], tmp_path: Path
) -> None:
    lines = {x["clean"]: x for x in map(json.loads, LARGE.read_text().splitlines())}
    bare = [{k: v for k, v in lines[r.clean].items() if k != "roles"} for r in mixed.records]
    plain = parse_prompts("\n".join(json.dumps(x) for x in bare), model, "bare.jsonl")
    assert not plain.has_roles and [r.tokens for r in plain.records] == [
        r.tokens for r in mixed.records
    ]
    with pytest.raises(ValueError, match=r'add "roles".*--no-positional'):
        build_scorer(model, plain, patch_type="mean", positional=True)
    scorer = build_scorer(model, plain, patch_type="mean", positional=False)
    ends = [token_names([UNLABELLED] * (len(r.tokens) - 1) + ["END"]) for r in plain.records]
    roles = [token_names(r.roles or []) for r in mixed.records]
    assert ends != roles  # the two alignments average different tokens together
    cands = [
        Node.embed(None),
        Node.mlp(0, None),
        Node.attn(0, 1, "q", None),
        Node.attn(1, 2, "kv", None),
    ]
    root = (scorer.root,)
    for node, got in zip(cands, scorer.expand_exact(root, cands), strict=True):
        assert got == pytest.approx(
            _reference_batch_score(model, plain, caches, ends, (), (node, *root), "exact"), abs=1e-5
        )
    for node, got in zip(cands, scorer.expand_attribution(root, cands), strict=True):
        assert got == pytest.approx(
            _reference_batch_score(model, plain, caches, ends, (), (node, *root), "attribution"),
            abs=1e-5,
        )


def test_equal_length_mean_is_the_batch_mean_position_by_position(model: Any) -> None:
    """Equal lengths keep the old path (no shared mean): every bank is bit-identical to
    ``out - out.mean over the batch`` at each position, and the bank is all that patching sets."""
    small = load_prompts("toy-ioi-small", model)
    assert small.equal_length and small.has_roles
    for positional, positions in ((True, [0, 4, 14]), (False, [None])):
        scorer = build_scorer(model, small, patch_type="mean", positional=positional)
        assert isinstance(scorer, PromptScorer) and scorer.cache.mean_reference is None
        for p in positions:
            out = scorer.cache._sender_outputs(scorer.cache.clean, p)
            assert torch.equal(scorer.cache.bank(p).messages, out - out.mean(dim=1, keepdim=True))


def test_cli_mean_patching_on_a_mixed_length_set(tmp_path: Path) -> None:
    args = [
        "-m",
        "toy-ioi-2l",
        "-p",
        "toy-ioi-large",
        "--patch",
        "mean",
        "-t",
        "0.3",
        "--db",
        "s.duckdb",
    ]
    res = pathdb("search", *args, "-q", "-n", "mean", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        run = store.con.execute("SELECT status, patch_type, n_complete FROM runs").fetchall()
        lengths = store.con.execute(
            "SELECT DISTINCT len(tokens) FROM prompts ORDER BY 1"
        ).fetchall()
        labels = {lab for (lab,) in store.con.execute("SELECT label FROM nodes").fetchall()}
    assert run[0][:2] == ("completed", "mean") and run[0][2] > 0
    assert [n for (n,) in lengths] == [15, 16, 17, 18]
    assert "logits@END" in labels and any(lab.endswith(":S2") for lab in labels)
