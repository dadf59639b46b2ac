"""Toy IOI data generator invariants and training determinism."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pathdb.models import fingerprint, load
from pathdb.models.ioi_data import (
    NAMES,
    ORDERS,
    TEMPLATES,
    generate,
    heldout_pairs,
    iter_training,
    make_example,
    vocabulary,
)
from pathdb.models.tokenizer import build_word_tokenizer
from pathdb.models.train import ToySpec, train_toy

TINY = ToySpec(
    "tiny test model",
    n_layers=1,
    n_heads=2,
    d_model=16,
    d_mlp=32,
    max_steps=3,
    target_accuracy=None,
    batch_size=16,
)


# ---------------------------------------------------------------- data generator
def test_generator_scope() -> None:
    assert len(NAMES) >= 40 and len(set(NAMES)) == len(NAMES)
    assert len(TEMPLATES) >= 6 and set(ORDERS) == {"ABBA", "BABA"}
    tok = build_word_tokenizer(vocabulary())
    assert all(len(tok.encode(n, add_special_tokens=False).ids) == 1 for n in NAMES)


def test_generator_is_deterministic() -> None:
    assert generate(50, seed=3) == generate(50, seed=3)
    assert generate(50, seed=3) != generate(50, seed=4)
    assert list(itertools.islice(iter_training(7), 30)) == list(
        itertools.islice(iter_training(7), 30)
    )


def test_heldout_pairs_never_in_training() -> None:
    held = heldout_pairs()
    assert held == heldout_pairs() and len(held) > 0
    train_pairs = {
        frozenset((e.target.strip(), e.cf_target.strip()))
        for e in itertools.islice(iter_training(0), 5000)
    }
    assert not train_pairs & held
    assert all(
        frozenset((e.target.strip(), e.cf_target.strip())) in held
        for e in generate(300, 1, heldout=True)
    )


def test_examples_align_and_are_labelled() -> None:
    tok = build_word_tokenizer(vocabulary())
    seen: Counter[tuple[int, str]] = Counter()
    for ex in generate(400, seed=5):
        clean = tok.encode(ex.clean).tokens
        cf = tok.encode(ex.counterfactual).tokens
        assert "<unk>" not in clean and len(clean) == len(cf) == len(ex.roles)
        roles = Counter(ex.roles)
        assert all(roles[r] == 1 for r in ("BOS", "IO", "S1", "S2", "END"))
        io, s1, s2 = (ex.roles.index(r) for r in ("IO", "S1", "S2"))
        assert clean[io] == ex.target.strip() and clean[s1] == clean[s2] == ex.cf_target.strip()
        assert cf[s2] == ex.target.strip() and [t for i, t in enumerate(cf) if i != s2] == [
            t for i, t in enumerate(clean) if i != s2
        ]
        assert (io < s1) == (ex.order == "ABBA")
        seen[(ex.template, ex.order)] += 1
    assert len(seen) == len(TEMPLATES) * 2


def test_make_example_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="order"):
        make_example(0, "AABB", "Mary", "John")
    with pytest.raises(ValueError, match="different"):
        make_example(0, "ABBA", "Mary", "Mary")


# ---------------------------------------------------------------- training
def _run(out: Path, seed: int) -> dict[str, object]:
    return train_toy("tiny", out, seed, spec=TINY, eval_every=0, n_eval=32, threads=1)


def test_training_is_deterministic(tmp_path: Path) -> None:
    m1, m2 = _run(tmp_path / "a", 0), _run(tmp_path / "b", 0)
    _run(tmp_path / "c", 1)
    w1, w2, w3 = (load_file(str(tmp_path / d / "model.safetensors")) for d in "abc")
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)
    assert any(not (w1[k] == w3[k]).all() for k in w1)  # the seed matters
    for m in (m1, m2):
        m.pop("wall_time_s")
    assert m1 == m2 and m1["steps"] == 3 and m1["seed"] == 0
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert saved["heldout_accuracy"] == m1["heldout_accuracy"] and "torch_version" in saved
    assert fingerprint(load(str(tmp_path / "a"), device="cpu")) == fingerprint(
        load(str(tmp_path / "b"), device="cpu")
    )
    assert fingerprint(load(str(tmp_path / "a"), device="cpu")) != fingerprint(
        load(str(tmp_path / "c"), device="cpu")
    )
