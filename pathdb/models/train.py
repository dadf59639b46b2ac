"""Train the bundled toy IOI models (deterministic for a seed and thread count, CPU).

Run as ``python -m pathdb.models.train --name toy-ioi --out DIR --seed 0``. Writes
``model.safetensors``, ``config.json`` (HookedTransformerConfig fields), ``tokenizer.json``
and ``training.json`` (seed, steps, wall time, losses, held-out accuracy, torch version).
The loss is cross-entropy of the next-token logits at the END position against the IO name
(full vocabulary); accuracy is the argmax at END on examples built from held-out name pairs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformer_lens import HookedTransformer

from pathdb.models import ioi_data
from pathdb.models.files import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    config_from_dict,
)
from pathdb.models.tokenizer import PAD_TOKEN, build_word_tokenizer, wrap_for_transformer_lens


@dataclass(frozen=True)
class ToySpec:
    """Architecture and training budget of one bundled toy model."""

    description: str
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    max_steps: int
    target_accuracy: float | None  # stop early once the held-out accuracy reaches this
    min_steps: int = 0  # never stop early before this many steps
    n_ctx: int = 32
    lr: float = 1e-3
    batch_size: int = 128
    extra: dict[str, Any] = field(default_factory=dict)
    # "gpt2": LayerNorm, GELU MLP, learned positions, biases. "llama": as TransformerLens configures
    # Llama (RMSNorm, rotary, SwiGLU, no biases: bias parameters stay zero and are not trained).
    family: Literal["gpt2", "llama"] = "gpt2"
    n_key_value_heads: int | None = None  # grouped-query attention when < n_heads (llama only)
    threads: int = 2  # torch CPU threads: part of the recipe, since the last bits may depend on it

    @property
    def d_head(self) -> int:
        """Width of one head (d_model / n_heads)."""
        return self.d_model // self.n_heads


TOY_SPECS: dict[str, ToySpec] = {
    "toy-ioi": ToySpec(
        "GPT-2-style 4-layer toy trained on synthetic IOI (>= 98% held-out accuracy)",
        n_layers=4, n_heads=4, d_model=128, d_mlp=512, max_steps=4000, target_accuracy=0.995,
        min_steps=1000,
    ),
    "toy-ioi-2l": ToySpec(
        "GPT-2-style 2-layer toy on synthetic IOI for fast tests (fixed short training)",
        n_layers=2, n_heads=4, d_model=64, d_mlp=256, max_steps=1000, target_accuracy=None,
    ),
    # 1 thread: its many small kernels stall at every 2-thread barrier on a loaded machine.
    "toy-ioi-llama": ToySpec(
        "Llama-style 4-layer toy (rotary, RMSNorm, SwiGLU, 4 query / 2 key-value heads) on synthetic IOI",
        n_layers=4, n_heads=4, d_model=128, d_mlp=384, max_steps=4000, target_accuracy=0.995,
        min_steps=500, family="llama", n_key_value_heads=2, threads=1,
    ),
}  # fmt: skip

# Llama's constants as TransformerLens 3.9 sets them (rotary_base: Llama-2's theta, its default).
LLAMA_EPS = 1e-5
LLAMA_ROTARY_BASE = 10_000


def hooked_config_dict(spec: ToySpec, d_vocab: int) -> dict[str, Any]:
    """The HookedTransformerConfig fields that rebuild a toy model (what config.json stores)."""
    shape = {
        "n_layers": spec.n_layers,
        "n_heads": spec.n_heads,
        "d_model": spec.d_model,
        "d_head": spec.d_head,
        "d_mlp": spec.d_mlp,
        "n_ctx": spec.n_ctx,
        "d_vocab": d_vocab,
    }
    if spec.family == "llama":
        arch: dict[str, Any] = {
            "n_key_value_heads": spec.n_key_value_heads,
            "act_fn": "silu",
            "gated_mlp": True,
            "normalization_type": "RMS",
            "final_rms": True,
            "eps": LLAMA_EPS,
            "positional_embedding_type": "rotary",
            "rotary_dim": spec.d_head,
            "rotary_base": LLAMA_ROTARY_BASE,
            "rotary_adjacent_pairs": False,
        }
        original = "LlamaForCausalLM"
    else:  # key order kept as first shipped: the toys' config.json files stay byte-identical
        arch = {
            "act_fn": "gelu",
            "normalization_type": "LN",
            "positional_embedding_type": "standard",
        }
        original = "GPT2LMHeadModel"
    return {
        **shape,
        **arch,
        "attn_only": False,
        "parallel_attn_mlp": False,
        "default_prepend_bos": True,
        "original_architecture": original,
        "dtype": "float32",
    }


def _freeze_biases(model: HookedTransformer) -> None:
    """Keep every bias at its initial zero and out of training (Llama has no bias parameters)."""
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1].lstrip("_").startswith("b_"):
            p.requires_grad_(False)


def _encode(
    tok: Tokenizer, examples: list[ioi_data.IOIExample], pad_id: int, vocab: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B,T], END index [B] and IO target id [B] for a list of examples."""
    encs = tok.encode_batch([e.clean for e in examples])
    t_max = max(len(e.ids) for e in encs)
    tokens = torch.full((len(examples), t_max), pad_id, dtype=torch.long)
    for i, enc in enumerate(encs):
        tokens[i, : len(enc.ids)] = torch.tensor(enc.ids)
    ends = torch.tensor([len(enc.ids) - 1 for enc in encs])
    targets = torch.tensor([vocab[e.target.strip()] for e in examples])
    return tokens, ends, targets


def _end_logits(model: HookedTransformer, tokens: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Next-token logits at each example's END position (padding after END is never attended)."""
    logits = model(tokens, return_type="logits")
    return logits[torch.arange(tokens.shape[0]), ends]


@torch.no_grad()
def heldout_accuracy(model: HookedTransformer, examples: list[ioi_data.IOIExample]) -> float:
    """Fraction of examples whose END-position argmax over the full vocabulary is the IO."""
    assert model.tokenizer is not None
    tok = model.tokenizer.backend_tokenizer
    vocab = tok.get_vocab()
    tokens, ends, targets = _encode(tok, examples, vocab[PAD_TOKEN], vocab)
    tokens = tokens.to(model.cfg.device)
    pred = _end_logits(model, tokens, ends.to(tokens.device)).argmax(-1).cpu()
    return float((pred == targets).float().mean())


def _batches(seed: int, batch_size: int) -> Iterator[list[ioi_data.IOIExample]]:
    """Deterministic stream of training batches."""
    stream = ioi_data.iter_training(seed)
    while True:
        yield [next(stream) for _ in range(batch_size)]


def train_toy(
    name: str,
    out_dir: Path,
    seed: int = 0,
    *,
    max_steps: int | None = None,
    eval_every: int = 100,
    n_eval: int = 1000,
    threads: int | None = None,
    spec: ToySpec | None = None,
) -> dict[str, Any]:
    """Train toy ``name`` (or an explicit ``spec``) deterministically and save it to ``out_dir``.

    ``threads`` defaults to the spec's. Returns the metrics also written to training.json.
    """
    spec = spec or TOY_SPECS[name]
    previous = torch.are_deterministic_algorithms_enabled()
    # Without this, CPU backward kernels (embedding gradients) accumulate in a thread-dependent
    # order and two runs with the same seed differ in the last bits (seen here with 2 threads).
    torch.use_deterministic_algorithms(True)
    try:
        return _train(
            name,
            out_dir,
            seed,
            max_steps=max_steps,
            eval_every=eval_every,
            n_eval=n_eval,
            threads=spec.threads if threads is None else threads,
            spec=spec,
        )
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(
    name: str,
    out_dir: Path,
    seed: int,
    *,
    max_steps: int | None,
    eval_every: int,
    n_eval: int,
    threads: int,
    spec: ToySpec,
) -> dict[str, Any]:
    steps_budget = spec.max_steps if max_steps is None else max_steps
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    words = ioi_data.vocabulary()
    raw_tok = build_word_tokenizer(words)
    vocab = raw_tok.get_vocab()
    cfg_dict = hooked_config_dict(spec, len(words))
    model = HookedTransformer(
        config_from_dict({**cfg_dict, "seed": seed}),
        tokenizer=wrap_for_transformer_lens(raw_tok, name),
        move_to_device=False,
    )
    if spec.family == "llama":
        _freeze_biases(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trained, lr=spec.lr)
    warmup = max(1, min(100, steps_budget // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    eval_set = ioi_data.generate(n_eval, seed=10_000 + seed, heldout=True)
    t0 = time.perf_counter()
    step, acc, loss_val, losses = 0, 0.0, float("nan"), []
    batches = _batches(seed, spec.batch_size)
    while step < steps_budget:
        model.train()
        tokens, ends, targets = _encode(raw_tok, next(batches), vocab[PAD_TOKEN], vocab)
        loss = torch.nn.functional.cross_entropy(_end_logits(model, tokens, ends), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        step += 1
        loss_val = float(loss.detach())
        losses.append(loss_val)
        if eval_every and (step % eval_every == 0 or step == steps_budget):
            model.eval()
            acc = heldout_accuracy(model, eval_set)
            print(
                f"step {step} loss {sum(losses[-eval_every:]) / len(losses[-eval_every:]):.4f} heldout_acc {acc:.4f}",
                flush=True,
            )
            reached = spec.target_accuracy is not None and acc >= spec.target_accuracy
            if reached and step >= spec.min_steps:
                break
    model.eval()
    acc = heldout_accuracy(model, eval_set)
    metrics: dict[str, Any] = {
        "name": name,
        "description": spec.description,
        "seed": seed,
        "steps": step,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "optimizer": "Adam",
        "threads": threads,
        "deterministic_algorithms": True,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "final_train_loss": loss_val,
        "mean_train_loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "heldout_accuracy": round(acc, 4),
        "heldout_examples": n_eval,
        "torch_version": torch.__version__,
    }
    _save(model, raw_tok, cfg_dict, metrics, out_dir)
    return metrics


def _save(
    model: HookedTransformer,
    tok: Tokenizer,
    cfg: dict[str, Any],
    metrics: dict[str, Any],
    out_dir: Path,
) -> None:
    """Write weights (parameters only), config, tokenizer and training metrics to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.named_parameters()}
    save_file(weights, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(out_dir / TOKENIZER_FILE))
    (out_dir / TRAINING_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m pathdb.models.train --name NAME --out DIR``."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", choices=sorted(TOY_SPECS), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None)
    args = p.parse_args(argv)
    print(json.dumps(train_toy(args.name, args.out, args.seed, max_steps=args.max_steps), indent=2))


if __name__ == "__main__":
    main()
