"""Model loading (bundled offline toys, local checkpoints, official names), toy IOI data and training."""

from pathdb.models.loading import (
    DeviceError,
    ModelInfo,
    ModelLoadError,
    UnsupportedModelError,
    bundled_names,
    ensure_supported,
    fingerprint,
    list_models,
    load,
    move_model,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "DeviceError",
    "ModelInfo",
    "ModelLoadError",
    "UnsupportedModelError",
    "bundled_names",
    "ensure_supported",
    "fingerprint",
    "list_models",
    "load",
    "move_model",
    "resolve_device",
    "resolve_dtype",
]
