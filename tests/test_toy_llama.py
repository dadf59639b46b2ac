"""The bundled Llama-style toy ``toy-ioi-llama``: offline loading, architecture, accuracy, size,
training record, listing, and deterministic training of Llama-style specs."""

from __future__ import annotations

import json
import socket
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

import pathdb
from pathdb.models import bundled_names, list_models, load
from pathdb.models.ioi_data import IOIExample, generate, vocabulary
from pathdb.models.train import TOY_SPECS, ToySpec, hooked_config_dict, train_toy
from tests.cli_process import pathdb as run_pathdb

NAME = "toy-ioi-llama"
TOYS = Path(pathdb.__file__).parent / "data" / "models"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json")

TINY_LLAMA = ToySpec(
    "tiny Llama-style test model",
    n_layers=1,
    n_heads=4,
    d_model=32,
    d_mlp=48,
    max_steps=3,
    target_accuracy=None,
    batch_size=16,
    family="llama",
    n_key_value_heads=2,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def llama() -> HookedTransformer:
    return load(NAME, device="cpu")


def end_accuracy(model: HookedTransformer, examples: list[IOIExample]) -> float:
    """Argmax of the next-token logits at the last position == IO (batched per template)."""
    groups: dict[int, list[IOIExample]] = defaultdict(list)
    for ex in examples:  # one template = one token length, so no padding
        groups[ex.template].append(ex)
    correct = 0
    with torch.no_grad():
        for group in groups.values():
            logits = model(model.to_tokens([e.clean for e in group]))[:, -1]
            want = torch.tensor([model.to_single_token(e.target) for e in group])
            correct += int((logits.argmax(-1) == want).sum())
    return correct / len(examples)


# ---------------------------------------------------------------- the shipped model
def test_loads_offline(no_network: None) -> None:
    assert NAME in bundled_names()
    model = load(NAME, device="cpu")
    assert model.cfg.model_name == NAME and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.to_str_tokens("When Mary and John")[:3] == ["<bos>", "When", "Mary"]


def test_config_is_llama_style(llama: HookedTransformer) -> None:
    c = llama.cfg
    assert (c.positional_embedding_type, c.normalization_type, c.final_rms) == (
        "rotary",
        "RMS",
        True,
    )
    assert c.gated_mlp and c.act_fn == "silu" and not c.attn_only and not c.parallel_attn_mlp
    assert (c.n_heads, c.n_key_value_heads) == (4, 2)
    assert c.n_layers >= 4 and c.d_model >= 128 and c.rotary_dim == c.d_head
    assert not c.rotary_adjacent_pairs and c.original_architecture == "LlamaForCausalLM"
    names = {k for k, _ in llama.named_parameters()}
    assert not any(k.startswith("pos_embed") for k in names)  # rotary only: no learned positions
    assert llama.state_dict()["blocks.0.attn._W_K"].shape[0] == 2  # k/v weights per kv head
    biases = [
        p for k, p in llama.named_parameters() if k.rsplit(".", 1)[-1].lstrip("_").startswith("b_")
    ]
    assert biases and all((p == 0).all() for p in biases)  # Llama has no biases


def test_shipped_config_is_the_specs(llama: HookedTransformer) -> None:
    saved = json.loads((TOYS / NAME / "config.json").read_text())
    assert saved == hooked_config_dict(TOY_SPECS[NAME], len(vocabulary()))
    assert saved["d_vocab"] == llama.cfg.d_vocab


def test_heldout_accuracy(llama: HookedTransformer) -> None:
    acc = end_accuracy(llama, generate(400, seed=987_654, heldout=True))
    assert acc >= 0.98
    recorded = json.loads((TOYS / NAME / "training.json").read_text())["heldout_accuracy"]
    assert recorded >= 0.98 and abs(acc - recorded) <= 0.02


def test_files_and_size() -> None:
    d = TOYS / NAME
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in (TOYS / "toy-ioi").iterdir()) == sorted(FILES)
    assert sum(p.stat().st_size for p in d.iterdir()) <= 8 * 2**20


def test_shipped_as_package_data() -> None:
    """pyproject's package-data globs put every file of the toy into the wheel."""
    pyproject = tomllib.loads((Path(pathdb.__file__).parents[1] / "pyproject.toml").read_text())
    root = Path(pathdb.__file__).parent
    globs = pyproject["tool"]["setuptools"]["package-data"]["pathdb"]
    shipped = {p for pattern in globs for p in root.glob(pattern)}
    assert {TOYS / NAME / f for f in FILES} <= shipped


def test_training_record() -> None:
    rec = json.loads((TOYS / NAME / "training.json").read_text())
    assert rec["name"] == NAME and rec["seed"] == 0 and rec["deterministic_algorithms"] is True
    assert (
        0 < rec["steps"] <= TOY_SPECS[NAME].max_steps and rec["threads"] == TOY_SPECS[NAME].threads
    )
    assert rec["heldout_accuracy"] >= 0.98 and rec["heldout_examples"] >= 1000
    assert 0 < rec["wall_time_s"] < 600 and rec["torch_version"]


def test_listed_by_pathdb_models(tmp_path: Path) -> None:
    info = {m.name: m for m in list_models(include_official=False)}[NAME]
    assert (info.kind, info.layers, info.heads, info.d_model) == ("bundled", 4, 4, 128)
    assert info.heldout_accuracy is not None and info.heldout_accuracy >= 0.98
    assert "Llama" in info.description
    res = run_pathdb("models", cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert NAME in res.stdout


# ---------------------------------------------------------------- configs and training
def test_gpt2_toy_configs_unchanged() -> None:
    """The GPT-2-style toys' config.json files are exactly what their specs produce today."""
    for name in ("toy-ioi", "toy-ioi-2l"):
        text = json.dumps(hooked_config_dict(TOY_SPECS[name], len(vocabulary())), indent=2) + "\n"
        assert (TOYS / name / "config.json").read_text() == text


def _run(out: Path, seed: int) -> dict[str, object]:
    return train_toy("tiny-llama", out, seed, spec=TINY_LLAMA, eval_every=0, n_eval=32, threads=1)


def test_llama_training_is_deterministic(tmp_path: Path) -> None:
    m1, m2 = _run(tmp_path / "a", 0), _run(tmp_path / "b", 0)
    _run(tmp_path / "c", 1)
    w1, w2, w3 = (load_file(str(tmp_path / d / "model.safetensors")) for d in "abc")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)  # the seed matters
    assert all((w1[k] == 0).all() for k in w1 if k.rsplit(".", 1)[-1].lstrip("_").startswith("b_"))
    for m in (m1, m2):
        m.pop("wall_time_s")
    assert m1 == m2 and m1["steps"] == 3 and m1["seed"] == 0
    loaded = load(str(tmp_path / "a"), device="cpu")
    assert loaded.cfg.positional_embedding_type == "rotary" and loaded.cfg.n_key_value_heads == 2
