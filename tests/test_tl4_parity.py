"""TransformerLens 4 (``TransformerBridge``) route: random-init local Hugging Face checkpoints of every
supported family and the bundled toys (``toy-ioi``; the half-split rotary, GQA, RMSNorm, SwiGLU
``toy-ioi-llama`` on the native adjacent-pair route) give the same exact path scores through the bridge
adapter as through TL 3.9's HookedTransformer route and as the independent TL-hooks reference (run
in the TL 3.9 environment, a subprocess); a bridge of an unsupported architecture is refused by
feature; ``make demo``'s search runs. Runs in the TL 4 environment (``make test-tl4``); skipped
under TL 3.9, where tests/test_hf_checkpoints.py and tests/test_architectures.py cover the route."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pathdb.models.bridge import TL_MAJOR

if TL_MAJOR < 4:
    pytest.skip(
        "TransformerLens 4 bridge route (run with `make test-tl4`)", allow_module_level=True
    )

from pathdb.arch import UnsupportedModelError
from pathdb.graph import ModelShape, Node, NodeKind, predecessors
from pathdb.models import load
from search.activations import ActivationCache
from search.exact import ExactEvaluator, build_metric
from tests.test_hf_checkpoints import TINY, _configs

ROOT = Path(__file__).resolve().parents[1]
TL39_PYTHON = Path(os.environ.get("PATHDB_TL39_PYTHON", ROOT / ".venv" / "bin" / "python"))
FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gemma2", "gpt_neox"]
TOYS = ["toy-ioi", "toy-ioi-llama"]
B, T, N_PATHS, TOL = 2, 7, 5, 1e-5


def _hf_config(family: str) -> Any:
    """The tiny config of ``family`` (test_hf_checkpoints' families, plus GPT-2)."""
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=TINY["vocab_size"], n_positions=64
        )
    return _configs()[family]


def _checkpoint(family: str, path: Path) -> str:
    """Save a random-init checkpoint of ``family`` (norm gains and biases perturbed) to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(path)
    return str(path)


def _paths(shape: ModelShape, rng: random.Random) -> list[tuple[Node, ...]]:
    """``N_PATHS`` random paths ending at the last position's logits (1 to 4 senders each)."""
    out = []
    for _ in range(N_PATHS):
        path: tuple[Node, ...] = (Node.final(shape.n_layers, shape.n_positions - 1),)
        for _ in range(rng.randint(1, 4)):
            path = (rng.choice(predecessors(path[0], shape)), *path)
            if path[0].kind is NodeKind.EMBED:
                break
        out.append(path)
    return out


def _bridge_scores(model_ref: str, seed: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Load ``model_ref`` through the TL 4 route; the request for the TL 3.9 side and its exact scores."""
    model = load(model_ref, device="cpu")
    assert type(model).__name__ == "BridgeModel"
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    tokens, cf = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    target = torch.randint(0, V, (B,), generator=g)
    cf_target = (target + 1) % V
    cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    root = Node.final(model.cfg.n_layers, T - 1)
    ev = ExactEvaluator(
        cache, build_metric(cache, "logit_difference", root, target, cf_target), root
    )
    paths = _paths(cache.shape, random.Random(seed))
    req = {
        "model": model_ref, "tokens": tokens.tolist(), "cf": cf.tolist(), "target": target.tolist(),
        "cf_target": cf_target.tolist(), "paths": [[n.label for n in p] for p in paths],
    }  # fmt: skip
    return req, ev.score_paths(paths).per_prompt.detach()


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """Per family and toy: TL 4 exact scores, TL 3.9 exact scores, TL 3.9 hooks reference."""
    if not TL39_PYTHON.is_file():
        if os.environ.get("PATHDB_REQUIRE_TL39"):
            pytest.fail(f"no TL 3.9 python at {TL39_PYTHON} (set PATHDB_TL39_PYTHON)")
        pytest.skip(f"no TL 3.9 environment at {TL39_PYTHON} (run `make install` first)")
    refs = {f: _checkpoint(f, tmp_path_factory.mktemp(f)) for f in FAMILIES} | {t: t for t in TOYS}
    runs = {name: _bridge_scores(ref, seed=i) for i, (name, ref) in enumerate(refs.items())}
    proc = subprocess.run(
        [str(TL39_PYTHON), "-m", "tests.tl4_parity_ref"],
        input=json.dumps([req for req, _ in runs.values()]), capture_output=True, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        name: {"tl4": got, "tl39": torch.tensor(o["exact"]), "hooks": torch.tensor(o["reference"])}
        for (name, (_, got)), o in zip(runs.items(), out, strict=True)
    }


@pytest.mark.parametrize("family", [*FAMILIES, *TOYS])
def test_bridge_scores_equal_tl39_route_and_hooks_reference(
    parity: dict[str, dict[str, torch.Tensor]], family: str
) -> None:
    got = parity[family]
    assert got["tl4"].abs().max() > 1e-4, "scores must not all vanish"
    for other in ("tl39", "hooks"):
        err = float((got["tl4"] - got[other]).abs().max())
        print(f"{family}: max |TL4 - {other}| = {err:.2e}")
        assert err <= TOL, f"{family}: TL 4 vs {other} differ by {err:.2e}"


def test_bridge_of_unsupported_architecture_is_refused_by_feature(tmp_path: Path) -> None:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, Olmo2Config

    AutoModelForCausalLM.from_config(Olmo2Config(**TINY)).save_pretrained(tmp_path)
    from pathdb.models.loading import _placeholder_tokenizer

    bridge = TransformerBridge.boot_transformers(
        str(tmp_path), device="cpu", tokenizer=_placeholder_tokenizer(TINY["vocab_size"], "olmo2")
    )
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UnsupportedModelError) as err:
        ActivationCache.build(bridge, tokens, tokens)
    assert "post-norm blocks" in str(err.value) and "Olmo2ForCausalLM" in str(err.value)


def test_gated_toy_with_nonzero_mlp_bias_is_refused_in_one_line(tmp_path: Path) -> None:
    """TL 4's native gated MLP has no biases: a toy whose gated-MLP bias is non-zero is refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pathdb.models import ModelLoadError
    from pathdb.models.files import WEIGHTS_FILE

    toy = tmp_path / "llama-biased"
    shutil.copytree(ROOT / "pathdb" / "data" / "models" / "toy-ioi-llama", toy)
    weights = load_file(toy / WEIGHTS_FILE)
    weights["blocks.1.mlp.b_in"] = torch.full_like(weights["blocks.1.mlp.b_in"], 0.1)
    save_file(weights, toy / WEIGHTS_FILE)
    with pytest.raises(ModelLoadError) as err:
        load(str(toy), device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "non-zero biases" in msg and "TransformerLens 3.9" in msg, msg


def test_demo_search_runs_under_tl4(tmp_path: Path) -> None:
    db = tmp_path / "demo.duckdb"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = [sys.executable, "-m", "cli.app"]
    proc = subprocess.run(
        [*run, "search", "--db", str(db), "--run-name", "demo", "--replace"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute("SELECT count(*) FROM paths").fetchone()
    assert row is not None and row[0] > 10, "the demo search stored its evaluated paths"
    q = subprocess.run(
        [*run, "query", "paths", "demo", "--db", str(db), "--top", "3"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert q.returncode == 0 and "logits" in q.stdout, q.stderr[-2000:] + q.stdout[-2000:]
    # the edge-masked forward is HookedTransformer-only: refused in one line, nothing stored
    ev = subprocess.run(
        [*run, "evaluate", "demo", "--db", str(db)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert ev.returncode == 2, ev.stderr[-2000:]
    lines = ev.stderr.strip().splitlines()
    assert len(lines) == 1 and "transformer-lens 3.9" in lines[0], ev.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        stored = con.execute("SELECT count(*) FROM evaluations").fetchone()
    assert stored == (0,)
