"""Cross-prompt statistics against a hand computation, with and without role labels, pooled runs."""

from __future__ import annotations

import itertools
from collections import defaultdict

import duckdb
import numpy as np
import pytest

from pathdb.graph import Node
from pathdb.query import QueryError, cross_prompt_edges, cross_prompt_nodes, cross_prompt_paths
from tests.conftest_query import TreeBuilder, add_prompt, add_run, make_store

E, A, M = Node.embed, Node.attn, Node.mlp
ROLES = {
    0: ["BOS", "IO", "S", "END"],
    1: ["BOS", "S", "IO", "x", "END"],
    2: ["BOS", "IO", "x", "S", "END"],
}
# run 1: prompts 0 and 1; run 2: prompt 0 (its roles are ROLES[2]); all paths complete and kept
RUNS: dict[int, dict[int, list[tuple[tuple[Node, ...], float]]]] = {
    1: {
        0: [
            ((E(1), A(0, 1, "kv", 3, 1), Node.final(2, 3)), 2.0),
            ((E(3), A(0, 1, "q", 3), Node.final(2, 3)), -1.0),
        ],
        1: [
            (
                (E(2), A(0, 1, "kv", 4, 2), Node.final(2, 4)),
                1.0,
            ),  # same roles as prompt 0's first path
            ((E(4), M(1, 4), Node.final(2, 4)), 0.5),
        ],
    },
    2: {
        0: [((E(1), A(0, 1, "kv", 4, 1), Node.final(2, 4)), -3.0)],
    },
}
PROMPT_ROLES = {(1, 0): ROLES[0], (1, 1): ROLES[1], (2, 0): ROLES[2]}


def _store(tmp: object, roles: bool) -> duckdb.DuckDBPyConnection:
    con = make_store(tmp / "x.duckdb")  # type: ignore[operator]
    for rid, prompts in RUNS.items():
        add_run(con, rid, f"run{rid}")
        tb = TreeBuilder(rid)
        for p, paths in prompts.items():
            add_prompt(
                con, rid, p, len(PROMPT_ROLES[(rid, p)]), PROMPT_ROLES[(rid, p)] if roles else None
            )
            for path, v in paths:
                tb.add(path, v, prompt=p)
        tb.write(con)
    return con


def _key(n: Node, roles: list[str] | None) -> str:
    if roles is None:
        return n.component
    base = n.label.split("@")[0]
    out = f"{base}@{roles[n.position]}"  # type: ignore[index]
    if n.kv_position is not None:
        out += f":{roles[n.kv_position]}"
    return out


def _edge_keys(s: Node, d: Node, roles: list[str] | None) -> list[str]:
    if roles is not None:
        return [f"{_key(s, roles)}->{_key(d, roles)}"]
    if d.site is not None:
        sites = ["k", "v"] if str(d.site) == "kv" else [str(d.site)]
        return [f"{s.component}->{d.component}<{x}>" for x in sites]
    return [f"{s.component}->{d.component}"]


def hand(runs: list[int], use_roles: bool, what: str) -> dict[str, dict[str, float]]:
    """Statistics over the prompts of ``runs`` with 0 for absent prompts (numpy, population std)."""
    prompts = [(r, p) for r in runs for p in RUNS[r]]
    per: dict[str, dict[tuple[int, int], float]] = defaultdict(lambda: defaultdict(float))
    for r, p in prompts:
        roles = PROMPT_ROLES[(r, p)] if use_roles else None
        for path, v in RUNS[r][p]:
            if what == "edges":
                keys = [k for s, d in itertools.pairwise(path) for k in _edge_keys(s, d, roles)]
            elif what == "nodes":
                keys = [_key(n, roles) for n in path]
            else:
                keys = [" -> ".join(_key(n, roles) for n in path)]
            for k in keys:
                per[k][(r, p)] += v
    out = {}
    for k, vals in per.items():
        full = np.array([vals.get(rp, 0.0) for rp in prompts])
        present = np.array(list(vals.values()))
        npos, nneg = (present > 0).sum(), (present < 0).sum()
        out[k] = {
            "mean": full.mean(),
            "std": full.std(),
            "min": full.min(),
            "max": full.max(),
            "frequency": len(present) / len(prompts),
            "sign_consistency": max(npos, nneg) / len(present),
            "n_present": len(present),
            "n_prompts": len(prompts),
            "mean_present": present.mean(),
        }
    return out


@pytest.mark.parametrize("use_roles", [True, False])
@pytest.mark.parametrize("runs", [[1], [1, 2]])
@pytest.mark.parametrize("what", ["edges", "nodes", "paths"])
def test_cross_prompt_matches_hand(
    tmp_path: object, use_roles: bool, runs: list[int], what: str
) -> None:
    con = _store(tmp_path, roles=use_roles)
    fn = {"edges": cross_prompt_edges, "nodes": cross_prompt_nodes, "paths": cross_prompt_paths}[
        what
    ]
    df = fn(con, runs if len(runs) > 1 else runs[0], align="auto")
    assert df.attrs["aligned_by"] == ("roles" if use_roles else "none")
    col = df.columns[0]
    got = {r[col]: r for r in df.to_dict("records")}
    want = hand(runs, use_roles, what)
    assert got.keys() == want.keys()
    for k, stats in want.items():
        for s, v in stats.items():
            assert got[k][s] == pytest.approx(v), (k, s)


def test_role_alignment_merges_positions(tmp_path: object) -> None:
    con = _store(tmp_path, roles=True)
    df = cross_prompt_edges(con, 1).set_index("edge")
    row = df.loc["input@IO->a0.h1<kv>@END:IO"]  # prompt 0 at positions 1/3, prompt 1 at 2/4
    assert (
        row["n_present"] == 2
        and row["mean"] == pytest.approx(1.5)
        and row["sign_consistency"] == 1.0
    )
    assert row["std"] == pytest.approx(0.5)
    lone = df.loc["m1@END->logits@END"]
    assert lone["frequency"] == 0.5 and lone["min"] == 0.0 and lone["max"] == 0.5


def test_roles_required_when_asked(tmp_path: object) -> None:
    con = _store(tmp_path, roles=False)
    with pytest.raises(QueryError, match="align='roles' needs role labels"):
        cross_prompt_edges(con, 1, align="roles")
    with pytest.raises(QueryError, match="align="):
        cross_prompt_edges(con, 1, align="diagonal")


def test_batch_mode_refused(tmp_path: object) -> None:
    con = make_store(tmp_path / "b.duckdb")  # type: ignore[operator]
    add_run(con, 1, "batch", prompt_mode="batch")
    tb = TreeBuilder(1)
    tb.add((E(3), Node.final(2, 3)), 1.0, prompt=None)
    tb.write(con)
    with pytest.raises(QueryError, match="per-prompt runs"):
        cross_prompt_edges(con, "batch")
