"""Model loading (bundled offline toys, local checkpoints, official names), toy IOI data and training."""

from pathdb.models.loading import (
    ModelInfo,
    ModelLoadError,
    UnsupportedModelError,
    bundled_names,
    ensure_supported,
    fingerprint,
    list_models,
    load,
)

__all__ = [
    "ModelInfo",
    "ModelLoadError",
    "UnsupportedModelError",
    "bundled_names",
    "ensure_supported",
    "fingerprint",
    "list_models",
    "load",
]
