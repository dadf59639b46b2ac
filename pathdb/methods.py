"""The ``pathdb attribute`` vocabulary (no torch: the CLI refuses bad options before loading):
methods, their own options and defaults, and which options apply to which method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: the ``--method`` values
METHODS = ("eap", "eap-ig", "atp*", "edge-patching", "learned-mask")

#: method-specific option (request key) -> (CLI spelling, the methods it applies to)
METHOD_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ig_steps": ("--ig-steps", ("eap-ig",)),
    "qk_fix": ("--qk-fix/--no-qk-fix", ("atp*",)),
    "grad_drop": ("--grad-drop/--no-grad-drop", ("atp*",)),
    "penalties": ("--penalty", ("learned-mask",)),
    "steps": ("--steps", ("learned-mask",)),
    "lr": ("--lr", ("learned-mask",)),
    "seed": ("--seed", ("learned-mask",)),
}

#: defaults of the method options
DEFAULTS: dict[str, Any] = {"ig_steps": 5, "qk_fix": True, "grad_drop": True, "penalties": [0.1],
                            "steps": 100, "lr": 0.1, "seed": 0}  # fmt: skip


def option_problem(method: str, options: Mapping[str, Any]) -> str | None:
    """What is wrong with ``method`` and its given ``options`` (None values = not given), or None."""
    if method not in METHODS:
        return f"--method must be one of {', '.join(METHODS)} (got {method!r})"
    for key, value in options.items():
        spelled, methods = METHOD_OPTIONS[key]
        if value is not None and method not in methods:
            return (
                f"{spelled.split('/')[0]} does not apply to --method {method} "
                f"(only to {', '.join(methods)}); drop it"
            )
    value = {k: DEFAULTS[k] if options.get(k) is None else options[k] for k in DEFAULTS}
    if value["ig_steps"] < 1:
        return f"--ig-steps must be >= 1 (got {value['ig_steps']})"
    if any(p < 0 for p in value["penalties"]):
        return f"--penalty must be >= 0 (got {value['penalties']})"
    if value["steps"] < 0 or value["lr"] <= 0:
        return f"--steps must be >= 0 and --lr > 0 (got {value['steps']}, {value['lr']})"
    return None
