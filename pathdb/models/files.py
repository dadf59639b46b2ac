"""On-disk layout of a pathdb toy model directory and the config round trip."""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformer_lens import HookedTransformerConfig
except (
    ImportError
):  # TransformerLens 4 removed it: toys boot as native bridges (pathdb.models.loading)
    HookedTransformerConfig = None  # type: ignore[misc,assignment]

WEIGHTS_FILE = "model.safetensors"  # parameters only (buffers are rebuilt from the config)
CONFIG_FILE = "config.json"  # HookedTransformerConfig fields, dtype as a string
TOKENIZER_FILE = "tokenizer.json"  # `tokenizers` WordLevel tokenizer
TRAINING_FILE = "training.json"  # seed, steps, wall time, losses, held-out accuracy, versions


def config_from_dict(d: dict[str, Any]) -> HookedTransformerConfig:
    """Rebuild a HookedTransformerConfig from a config.json dict (dtype given as a string)."""
    kwargs = dict(d)
    kwargs["dtype"] = getattr(torch, str(kwargs.get("dtype", "float32")))
    return HookedTransformerConfig(**kwargs)
