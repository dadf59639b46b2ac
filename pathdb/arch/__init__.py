"""The model seam: everything architecture-specific the path engine, the graph and the exports need.

Two halves, so that read-only commands (queries, exports) never import torch:

- this module (no torch): the one support check (:func:`check_supported`, raising
  :class:`UnsupportedModelError` that names every unsupported feature) and the graph facts
  (:func:`parallel_blocks`: does the MLP of layer ``l`` read the block input, so that the heads of
  layer ``l`` do not feed it);
- :mod:`pathdb.arch.compute`: the tensor side (weights, normalisation, rotary positions, score
  caps and masks, MLP variants, post-sublayer norms, hook names) as one :class:`~pathdb.arch.compute.Arch`
  object per loaded model.

Supported, in TransformerLens 3.9 ``HookedTransformer`` conventions: learned absolute or rotary
positions (full or partial rotary dimension, any base/scaling TL bakes into its rotary tables),
LayerNorm / RMSNorm (folded or not), plain and gated MLPs, multi-, grouped- and multi-query
attention, q/k/v biases, parallel attention + MLP blocks, attention-score and final-logit
soft-capping, local (sliding-window) attention on any layers, and norms after the sublayers
(Gemma-2). Adding an architecture means this package and its tests.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "BRIDGE_ARCHITECTURES",
    "UnsupportedModelError",
    "check_supported",
    "parallel_blocks",
    "parallel_blocks_of",
]

# TransformerLens 4 bridge architectures whose wrapped modules pathdb.models.bridge reads (Hugging
# Face class names, and the TL-native architecture of the bundled toys); other bridges are refused.
BRIDGE_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "GPTNeoXForCausalLM",
    "TransformerLensNative",
)

# TransformerLens architectures whose blocks normalise *after* the residual add (OLMo-2/3).
_POST_NORM_ARCHS = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
_NORMS = ("LN", "LNPre", "RMS", "RMSPre")
_POSITIONS = ("standard", "rotary")


class UnsupportedModelError(ValueError):
    """The model uses an architecture feature the path engine does not implement (named in ``features``)."""

    def __init__(self, model_name: str, features: list[str]) -> None:
        """Build the one-line message naming the model and every unsupported feature."""
        self.model_name = model_name
        self.features = features
        super().__init__(
            f"model {model_name!r} is not supported by the path engine: {'; '.join(features)}. "
            "Supported: decoders with learned or rotary positions, LayerNorm/RMSNorm, plain or gated "
            "MLPs, multi-/grouped-query attention, parallel blocks, soft-caps, local attention and "
            "Gemma-2 post-norms (GPT-2, GPT-NeoX/Pythia, Llama, Qwen-2, Mistral, Gemma-2)"
        )


def _cfg(model_or_cfg: Any) -> Any:
    """The config of a HookedTransformer, or the argument itself when it is a config."""
    return getattr(model_or_cfg, "cfg", model_or_cfg)


def unsupported_features(model_or_cfg: Any) -> list[str]:
    """Every feature of the model's config the engine does not implement, as readable phrases."""
    cfg = _cfg(model_or_cfg)
    get = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    out: list[str] = []
    bridge_arch = get(
        "architecture"
    )  # a TransformerLens 4 bridge config (no original_architecture)
    if get("original_architecture") is None and bridge_arch not in (None, *BRIDGE_ARCHITECTURES):
        out.append(
            f"TransformerBridge architecture {bridge_arch!r} (the TL 4 route reads {', '.join(BRIDGE_ARCHITECTURES)})"
        )
    pos = get("positional_embedding_type", "standard")
    if pos not in _POSITIONS:
        out.append(
            f"positional_embedding_type={pos!r} (ALiBi, shortformer and relative biases are not implemented)"
        )
    norm = get("normalization_type")
    if norm not in _NORMS:
        out.append(f"normalization_type={norm!r} (a LayerNorm or RMSNorm is required)")
    if get("attn_only", False):
        out.append("attn_only=True (attention-only models have no MLP nodes)")
    if get("num_experts"):
        out.append(f"mixture-of-experts MLPs (num_experts={get('num_experts')})")
    if get("use_qk_norm", False) or get("original_architecture") in (
        "OlmoeForCausalLM",
        *_POST_NORM_ARCHS,
    ):
        out.append("query/key normalisation (use_qk_norm / OLMo q_norm, k_norm)")
    if get("original_architecture") in _POST_NORM_ARCHS:
        out.append("post-norm blocks (OLMo-2/3 normalise after the residual add)")
    if get("clip_qkv") is not None:
        out.append(f"clip_qkv={get('clip_qkv')} (clamped queries/keys/values)")
    if get("use_attention_sinks", False):
        out.append("use_attention_sinks=True (learned attention-sink logits)")
    if get("attention_dir", "causal") != "causal":
        out.append(
            f"attention_dir={get('attention_dir')!r} (the path graph assumes causal attention)"
        )
    if get("use_logn_attn", False):
        out.append("use_logn_attn=True (log-n query scaling)")
    if get("use_dynamic_ntk_rope", False):
        out.append("use_dynamic_ntk_rope=True (length-dependent rotary tables)")
    if get("load_in_4bit", False):
        out.append("load_in_4bit=True (quantised weights)")
    if get("use_normalization_before_and_after", False) and not str(norm).startswith("RMS"):
        out.append(
            "use_normalization_before_and_after with a LayerNorm (only Gemma-2's RMSNorm is implemented)"
        )
    return out


def check_supported(model_or_cfg: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming every unsupported feature (a model or its config)."""
    problems = unsupported_features(model_or_cfg)
    if problems:
        raise UnsupportedModelError(
            str(getattr(_cfg(model_or_cfg), "model_name", "model")), problems
        )


def parallel_blocks(model_or_cfg: Any) -> bool:
    """Whether attention and MLP read the same block input (GPT-J, GPT-NeoX/Pythia): then the heads
    of layer ``l`` do not feed ``MLP(l)`` (EAP-IG's ``parallel_attn_mlp``)."""
    return bool(getattr(_cfg(model_or_cfg), "parallel_attn_mlp", False))


def _parallel_from_config_json(data: dict[str, Any]) -> bool:
    """The parallel-blocks fact of a pathdb toy or Hugging Face ``config.json``."""
    if "parallel_attn_mlp" in data:
        return bool(data["parallel_attn_mlp"])
    kind = data.get("model_type")
    if kind == "gpt_neox":
        return bool(data.get("use_parallel_residual", True))
    return kind == "gptj"


# TransformerLens official families with parallel blocks (their names, lower-cased, contain these).
_PARALLEL_OFFICIAL = ("pythia", "gpt-neox", "gpt-j", "gptj")


def parallel_blocks_of(model_name: str) -> bool:
    """The parallel-blocks fact of the model a run names (a bundled toy, a checkpoint directory or a
    TransformerLens official name), read without loading the model or importing torch."""
    bundled = resources.files("pathdb").joinpath("data", "models", model_name, "config.json")
    candidates: list[Any] = [bundled, Path(model_name).expanduser() / "config.json"]
    for c in candidates:
        try:
            if c.is_file():
                data = json.loads(c.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    return _parallel_from_config_json(data)
        except (OSError, ValueError):
            continue
    lowered = model_name.lower()
    return any(f in lowered for f in _PARALLEL_OFFICIAL)
