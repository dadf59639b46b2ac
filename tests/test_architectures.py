"""Every supported architecture family: exact path scores equal an independent TransformerLens-hooks
computation (rotary, GQA, caps, windows and norms computed by TL itself), attribution is their
first-order expansion, batching changes nothing, the graph follows parallel blocks, and unsupported
features are refused by name before anything is written."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from pathdb.arch import UnsupportedModelError, check_supported, parallel_blocks_of
from pathdb.export.eap import eap_spec, to_eap_json
from pathdb.graph import ModelShape, Node, NodeKind, Site, count_paths, parse_label, predecessors
from pathdb.query.aggregate import circuit_from_edges
from pathdb.query.common import RunInfo
from search.activations import ActivationCache
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, build_metric
from search.node_functions import Msg, start_msg
from tests import reference_hooks_arch as ref
from tests.arch_models import _BASE, FAMILIES, family_model
from tests.cli_process import pathdb
from tests.engine_helpers import prompts, random_path

B, T, L = 2, 6, 3
FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def fam(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One tiny model per family with prompts and the reference's clean / counterfactual caches."""
    model = family_model(request.param, seed=1)
    tokens, cf, target, cf_target = prompts(model, B, T, seed=2)
    return {
        "name": request.param, "model": model, "tokens": tokens, "cf": cf, "target": target,
        "cf_target": cf_target, "clean": ref.full_cache(model, tokens), "cfc": ref.full_cache(model, cf),
    }  # fmt: skip


def evaluator(f: dict[str, Any], patch_type: str, positional: bool = True) -> ExactEvaluator:
    cache = ActivationCache.build(f["model"], f["tokens"], f["cf"], patch_type)
    root = Node.final(L, T - 1 if positional else None)
    return ExactEvaluator(
        cache, build_metric(cache, "logit_difference", root, f["target"], f["cf_target"]), root
    )


def reference(f: dict[str, Any], patch_type: str, path: tuple[Node, ...]) -> torch.Tensor:
    return ref.score_logit_difference(
        f["model"], f["tokens"], f["clean"], f["cfc"], patch_type, path, f["target"], f["cf_target"]
    )


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    got, want = got.detach(), want.detach()
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-9)
    assert err <= tol, f"relative error {err:.2e}: got {got.tolist()} want {want.tolist()}"


@pytest.mark.parametrize("patch_type", ["zero", "counterfactual", "mean"])
@pytest.mark.parametrize("positional", [True, False], ids=["positional", "position-free"])
def test_random_paths_match_hooks_reference(
    fam: dict[str, Any], patch_type: str, positional: bool
) -> None:
    ev = evaluator(fam, patch_type, positional)
    rng = random.Random(f"{fam['name']}-{patch_type}-{positional}")
    paths = [
        random_path(ev.cache.shape, rng.randint(1, 5), rng, positional=positional) for _ in range(2)
    ]
    scores = ev.score_paths(paths)
    for i, path in enumerate(paths):
        assert_close(scores.per_prompt[i], reference(fam, patch_type, path))


RECEIVERS = [
    Node.mlp(2, T - 1),
    Node.attn(1, 3, Site.Q, T - 1),
    Node.attn(2, 2, Site.KV, T - 1, 4),  # head 2: the second key/value group of a 4/2 GQA model
    Node.attn(2, 1, Site.KV, T - 1, 1),  # outside a 3-token window in local layers: scores clean
    Node.attn(2, 3, Site.K, T - 1, 3),
    Node.attn(1, 0, Site.V, T - 1, 5),
    Node.attn(2, None, Site.Q, T - 1),
    Node.attn(1, None, Site.KV, T - 1, 2),
    Node.attn(2, 2, Site.KV, T - 1, None),
    Node.attn(2, None, Site.V, T - 1, None),
]


def test_every_node_kind_and_site(fam: dict[str, Any]) -> None:
    """Each receiver kind/site, fed by senders of every kind (embed, q/kv/k/v heads, whole layers,
    MLPs; a different sample per receiver) at the position it reads, batched and checked one by one."""
    ev = evaluator(fam, "counterfactual")
    for i, receiver in enumerate(RECEIVERS):
        path = (receiver, ev.root)
        preds = predecessors(
            receiver, ev.cache.shape, heads=True, kv_sites=(Site.KV, Site.K, Site.V)
        )
        whole = predecessors(receiver, ev.cache.shape, heads=False)
        cands = [preds[(7 * i + 3) % len(preds)], whole[(3 * i + 1) % len(whole)]]
        scores = ev.expand(path, cands)
        for j, c in enumerate(cands):
            assert_close(scores.per_prompt[j], reference(fam, "counterfactual", (c, *path)))


def test_attribution_converges_to_exact(fam: dict[str, Any]) -> None:
    """|exact(eps m) - attribution(eps m)| / eps -> 0 as eps -> 0 (float64), through rotary, GQA kv
    nodes, gated MLPs, caps and post-norms."""
    ev = evaluator(fam, "counterfactual")
    att = AttributionEvaluator(ev.cache, ev.metric, ev.root)
    path = (
        Node.attn(1, 2, Site.KV, 3, 2),
        Node.mlp(1, 3),
        Node.attn(2, 1, Site.KV, T - 1, 3),
        ev.root,
    )
    cands = [c for c in predecessors(path[0], ev.cache.shape) if c.kind is not NodeKind.EMBED]
    msg = start_msg(cands, ev.cache)
    g = att.gradient(path)
    lin = torch.einsum("nbrd,brd->nb", msg.gather(g.pos), g.rows[0])
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        exact = ev.message_batch(path, Msg(msg.rows * eps, msg.pos)).detach()
        errs.append(float((exact - (att.baseline() + eps * lin)).abs().max()) / eps)
    assert errs[2] < errs[1] * 0.2 + 1e-10 and errs[1] < errs[0] * 0.2 + 1e-10, errs
    assert errs[2] < 1e-2 * max(1.0, float(lin.abs().max()))


def test_batched_equals_one_at_a_time(fam: dict[str, Any]) -> None:
    ev = evaluator(fam, "mean")
    path = (Node.attn(2, 3, Site.Q, T - 1), ev.root)
    cands = predecessors(path[0], ev.cache.shape, kv_sites=(Site.K, Site.V))
    some = [*range(0, len(cands), 6), len(cands) - 1]  # every kind and site (the last is an MLP)
    batched = ev.expand(path, cands).per_prompt[list(some)]
    one = torch.stack([ev.expand(path, [cands[i]]).per_prompt[0] for i in some])
    assert torch.allclose(batched, one, atol=1e-12, rtol=0)
    att = AttributionEvaluator(ev.cache, ev.metric, ev.root)
    batched = att.expand(path, cands).per_prompt[list(some)]
    one = torch.stack([att.expand(path, [cands[i]]).per_prompt[0] for i in some])
    assert torch.allclose(batched, one, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- graph facts and exports
def test_parallel_predecessor_counts_closed_form() -> None:
    """MLP(l) at p: embed + per earlier layer (H heads x (q + p+1 kv sources) + MLP); sequential
    blocks add layer l's own heads; attention and FINAL receivers are the same in both."""
    n_layers, H, n_pos = 4, 3, 5
    seq, par = ModelShape(n_layers, H, n_pos), ModelShape(n_layers, H, n_pos, parallel=True)
    for layer in range(n_layers):
        for p in range(n_pos):
            per = H * (1 + (p + 1)) + 1
            assert len(predecessors(Node.mlp(layer, p), par)) == 1 + layer * per
            assert len(predecessors(Node.mlp(layer, p), seq)) == 1 + layer * per + H * (p + 2)
            for r in (Node.attn(layer, 0, Site.Q, p), Node.final(n_layers, p)):
                assert predecessors(r, par) == predecessors(r, seq)
    assert all(
        len(predecessors(Node.mlp(i, None), par)) == 1 + i * (H * 2 + 1) for i in range(n_layers)
    )
    assert count_paths(Node.final(n_layers, n_pos - 1), par) < count_paths(
        Node.final(n_layers, n_pos - 1), seq
    )
    with pytest.raises(Exception, match="does not feed"):
        par.validate_path((Node.attn(1, 0, Site.Q, 2), Node.mlp(1, 2), Node.final(n_layers, 2)))


def _eap_edge_count(n_layers: int, n_heads: int, parallel: bool) -> int:
    """EAP-IG's published edge rules: every forward node feeds logits and every later attention
    q/k/v input and MLP; heads also feed their own layer's MLP unless blocks are parallel."""
    per_layer_in = 3 * n_heads + 1
    total = n_layers * per_layer_in + 1  # input
    for layer in range(n_layers):
        later = (n_layers - layer - 1) * per_layer_in + 1  # later layers' inputs + logits
        total += n_heads * (later + (0 if parallel else 1)) + later
    return total


@pytest.mark.parametrize("family", ["neox", "llama3"])
def test_eap_export_of_parallel_and_gqa_models(family: str, tmp_path: Path) -> None:
    """The EAP-IG cfg and edge set follow the run's model: parallel blocks (Pythia) drop the
    same-layer head -> MLP edges; GQA (Llama-3) keeps one node per query head."""
    d = save_toy_dir(tmp_path / family, family)
    parallel = family == "neox"
    assert parallel_blocks_of(str(d)) is parallel
    info = RunInfo(1, "r", str(d), L, 4, 32, "batch")
    import pandas as pd

    edges = pd.DataFrame(
        {"edge": ["input->a0.h1<q>", "a0.h1->m1", "m1->logits"], "src": ["input", "a0.h1", "m1"],
         "dst": ["a0.h1<q>", "m1", "logits"], "score": [1.0, 0.5, 0.25],
         "src_kind": ["embed", "attn", "mlp"], "dst_kind": ["attn", "mlp", "final"]}
    )  # fmt: skip
    circuit = circuit_from_edges(
        edges, pd.DataFrame({"node": []}), [info], positional=False, prune=False
    )
    assert circuit.eap_cfg()["parallel_attn_mlp"] is parallel
    data = json.loads(to_eap_json(circuit, None, tmp_path / "g.json").read_text())
    assert data["cfg"] == {
        "n_layers": L,
        "n_heads": 4,
        "parallel_attn_mlp": parallel,
        "d_model": 32,
    }
    assert (
        len(data["edges"]) == _eap_edge_count(L, 4, parallel) == len(eap_spec(L, 4, parallel).edges)
    )
    assert ("a1.h0->m1" in data["edges"]) is not parallel
    assert {e for e, v in data["edges"].items() if v["in_graph"]} == set(edges["edge"])


# ---------------------------------------------------------------- refusals
def save_toy_dir(d: Path, family: str, **overrides: Any) -> Path:
    """A pathdb toy directory (config.json + model.safetensors + the bundled toy's tokenizer)."""
    bundled = Path(__file__).resolve().parent.parent / "pathdb" / "data" / "models" / "toy-ioi"
    vocab = json.loads((bundled / "config.json").read_text())["d_vocab"]
    model = family_model(family, seed=0, d_vocab=vocab, dtype=torch.float32, **overrides)
    d.mkdir(parents=True)
    cfg = {**_BASE, **FAMILIES[family], "d_vocab": vocab, **overrides, "dtype": "float32"}
    cfg.pop("init_weights")
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
        str(d / "model.safetensors"),
    )
    shutil.copy(bundled / "tokenizer.json", d / "tokenizer.json")
    return d


REFUSED = [
    ({"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ({"use_attention_sinks": True}, "use_attention_sinks=True"),
    ({"attention_dir": "bidirectional"}, "attention_dir='bidirectional'"),
    ({"positional_embedding_type": "alibi"}, "positional_embedding_type='alibi'"),
    ({"num_experts": 4, "experts_per_token": 2}, "mixture-of-experts"),
    ({"use_qk_norm": True}, "query/key normalisation"),
]


@pytest.mark.parametrize(("overrides", "feature"), REFUSED, ids=[f for _, f in REFUSED])
def test_unsupported_feature_is_refused_by_the_engine(
    overrides: dict[str, Any], feature: str
) -> None:
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        **{**_BASE, **FAMILIES["llama3"], **overrides, "model_name": "odd"}
    )
    with pytest.raises(UnsupportedModelError, match=r"'odd' is not supported") as info:
        check_supported(cfg)
    assert feature in str(info.value)


def test_unsupported_feature_refused_by_the_cli_writes_nothing(tmp_path: Path) -> None:
    """A GPT-2-style model the engine used to accept and silently mis-score is refused in one line
    naming the feature, and no store file is created."""
    d = save_toy_dir(tmp_path / "odd", "gpt2", clip_qkv=8.0)
    r = pathdb("search", "-m", str(d), "--db", "s.duckdb", "--run-name", "x", "-q", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "clip_qkv=8.0" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.duckdb").exists()


# ---------------------------------------------------------------- the bundled Llama-style toy
@pytest.mark.parametrize(
    "params",
    [
        {"min_contribution": 0.3},
        {"min_contribution": 0.3, "method": "attribution"},
        {"strategy": "best-first", "top_n": 5},
        {"strategy": "level-width", "max_width": 3, "method": "attribution", "max_depth": 3},
    ],
    ids=["threshold-exact", "threshold-attribution", "best-first", "level-width-attribution"],
)
def test_toy_ioi_llama_searches_end_to_end(params: dict[str, Any], tmp_path: Path) -> None:
    """``toy-ioi-llama`` (rotary, RMSNorm, SwiGLU, 4 query / 2 kv heads) is searchable out of the
    box through the seam: each strategy stores its paths, the stored exact scores re-score to the
    same values, and the query layer reads them back."""
    from pathdb.models import load
    from pathdb.prompts import load_prompts
    from pathdb.query import paths as query_paths
    from pathdb.store.db import open_store
    from search import SearchParams, SearchRequest, run_loaded
    from search.scorer import build_scorer

    model = load("toy-ioi-llama", device="cpu")
    ps = load_prompts("toy-ioi-small", model, require_equal_length=True).subset(0)
    req = SearchRequest(
        model="toy-ioi-llama", prompts="toy-ioi-small", params=SearchParams(**params)
    )
    res = run_loaded(req, model, ps, tmp_path / "s.duckdb", run_name="r", quiet=True)
    assert res.status == "completed" and res.n_complete > 0
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        top = query_paths.top_paths(store.con, "r", k=3)
    assert len(top) > 0
    scorer = build_scorer(model, ps)
    exact = top[top["method"] == "exact"]
    for labels, score in zip(exact["path"], exact["contribution"], strict=True):
        path = tuple(parse_label(x, model.cfg.n_layers) for x in labels.split(" -> "))
        assert abs(float(scorer.exact.score_paths([path]).mean[0]) - score) <= 1e-4 * max(
            1.0, abs(score)
        )
