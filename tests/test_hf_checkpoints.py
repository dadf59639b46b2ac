"""Local Hugging Face checkpoint directories of the supported families load fully offline through
TransformerLens' own weight conversion, and the loaded model's logits equal the HF model's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pathdb.models import load

TINY: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "vocab_size": 61, "max_position_embeddings": 64,
}  # fmt: skip


def _configs() -> dict[str, Any]:
    from transformers import Gemma2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    gqa = {**TINY, "num_key_value_heads": 2}
    return {
        "llama": LlamaConfig(**gqa, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "qwen2": Qwen2Config(**{**TINY, "num_key_value_heads": 1}),
        "mistral": MistralConfig(**gqa, sliding_window=3),
        "gemma2": Gemma2Config(**gqa, head_dim=8, sliding_window=3, query_pre_attn_scalar=6,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        "gpt_neox": GPTNeoXConfig(**TINY, rotary_pct=0.5, use_parallel_residual=True),
    }  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gpt_neox"])
def test_checkpoint_loads_offline_with_equal_logits(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _configs()[family]
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random (non-unit) norm gains and biases, so no term vanishes
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = load(str(tmp_path), device="cpu")
    tokens = torch.randint(
        0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
    assert model.cfg.original_architecture == type(hf).__name__
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
