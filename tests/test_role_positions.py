"""Positional batch searches over prompts of different lengths, positions aligned by role (issue 10).

A role path's batch score must be the mean over prompts of the same path scored on each prompt
alone at that prompt's token indices (translated here from the prompt's own role labels), checked
against the engine on single prompts and against TransformerLens hooks; a position a prompt lacks
scores 0 there. Stores keep role names in node labels and the ``positions`` table; resume after
SIGKILL equals an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pathdb.graph import Node
from pathdb.models import load
from pathdb.positions import PositionAxis, RoleError, token_names
from pathdb.prompts import PromptFileError, PromptSet, load_prompts, parse_prompts
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, run_loaded
from search.api import find_paths
from search.scorer import PromptScorer, RoleAlignedScorer, build_scorer
from tests.cli_process import ROOT, pathdb
from tests.reference_hooks import full_cache, score_logit_difference

LARGE = ROOT / "pathdb" / "data" / "prompts" / "toy-ioi-large.jsonl"


@pytest.fixture(scope="module")
def model() -> Any:
    return load("toy-ioi-2l")


@pytest.fixture(scope="module")
def mixed(model: Any) -> PromptSet:
    """Six prompts of toy-ioi-large: lengths 15-18, ABBA and BABA layouts, interleaved."""
    every = load_prompts("toy-ioi-large", model, require_equal_length=False)
    seen: dict[tuple[str, ...], int] = {}
    for i, r in enumerate(every.records):
        seen.setdefault(tuple(r.roles or []), i)
    by_len: dict[int, list[int]] = {}
    for i in sorted(seen.values()):
        by_len.setdefault(len(every.records[i].tokens), []).append(i)
    picked = [i for _, ix in sorted(by_len.items())[:3] for i in ix[:2]]
    chosen = every.select(picked)
    assert len({int(n) for n in chosen.lengths}) == 3 and len(picked) == 6
    return chosen


def _translate(node: Node, names: list[str], axis: tuple[str, ...]) -> Node | None:
    """``node`` (axis positions) at one prompt's token indices, from that prompt's own names."""
    if node.position is None:
        return node
    index = {n: i for i, n in enumerate(names)}
    pos = index.get(axis[node.position])
    if pos is None:
        return None
    kv = node.kv_position
    if kv is not None:
        kv = index.get(axis[kv])
        if kv is None or kv > pos:
            return None
    return Node(node.kind, node.layer, node.head, node.site, pos, kv)


def _per_prompt(
    singles: list[Any],
    prompts: PromptSet,
    path: tuple[Node, ...],
    axis: tuple[str, ...],
    method: str,
) -> list[float]:
    """The path's score on each prompt alone (0 where the prompt lacks one of its positions);
    ``singles[i]`` scores prompt i alone, rooted at its last token (the END role)."""
    out = []
    for single, r in zip(singles, prompts.records, strict=True):
        moved = [_translate(n, token_names(r.roles or []), axis) for n in path]
        if any(n is None for n in moved):
            out.append(0.0)
            continue
        nodes = tuple(n for n in moved if n is not None)
        assert nodes[-1] == single.root
        fn = single.expand_attribution if method == "attribution" else single.expand_exact
        out.append(float(fn(nodes[1:], [nodes[0]])[0]))
    return out


def test_token_names_and_axis() -> None:
    roles = ["BOS", "-", "IO", "-", "S1", "-", "-", "S2", "-", "END", "-"]
    assert token_names(roles) == [
        "BOS",
        "IO-1",
        "IO",
        "S1-1",
        "S1",
        "S2-2",
        "S2-1",
        "S2",
        "END-1",
        "END",
        "END+1",
    ]
    abba = ["BOS", "-", "IO", "-", "S1", "-", "S2", "END"]
    baba = ["BOS", "-", "S1", "-", "IO", "-", "-", "S2", "END"]
    axis = PositionAxis.from_roles([abba, baba])
    s2, end, io, s1 = (axis.resolve(n) for n in ("S2", "END", "IO", "S1"))
    assert [axis.layouts[0].index(p) for p in (s2, end)] == [6, 7]
    assert [axis.layouts[1].index(p) for p in (s2, end)] == [7, 8]
    assert axis.last() == end and axis.resolve(str(end)) == end
    sources = axis.kv_sources()
    assert s1 in sources[io] and io in sources[s1]  # the swap is causal in one layout each way
    assert end not in sources[s2]
    with pytest.raises(RoleError, match="unknown role position 'S3'"):
        axis.resolve("S3")


def test_role_labels_are_validated(model: Any) -> None:
    line = json.loads(LARGE.read_text().splitlines()[0])
    dup = dict(line, roles=["S2" if r == "S1" else r for r in line["roles"]])
    with pytest.raises(
        PromptFileError, match=r"role .S2. labels tokens 4 and 10.*Fix: each role names one token"
    ):
        parse_prompts(json.dumps(dup), model, "dup.jsonl")
    bad = dict(line, roles=["1x" if r == "IO" else r for r in line["roles"]])
    with pytest.raises(PromptFileError, match=r"field .roles.*not a name"):
        parse_prompts(json.dumps(bad), model, "bad.jsonl")
    short = dict(line, roles=line["roles"][:-1])
    with pytest.raises(PromptFileError, match="14 labels but the clean prompt has 15 tokens"):
        parse_prompts(json.dumps(short), model, "short.jsonl")


@pytest.mark.parametrize("method", ["exact", "attribution"])
@pytest.mark.parametrize("patch", ["counterfactual", "zero"])
def test_batch_score_is_the_mean_of_per_prompt_scores(
    model: Any, mixed: PromptSet, method: str, patch: str
) -> None:
    scorer = build_scorer(model, mixed, patch_type=patch, positional=True)
    assert isinstance(scorer, RoleAlignedScorer) and len(scorer.groups) == 3  # one per length
    assert sum(len(lays) for lays in scorer.layouts) == len(mixed)  # one layout per prompt
    params = SearchParams(method=method, min_contribution=0.15)  # type: ignore[arg-type]
    found = find_paths(model, mixed, params, patch_type=patch, positional=True)
    scored = [p for p in found if len(p.path) > 1]
    assert any(p.complete for p in scored) and any(not p.complete for p in scored)
    axis = scorer.position_names
    singles = [build_scorer(model, mixed.subset(i), patch_type=patch) for i in range(len(mixed))]
    for p in random.Random(2).sample(scored, min(12, len(scored))):
        per = _per_prompt(singles, mixed, p.path, axis, p.method)
        assert p.contribution == pytest.approx(sum(per) / len(per), abs=1e-5), p.path


def test_exact_role_scores_match_transformerlens_hooks(model: Any, mixed: PromptSet) -> None:
    """Independent check: each prompt's translated path patched with TL hooks, then averaged."""
    found = find_paths(model, mixed, SearchParams(min_contribution=0.15), positional=True)
    axis = build_scorer(model, mixed, positional=True).position_names  # type: ignore[union-attr]
    complete = [p for p in found if p.complete][:4]
    assert complete
    caches = [
        (
            torch.tensor([r.tokens]),
            full_cache(model, torch.tensor([r.tokens])),
            full_cache(model, torch.tensor([r.cf_tokens])),
        )
        for r in mixed.records
    ]
    for p in complete:
        total = 0.0
        for r, (tokens, clean_c, cf_c) in zip(mixed.records, caches, strict=True):
            names = token_names(r.roles or [])
            nodes = [_translate(n, names, axis) for n in p.path]
            if any(n is None for n in nodes):
                continue
            s = score_logit_difference(
                model,
                tokens,
                clean_c,
                cf_c,
                "counterfactual",
                [n for n in nodes if n is not None],
                torch.tensor([r.target_id]),
                torch.tensor([r.cf_target_id]),
            )
            total += float(s[0].detach())
        assert p.contribution == pytest.approx(total / len(mixed.records), abs=1e-4)


def test_a_position_missing_in_some_prompts_scores_zero_there(model: Any, tmp_path: Path) -> None:
    lines = [json.loads(s) for s in LARGE.read_text().splitlines()]
    a = next(x for x in lines if len(x["roles"]) == 15)
    b = next(x for x in lines if len(x["roles"]) == 18)
    a = dict(a, roles=[r if i != 6 else "V" for i, r in enumerate(a["roles"])])  # only a has V
    prompts = parse_prompts(json.dumps(a) + "\n" + json.dumps(b), model, "hand.jsonl")
    scorer = build_scorer(model, prompts, positional=True)
    assert isinstance(scorer, RoleAlignedScorer)
    v, end = scorer.axis.resolve("V"), scorer.axis.resolve("END")
    path = (Node.attn(1, 0, "kv", end, v), scorer.root)
    cands = [Node.embed(v), Node.mlp(0, v)]
    both = scorer.expand_exact(path[1:], [path[0]])[0]
    alone = build_scorer(model, prompts.subset(0), positional=True).expand_exact(
        (Node.final(2, 14),), [Node.attn(1, 0, "kv", 14, 6)]
    )[0]
    assert both == pytest.approx(alone / 2, abs=1e-7) and abs(both) > 0
    got = scorer.expand_exact(path, cands)
    single = build_scorer(model, prompts.subset(0), positional=True)
    want = (
        single.expand_exact(
            (Node.attn(1, 0, "kv", 14, 6), Node.final(2, 14)), [Node.embed(6), Node.mlp(0, 6)]
        )
        / 2
    )
    assert got == pytest.approx(want, abs=1e-7)


def test_equal_length_prompts_keep_integer_positions(model: Any) -> None:
    small = load_prompts("toy-ioi-small", model)
    assert small.has_roles and len({tuple(r.roles or []) for r in small.records}) == 2
    scorer = build_scorer(model, small, positional=True)
    assert isinstance(scorer, PromptScorer) and scorer.root == Node.final(2, 14)
    at_end = build_scorer(model, small, positional=True, root_position="END")
    assert isinstance(at_end, PromptScorer) and at_end.root == Node.final(2, 14)
    with pytest.raises(RoleError, match=r"token indices \[2, 4\]"):
        build_scorer(model, small, positional=True, root_position="IO")  # ABBA and BABA differ
    with pytest.raises(RoleError, match="unknown role position 'S9'"):
        build_scorer(model, small, positional=True, root_position="S9")


def test_role_root_position_and_refusals(model: Any, mixed: PromptSet) -> None:
    s2 = build_scorer(model, mixed, positional=True, root_position="S2")
    assert isinstance(s2, RoleAlignedScorer) and s2.position_names[s2.root.position or 0] == "S2"
    with pytest.raises(RoleError, match="unknown role position 'S9'"):
        build_scorer(model, mixed, positional=True, root_position="S9")
    assert isinstance(
        build_scorer(model, mixed, positional=True, patch_type="mean"), RoleAlignedScorer
    )


def _mixed_file(tmp_path: Path) -> str:
    """One toy-ioi-large prompt of each of its 12 role layouts (4 lengths), as a JSONL file."""
    by_layout: dict[tuple[str, ...], str] = {}
    for line in LARGE.read_text().splitlines():
        by_layout.setdefault(tuple(json.loads(line)["roles"]), line)
    (tmp_path / "mixed.jsonl").write_text("\n".join(by_layout.values()) + "\n")
    return "mixed.jsonl"


def test_cli_role_search_store_queries_and_picture(tmp_path: Path) -> None:
    args = ["-m", "toy-ioi-2l", "-p", _mixed_file(tmp_path), "-t", "0.2", "--db", "s.duckdb"]
    res = pathdb("search", *args, "-q", "-n", "roles", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        names = [
            n
            for (n,) in store.con.execute("SELECT name FROM positions ORDER BY position").fetchall()
        ]
        labels = {lab for (lab,) in store.con.execute("SELECT label FROM nodes").fetchall()}
        root = store.con.execute("SELECT root_position FROM runs").fetchall()[0][0]
    assert {"BOS", "IO", "S1", "S2", "END", "S2-1"} <= set(names) and names[root] == "END"
    assert "logits@END" in labels and any(lab.endswith("@END:S2") for lab in labels)
    assert not any(lab.split("@")[-1].split(":")[0].isdigit() for lab in labels if "@" in lab)
    res = pathdb(
        "query",
        "paths",
        "roles",
        "--db",
        "s.duckdb",
        "--through",
        "logits@END",
        "--top",
        "3",
        cwd=tmp_path,
    )
    assert res.returncode == 0 and "logits@END" in res.stdout, res.stderr
    res = pathdb(
        "show",
        "roles",
        "--db",
        "s.duckdb",
        "--positional",
        "-o",
        "c.png",
        "--top-k",
        "10",
        cwd=tmp_path,
    )
    assert res.returncode == 0 and (tmp_path / "c.png").stat().st_size > 1000, res.stderr
    res = pathdb("search", *args, "-q", "-n", "bad", "--root-position", "S9", cwd=tmp_path)
    assert (
        res.returncode == 2
        and "unknown role position 'S9'" in res.stderr
        and "Traceback" not in res.stderr
    )
    res = pathdb("search", *args, "-q", "-n", "bad", "--batch-positions", cwd=tmp_path)
    assert (
        res.returncode == 2 and "--batch-positions" in res.stderr and "Traceback" not in res.stderr
    )
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        assert store.con.execute("SELECT name FROM runs").fetchall() == [("roles",)]


def test_per_prompt_search_over_mixed_lengths(model: Any, mixed: PromptSet, tmp_path: Path) -> None:
    req = SearchRequest(
        model="toy-ioi-2l",
        prompts="toy-ioi-large",
        prompt_mode="per-prompt",
        params=SearchParams(min_contribution=0.3),
    )
    res = run_loaded(
        req, model, mixed.select([0, 3]), tmp_path / "s.duckdb", run_name="pp", quiet=True
    )
    assert res.status == "completed" and res.n_complete > 0


KILLER = """
import os, signal, sys
from search.strategies import SearchRun
from cli.app import main
calls = {"n": 0}
original = SearchRun._maybe_checkpoint
def kill(self, frontier):
    original(self, frontier)
    calls["n"] += 1
    if calls["n"] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
SearchRun._maybe_checkpoint = kill
sys.argv = ["pathdb", *sys.argv[1:]]
main()
"""


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    args = [
        "search",
        "-m",
        "toy-ioi-2l",
        "-p",
        _mixed_file(tmp_path),
        "-t",
        "0.2",
        "--checkpoint-every",
        "1e-9",
        "-q",
        "--db",
        "s.duckdb",
    ]
    assert pathdb(*args, "-n", "full", cwd=tmp_path).returncode == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *args, "-n", "r"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert killed.returncode == -9, killed.stderr
    res = pathdb("resume", "r", "-q", "--db", "s.duckdb", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        rows = store.con.execute(
            "SELECT r.name, s.path, s.contribution, p.kept FROM v_path_strings s JOIN runs r USING (run_id) "
            "JOIN paths p ON p.run_id = s.run_id AND p.path_id = s.path_id"
        ).fetchall()
        n_pos = store.con.execute("SELECT run_id, count(*) FROM positions GROUP BY 1").fetchall()
    by_run: dict[str, dict[str, tuple[float, bool]]] = {}
    for name, path, score, kept in rows:
        by_run.setdefault(name, {})[path] = (score, kept)
    assert by_run["r"] == by_run["full"] and "@END" in next(iter(by_run["r"]))
    assert len(n_pos) == 2 and n_pos[0][1] == n_pos[1][1]
