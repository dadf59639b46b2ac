"""Tiny randomly initialised HookedTransformers, one per architecture family the engine supports."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

_BASE: dict[str, Any] = {
    "n_layers": 3, "d_model": 32, "d_head": 8, "n_heads": 4, "d_mlp": 48, "d_vocab": 29, "n_ctx": 16,
    "dtype": torch.float64, "init_weights": True,
}  # fmt: skip
_LLAMA: dict[str, Any] = {
    "normalization_type": "RMS", "final_rms": True, "positional_embedding_type": "rotary", "rotary_dim": 8,
    "rotary_adjacent_pairs": False, "gated_mlp": True, "act_fn": "silu", "n_key_value_heads": 2,
    "original_architecture": "LlamaForCausalLM",
}  # fmt: skip

# Each family's features as TransformerLens 3.9 configures them for its weights.
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {"normalization_type": "LN", "act_fn": "gelu_new", "positional_embedding_type": "standard"},
    "neox": {  # Pythia: parallel blocks, partial rotary (a quarter of d_head), LayerNorm
        "normalization_type": "LN", "act_fn": "gelu", "positional_embedding_type": "rotary", "rotary_dim": 2,
        "rotary_adjacent_pairs": False, "parallel_attn_mlp": True, "original_architecture": "GPTNeoXForCausalLM",
    },
    "gptj": {  # GPT-J: parallel blocks, adjacent-pair rotary on half the head
        "normalization_type": "LN", "act_fn": "gelu_new", "positional_embedding_type": "rotary", "rotary_dim": 4,
        "rotary_adjacent_pairs": True, "parallel_attn_mlp": True, "original_architecture": "GPTJForCausalLM",
    },
    "llama3": {  # Llama-3.1: GQA 4/2, SwiGLU, RMSNorm, NTK-by-parts rotary scaling
        **_LLAMA, "rotary_base": 500000.0, "use_NTK_by_parts_rope": True, "NTK_by_parts_factor": 8.0,
        "NTK_by_parts_low_freq_factor": 1.0, "NTK_by_parts_high_freq_factor": 4.0, "NTK_original_ctx_len": 8,
    },
    "qwen2": {**_LLAMA, "n_key_value_heads": 1, "rotary_base": 1000000, "original_architecture": "Qwen2ForCausalLM"},
    "mistral": {
        **_LLAMA, "use_local_attn": True, "window_size": 3, "attn_types": ["local"] * 3,
        "original_architecture": "MistralForCausalLM",
    },
    "gemma2": {  # GeGLU, post-sublayer norms, soft-caps, alternating local/global, own attention scale
        **_LLAMA, "act_fn": "gelu_pytorch_tanh", "use_normalization_before_and_after": True,
        "attn_scores_soft_cap": 6.0, "output_logits_soft_cap": 4.0, "use_local_attn": True, "window_size": 3,
        "attn_types": ["local", "global", "local"], "attn_scale": 2.5, "original_architecture": "Gemma2ForCausalLM",
    },
}  # fmt: skip


def family_model(family: str, seed: int = 0, **overrides: Any) -> HookedTransformer:
    """A float64 model of ``family`` with random weights, biases and norm gains (nothing vanishes)."""
    cfg = HookedTransformerConfig(**{**_BASE, **FAMILIES[family], "seed": seed, **overrides})
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.split(".")[-1]
            if last in ("w", "b") or last.lstrip("_").startswith("b_"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.mul_(3.0)
    model.eval()
    return model
