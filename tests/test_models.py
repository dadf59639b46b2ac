"""Model loading routes, the toy tokenizer, provenance fingerprints and architecture refusals."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import pathdb
from pathdb.models import (
    ModelLoadError,
    UnsupportedModelError,
    bundled_names,
    ensure_supported,
    fingerprint,
    list_models,
    load,
)
from pathdb.models.ioi_data import IOIExample, generate

TOYS = Path(pathdb.__file__).parent / "data" / "models"


@pytest.fixture(scope="module")
def toy() -> HookedTransformer:
    return load("toy-ioi", device="cpu")


@pytest.fixture(scope="module")
def toy2l() -> HookedTransformer:
    return load("toy-ioi-2l", device="cpu")


def end_accuracy(model: HookedTransformer, examples: list[IOIExample]) -> float:
    """Argmax of the next-token logits at the last position == IO (batched per template)."""
    groups: dict[int, list[IOIExample]] = defaultdict(list)
    for ex in examples:  # one template = one token length
        groups[ex.template].append(ex)
    correct = 0
    with torch.no_grad():
        for group in groups.values():
            logits = model(model.to_tokens([e.clean for e in group]))[:, -1]
            want = torch.tensor([model.to_single_token(e.target) for e in group])
            correct += int((logits.argmax(-1) == want).sum())
    return correct / len(examples)


# ---------------------------------------------------------------- bundled toys
def test_bundled_names() -> None:
    assert {"toy-ioi", "toy-ioi-2l"} <= set(bundled_names())


def test_toy_ioi_config_and_state(toy: HookedTransformer) -> None:
    c = toy.cfg
    assert (c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp) == (4, 4, 128, 32, 512)
    assert c.normalization_type == "LN" and c.positional_embedding_type == "standard"
    assert c.act_fn == "gelu" and not c.parallel_attn_mlp and not c.attn_only
    assert not toy.training and not c.use_attn_result and c.model_name == "toy-ioi"
    assert all(p.dtype == torch.float32 for p in toy.parameters())
    ensure_supported(toy)


def test_toy_ioi_heldout_accuracy(toy: HookedTransformer) -> None:
    # fresh held-out examples (a seed the training never used for its eval set)
    assert end_accuracy(toy, generate(200, seed=987_654, heldout=True)) >= 0.98


def test_toy_ioi_2l_loads_and_matches_recorded_accuracy(toy2l: HookedTransformer) -> None:
    c = toy2l.cfg
    assert (c.n_layers, c.n_heads, c.d_model) == (2, 4, 64)
    ensure_supported(toy2l)
    info = {m.name: m for m in list_models()}["toy-ioi-2l"]
    assert info.heldout_accuracy is not None
    acc = end_accuracy(toy2l, generate(200, seed=987_654, heldout=True))
    assert abs(acc - info.heldout_accuracy) < 0.08  # same distribution, different sample


def test_toy_tokenizer(toy: HookedTransformer) -> None:
    assert toy.tokenizer is not None
    assert toy.to_single_token(" Mary") == toy.to_single_token("Mary")
    assert toy.to_single_token(" Mary") != toy.to_single_token(" John")
    toks = toy.to_tokens("When Mary and John went to the store, John gave a drink to")
    assert toks.shape == (1, 15) and int(toks[0, 0]) == toy.tokenizer.bos_token_id
    assert toy.to_str_tokens(toks[0])[:5] == ["<bos>", "When", "Mary", "and", "John"]
    assert toy.to_tokens("Mary", prepend_bos=False).tolist() == [[toy.to_single_token("Mary")]]
    assert toy.tokenizer.unk_token == "<unk>" and toy.tokenizer.pad_token == "<pad>"


def test_fingerprint(toy2l: HookedTransformer) -> None:
    fp = fingerprint(toy2l)
    assert len(fp) == 64 and fp == fingerprint(load("toy-ioi-2l", device="cpu"))
    other = load("toy-ioi-2l", device="cpu")
    with torch.no_grad():
        other.blocks[1].attn.W_Q[0, 0, 0] += 1e-3
    assert fingerprint(other) != fp


def test_toy_directory_path_loads(tmp_path: Path, toy2l: HookedTransformer) -> None:
    d = tmp_path / "my-toy"
    shutil.copytree(TOYS / "toy-ioi-2l", d)
    assert fingerprint(load(str(d), device="cpu")) == fingerprint(toy2l)


def test_list_models(tmp_path: Path) -> None:
    infos = {m.name: m for m in list_models()}
    toy = infos["toy-ioi"]
    assert (toy.kind, toy.layers, toy.heads, toy.d_model) == ("bundled", 4, 4, 128)
    assert toy.heldout_accuracy is not None and toy.heldout_accuracy >= 0.98 and toy.description
    assert infos["gpt2-small"].kind == "official" and infos["gpt2-small"].layers == 12
    local = list_models([TOYS / "toy-ioi-2l"], include_official=False)
    assert [m.kind for m in local][-1] == "local" and local[-1].layers == 2
    assert all(m.kind != "official" for m in local)


# ---------------------------------------------------------------- error routes
def test_unknown_name() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model 'no-such-model'.*toy-ioi"):
        load("no-such-model")


def _assert_fast_offline_error(name: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load(name, device="cpu")
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert "could not download" in msg and name in msg
    assert "local checkpoint directory" in msg and "toy-ioi" in msg


@pytest.fixture
def empty_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_official_name_offline_env_fails_fast(
    monkeypatch: pytest.MonkeyPatch, empty_hf_cache: None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_fast_offline_error("gpt2-small")


def test_official_name_unreachable_hub_fails_fast(
    monkeypatch: pytest.MonkeyPatch, empty_hf_cache: None
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    _assert_fast_offline_error("gpt2-small")


def test_official_name_partial_cache_offline_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A cache holding only config.json (no weights) is tried offline and fails fast and clearly."""
    import huggingface_hub.constants as hc
    from transformers import GPT2Config

    repo = tmp_path / "models--gpt2"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    GPT2Config(n_layer=1, n_embd=16, n_head=2, architectures=["GPT2LMHeadModel"]).to_json_file(
        snap / "config.json"
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = hc.HF_HUB_OFFLINE
    t0 = time.perf_counter()
    with pytest.raises(
        ModelLoadError,
        match=r"could not load 'gpt2-small' from the local Hugging Face cache.*local checkpoint directory.*toy-ioi",
    ):
        load("gpt2-small", device="cpu")
    assert time.perf_counter() - t0 < 5.0
    assert hc.HF_HUB_OFFLINE is before and os.environ["HF_HUB_OFFLINE"] == "1"  # restored


# ---------------------------------------------------------------- local Hugging Face checkpoint
@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_local_hf_gpt2_checkpoint_matches_hf_logits(tmp_path: Path, no_network: None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    hf = GPT2LMHeadModel(cfg).eval()
    with (
        torch.no_grad()
    ):  # make LayerNorm and biases non-trivial so the conversion is really tested
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = load(str(tmp_path), device="cpu")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model) == (2, 4, 64)
    assert model.cfg.normalization_type == "LN" and not model.training
    ensure_supported(model)
    tokens = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_local_checkpoint_with_tokenizer(tmp_path: Path, no_network: None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    toy = load("toy-ioi-2l", device="cpu")
    vocab = toy.cfg.d_vocab
    assert toy.tokenizer is not None
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32)
    ).save_pretrained(tmp_path)
    toy.tokenizer.save_pretrained(tmp_path)
    model = load(str(tmp_path), device="cpu")
    assert model.to_str_tokens("When Mary and John")[:3] == ["<bos>", "When", "Mary"]


def test_local_non_gpt2_checkpoint_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match=r"model_type 'bert'"):
        load(str(tmp_path))


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load(str(tmp_path))


# ---------------------------------------------------------------- unsupported architectures
BASE: dict[str, Any] = {
    "n_layers": 1,
    "d_model": 32,
    "n_ctx": 16,
    "d_head": 8,
    "n_heads": 4,
    "d_vocab": 10,
    "act_fn": "gelu",
    "normalization_type": "LN",
}


@pytest.mark.parametrize(
    ("overrides", "feature"),
    [
        ({"positional_embedding_type": "alibi"}, "positional_embedding_type='alibi'"),
        ({"normalization_type": None}, "normalization_type=None"),
        ({"clip_qkv": 8.0}, "clip_qkv=8.0"),
        ({"use_attention_sinks": True}, "use_attention_sinks=True"),
        ({"attention_dir": "bidirectional"}, "attention_dir='bidirectional'"),
        ({"num_experts": 4, "experts_per_token": 2}, "mixture-of-experts"),
    ],
)
def test_unsupported_features(overrides: dict[str, Any], feature: str) -> None:
    cfg = HookedTransformerConfig(**{**BASE, **overrides}, model_name="weird")
    with pytest.raises(UnsupportedModelError, match=r"'weird' is not supported") as info:
        ensure_supported(cfg)
    assert feature in str(info.value)


def test_supported_configs_pass() -> None:
    ensure_supported(HookedTransformerConfig(**BASE))
    ensure_supported(HookedTransformerConfig(**{**BASE, "normalization_type": "LNPre"}))
    llama = {
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": 8,
        "gated_mlp": True,
        "n_key_value_heads": 2,
        "parallel_attn_mlp": True,
    }
    ensure_supported(HookedTransformerConfig(**{**BASE, **llama}))
