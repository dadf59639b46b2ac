"""Load models as TransformerLens 3.9 ``HookedTransformer``s or, under TransformerLens 4, as
``TransformerBridge``s behind :class:`pathdb.models.bridge.BridgeModel`: bundled toys, local
checkpoints, official names.

Under TL 4 (no ``HookedTransformer``): toys boot on TL's native route (``boot_native`` +
``convert_tl_checkpoint``), local Hugging Face directories and official names
through ``boot_transformers`` (offline for directories), in compatibility mode without weight
processing, so the engine sees the same unfolded weights as under TL 3.9.

Routes, tried in this order by :func:`load`:

1. a bundled toy name (``toy-ioi``, ``toy-ioi-2l``, ``toy-ioi-llama``): package data, fully offline;
2. a local directory: either a pathdb toy directory (``config.json`` with HookedTransformer
   fields + ``model.safetensors`` + ``tokenizer.json``) or a Hugging Face GPT-2 checkpoint
   (``config.json`` with ``model_type: gpt2`` + weights, tokenizer files optional), loaded with
   ``local_files_only=True`` and converted with TransformerLens' GPT-2 weight conversion: no hub
   access at all;
3. a TransformerLens official name (``gpt2-small``...): needs network or a Hugging Face cache;
   without either it fails within seconds with a message pointing at the offline routes.

Every loaded model is float32 (unless ``dtype`` asks for bfloat16, float16 or float64), in eval
mode, with ``cfg.use_attn_result`` False, and its weights are *not* folded/centred (LayerNorm
weights stay explicit, ``normalization_type`` ``LN``). ``device`` is ``cpu``, ``cuda``,
``cuda:N`` or ``auto`` (cuda when available); bad values are refused with a one-line
:class:`DeviceError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from tokenizers import Tokenizer

from pathdb.arch import UnsupportedModelError  # re-exported: the seam's one error type
from pathdb.arch import check_supported as ensure_supported  # noqa: F401  (the seam's one support check)
from pathdb.models.bridge import TL_MAJOR, BridgeModel, adapt
from pathdb.models.files import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    config_from_dict,
)
from pathdb.models.tokenizer import build_word_tokenizer, wrap_for_transformer_lens

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4 removed them: models load as bridges (pathdb.models.bridge)
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[misc,assignment]

HUB_CONNECT_TIMEOUT_S = 2.0

# Official names listed by `pathdb models` (shapes are those of the public checkpoints).
_OFFICIAL_LISTED: dict[str, tuple[int, int, int]] = {
    "gpt2-small": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and what to do instead."""


class DeviceError(ModelLoadError):
    """A ``--device`` or ``--dtype`` this machine cannot honour (the message names the fix)."""


NO_CUDA = "this torch has no CUDA; install a CUDA build of torch (see README: GPU users)"
DEVICES = "cpu, cuda, cuda:N or auto"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def resolve_device(spec: str | None) -> str:
    """The torch device for ``cpu``, ``cuda``, ``cuda:N`` or ``auto``/None (cuda when available,
    else cpu); refuses anything else, and cuda where this torch or machine has none."""
    s = "auto" if spec is None else spec.strip().lower()
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return s
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m is None:
        raise DeviceError(f"--device must be {DEVICES} (got {spec!r})")
    if not torch.backends.cuda.is_built():
        raise DeviceError(NO_CUDA)
    if not torch.cuda.is_available():
        raise DeviceError(
            "no CUDA GPU is visible to this torch (torch.cuda.is_available() is False): check the "
            "driver and CUDA_VISIBLE_DEVICES, or pass --device cpu"
        )
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        raise DeviceError(
            f"--device {s}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
        )
    return s


def resolve_dtype(spec: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype for ``float32`` (None), ``bfloat16``, ``float16`` or ``float64``."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DeviceError(f"dtype must be one of {', '.join(DTYPES)} (got {spec})")
        return spec
    name = "float32" if spec is None else spec.strip().lower()
    if name not in DTYPES:
        raise DeviceError(f"--dtype must be one of {', '.join(DTYPES)} (got {spec!r})")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``pathdb models``."""

    name: str
    kind: str  # "bundled", "local" or "official"
    layers: int | None
    heads: int | None
    d_model: int | None
    description: str
    heldout_accuracy: float | None = None


# ---------------------------------------------------------------- bundled toys
def _bundled_root() -> Traversable:
    """The package-data folder holding the bundled toy models."""
    return resources.files("pathdb").joinpath("data", "models")


def bundled_names() -> list[str]:
    """Names of the bundled toy models (folders with a config.json under pathdb/data/models)."""
    root = _bundled_root()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.joinpath(CONFIG_FILE).is_file()
    )


def _read_json(p: Traversable | Path) -> dict[str, Any]:
    """Parse a JSON object file."""
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ModelLoadError(f"{p}: expected a JSON object")
    return data


def _load_toy_dir(d: Traversable | Path, name: str, device: str) -> HookedTransformer | BridgeModel:
    """Rebuild a toy HookedTransformer (TL 3.9) or native bridge (TL 4) from config.json +
    model.safetensors + tokenizer.json."""
    if TL_MAJOR >= 4:
        return _bridge_toy_dir(d, name, device)
    cfg = config_from_dict(
        {**_read_json(d.joinpath(CONFIG_FILE)), "device": device, "model_name": name}
    )
    tok = wrap_for_transformer_lens(
        Tokenizer.from_str(d.joinpath(TOKENIZER_FILE).read_text(encoding="utf-8")), name
    )
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    weights = load_safetensors_bytes(d.joinpath(WEIGHTS_FILE).read_bytes())
    missing = {k for k, _ in model.named_parameters()} - set(weights)
    if missing:
        raise ModelLoadError(f"{name}: weights file lacks parameters {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)
    return model


def _half_split_to_adjacent(weights: dict[str, torch.Tensor], rotary_dim: int) -> None:
    """Reorder the d_head axis of every query/key weight and bias in place so that half-split
    rotary pairs ``(i, i + rotary_dim/2)`` become adjacent pairs ``(2i, 2i + 1)`` (same frequency
    ``i``): the model TL 4's native route rotates adjacent pairs. Queries and keys get the same
    permutation, so every score ``q . k`` is unchanged; values and outputs are untouched."""
    half = rotary_dim // 2
    order = torch.arange(rotary_dim).view(2, half).T.reshape(-1)  # 0, h, 1, h+1, ...
    for key in weights:
        if key.rsplit(".", 1)[-1] in ("W_Q", "b_Q", "W_K", "_W_K", "b_K", "_b_K"):
            w = weights[key]
            weights[key] = torch.cat((w[..., order], w[..., rotary_dim:]), dim=-1)


def _bridge_toy_dir(d: Traversable | Path, name: str, device: str) -> BridgeModel:
    """A toy on TransformerLens 4's native route: ``TransformerBridge.boot_native`` from the toy's
    config, its HookedTransformer-format weights converted by TL's ``convert_tl_checkpoint`` (a
    half-split rotary toy's query/key axes reordered for the native adjacent-pair rotation, a gated
    MLP's all-zero biases dropped: the native gated MLP has none)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    fields = _read_json(d.joinpath(CONFIG_FILE))
    weights = load_safetensors_bytes(d.joinpath(WEIGHTS_FILE).read_bytes())
    if fields.get("positional_embedding_type", "standard") == "rotary":
        if not fields.get("rotary_adjacent_pairs", False):
            _half_split_to_adjacent(weights, int(fields.get("rotary_dim") or fields["d_head"]))
        fields["rotary_adjacent_pairs"] = True
    if fields.get("gated_mlp", False):
        biases = [k for k in weights if k.endswith((".mlp.b_in", ".mlp.b_out"))]
        if any(bool(weights[k].any()) for k in biases):
            raise ModelLoadError(
                f"{name}: its gated MLP has non-zero biases, which TL 4's native gated MLP lacks; "
                f"load it under TransformerLens 3.9"
            )
        for k in biases:
            del weights[k]
    cfg = TransformerBridgeConfig.from_dict(
        {
            **fields,
            "dtype": torch.float32,
            "device": device,
            "model_name": name,
            "init_weights": False,
        }
    )
    tok = wrap_for_transformer_lens(
        Tokenizer.from_str(d.joinpath(TOKENIZER_FILE).read_text(encoding="utf-8")), name
    )
    bridge = TransformerBridge.boot_native(cfg, tokenizer=tok, device=device, model_name=name)
    bridge.load_state_dict(convert_tl_checkpoint(weights, cfg), strict=True)
    return adapt(bridge)


# ---------------------------------------------------------------- local Hugging Face checkpoints
def _hf_gpt2_config(hf: dict[str, Any], path: Path) -> HookedTransformerConfig:
    """HookedTransformerConfig for a Hugging Face GPT-2 config.json (no hub access)."""
    d_model, n_heads = int(hf["n_embd"]), int(hf["n_head"])
    return HookedTransformerConfig(
        n_layers=int(hf["n_layer"]),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=int(hf.get("n_inner") or 4 * d_model),
        d_vocab=int(hf["vocab_size"]),
        n_ctx=int(hf["n_positions"]),
        act_fn=str(hf.get("activation_function", "gelu_new")),
        eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        normalization_type="LN",
        positional_embedding_type="standard",
        use_attn_scale=bool(hf.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        dtype=torch.float32,
        model_name=path.name,
    )


def _has_tokenizer_files(path: Path) -> bool:
    """Whether a checkpoint directory ships tokenizer files."""
    return (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()


# Hugging Face model_type -> TransformerLens original_architecture (whose weight conversion applies).
HF_ARCHITECTURES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}


def _hf_head_dim(hf: Any) -> int:
    """Per-head width of a Hugging Face config (``head_dim`` when set, else hidden / heads)."""
    head_dim = getattr(hf, "head_dim", None)
    return int(head_dim) if head_dim else int(hf.hidden_size) // int(hf.num_attention_heads)


def _hf_tl_fields(hf: Any, arch: str) -> dict[str, Any]:
    """HookedTransformerConfig fields for a loaded Hugging Face config of a supported non-GPT-2
    family, as TransformerLens 3.9's ``convert_hf_model_config`` sets them for that family."""
    from transformer_lens.loading_from_pretrained import _apply_llama3_rope_scaling, _get_rope_theta
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

    d_head = _hf_head_dim(hf)
    common: dict[str, Any] = {
        "d_model": int(hf.hidden_size), "d_head": d_head, "n_heads": int(hf.num_attention_heads),
        "d_mlp": int(hf.intermediate_size), "n_layers": int(hf.num_hidden_layers), "d_vocab": int(hf.vocab_size),
        "n_ctx": min(int(hf.max_position_embeddings), 2048), "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False, "rotary_base": _get_rope_theta(hf), "original_architecture": arch,
    }  # fmt: skip
    if arch == "GPTNeoXForCausalLM":
        return {
            **common, "eps": hf.layer_norm_eps, "act_fn": hf.hidden_act, "normalization_type": "LN",
            "parallel_attn_mlp": bool(getattr(hf, "use_parallel_residual", True)),
            "rotary_dim": round(get_rotary_pct_from_config(hf) * d_head), "default_prepend_bos": False,
        }  # fmt: skip
    n_kv = int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
    llama_like = {
        **common, "eps": hf.rms_norm_eps, "normalization_type": "RMS", "final_rms": True, "gated_mlp": True,
        "rotary_dim": d_head, "n_key_value_heads": n_kv if n_kv != common["n_heads"] else None,
    }  # fmt: skip
    if arch == "Gemma2ForCausalLM":
        layer_types = (
            getattr(hf, "layer_types", None)
            or ["sliding_attention", "full_attention"] * hf.num_hidden_layers
        )
        return {
            **llama_like, "n_key_value_heads": n_kv, "act_fn": hf.hidden_activation,
            "use_normalization_before_and_after": True, "use_local_attn": True, "window_size": hf.sliding_window,
            "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types[: hf.num_hidden_layers]],
            "attn_scores_soft_cap": hf.attn_logit_softcapping or -1.0,
            "output_logits_soft_cap": hf.final_logit_softcapping or -1.0,
            "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
        }  # fmt: skip
    fields = {**llama_like, "act_fn": hf.hidden_act}
    if arch == "Qwen2ForCausalLM":
        fields.update(n_key_value_heads=n_kv, default_prepend_bos=False)
    if arch == "MistralForCausalLM" and getattr(hf, "sliding_window", None):
        fields.update(
            use_local_attn=True,
            window_size=hf.sliding_window,
            attn_types=["local"] * hf.num_hidden_layers,
        )
    if arch == "LlamaForCausalLM":
        _apply_llama3_rope_scaling(fields, hf)
    return fields


def _hf_architecture(hf: dict[str, Any], path: Path) -> str:
    """The TransformerLens architecture of a checkpoint's config.json, refused when unsupported."""
    kind = hf.get("model_type")
    if kind not in HF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: local checkpoints must be one of the architectures {', '.join(HF_ARCHITECTURES)} "
            f"(config.json model_type), got model_type {kind!r}; use a bundled toy ({_toys_text()}) instead"
        )
    return HF_ARCHITECTURES[kind]


def _placeholder_tokenizer(vocab: int, name: str) -> Any:
    """A word tokenizer ``<bos> <unk> <pad> t3 ...`` of ``vocab`` entries, for checkpoints without
    tokenizer files (TL 4's boot would otherwise look for one on the hub)."""
    words = ["<bos>", "<unk>", "<pad>", *(f"t{i}" for i in range(3, vocab))]
    return wrap_for_transformer_lens(build_word_tokenizer(words), name)


def _bridge_hf_dir(path: Path, device: str) -> BridgeModel:
    """A local Hugging Face checkpoint on TransformerLens 4: ``TransformerBridge.boot_transformers``
    offline, in compatibility mode without weight processing."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_json = _read_json(path / "config.json")
    _hf_architecture(hf_json, path)
    tokenizer = (
        None
        if _has_tokenizer_files(path)
        else _placeholder_tokenizer(int(hf_json["vocab_size"]), path.name)
    )
    try:
        with _hub_offline():
            bridge = TransformerBridge.boot_transformers(
                str(path), device=device, dtype=torch.float32, tokenizer=tokenizer
            )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: could not read the checkpoint: {e}") from e
    return adapt(bridge)


def _load_hf_dir(path: Path, device: str) -> HookedTransformer | BridgeModel:
    """Load a local Hugging Face checkpoint directory (GPT-2, Llama, Qwen2, Mistral, Gemma-2, GPT-NeoX)
    without touching the network: the HF model is read offline, then converted with TransformerLens'
    own weight conversion for its family; weights are not folded or centred. Under TL 4: a bridge."""
    if TL_MAJOR >= 4:
        return _bridge_hf_dir(path, device)
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_json = _read_json(path / "config.json")
    arch = _hf_architecture(hf_json, path)
    try:
        with _hub_offline():
            hf_model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch.float32
            )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: could not read the checkpoint weights: {e}") from e
    if arch == "GPT2LMHeadModel":
        cfg = _hf_gpt2_config(hf_json, path)
    else:
        cfg = HookedTransformerConfig(
            **_hf_tl_fields(hf_model.config, arch), dtype=torch.float32, model_name=path.name
        )
    cfg.device = device
    with _hub_offline():
        tokenizer = (
            AutoTokenizer.from_pretrained(path, local_files_only=True)
            if _has_tokenizer_files(path)
            else None
        )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    converted = get_pretrained_state_dict(str(path), cfg, hf_model)
    state = {k: v.detach().clone() for k, v in converted.items()}
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model


def _load_local_dir(path: Path, device: str) -> HookedTransformer | BridgeModel:
    """Load a pathdb toy directory or a Hugging Face checkpoint directory."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json)")
    if (
        (path / WEIGHTS_FILE).is_file()
        and (path / TOKENIZER_FILE).is_file()
        and "n_layers" in _read_json(path / CONFIG_FILE)
    ):
        return _load_toy_dir(path, path.name, device)
    return _load_hf_dir(path, device)


# ---------------------------------------------------------------- official TransformerLens names
def official_name(name: str) -> str | None:
    """The Hugging Face repo id of a TransformerLens official name or alias, else None."""
    if TL_MAJOR >= 4:
        from transformer_lens.supported_models import (  # type: ignore[attr-defined]
            get_official_model_name,
        )
    else:
        from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return str(get_official_model_name(name))
    except (ValueError, KeyError):
        return None


def _env_offline() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """One quick TCP connection attempt to the Hugging Face endpoint (DNS included), bounded by ``timeout``."""
    if _env_offline():
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    ok: list[bool] = []

    def attempt() -> None:
        with contextlib.suppress(OSError), socket.create_connection((host, 443), timeout=timeout):
            ok.append(True)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the repo's config.json is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force the Hugging Face libraries to use only the local cache inside the block."""
    import huggingface_hub.constants as hc

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hc.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _toys_text() -> str:
    """Comma-separated bundled toy names for error messages."""
    return ", ".join(bundled_names()) or "(none installed)"


def _offline_message(name: str) -> str:
    """The error text for an official model that cannot be downloaded."""
    return (
        f"could not download {name!r}: the Hugging Face hub is not reachable and the model is not in "
        f"the local Hugging Face cache. Use a local checkpoint directory instead (pass its path in "
        f"place of the name: a folder with config.json and model weights, e.g. written by "
        f"save_pretrained), or a bundled offline toy model: {_toys_text()}."
    )


def _load_official(name: str, repo_id: str, device: str) -> HookedTransformer | BridgeModel:
    """Load an official TransformerLens model, failing fast when it cannot be downloaded."""
    cached = _in_hf_cache(repo_id)
    online = hub_reachable()
    if not online and not cached:
        raise ModelLoadError(_offline_message(name))
    ctx = _hub_offline() if not online else contextlib.nullcontext()
    try:
        with ctx:
            if TL_MAJOR >= 4:
                from transformer_lens.model_bridge import TransformerBridge

                return adapt(
                    TransformerBridge.boot_transformers(repo_id, device=device, dtype=torch.float32)
                )
            return HookedTransformer.from_pretrained_no_processing(
                name, device=device, dtype=torch.float32
            )
    except UnsupportedModelError:
        raise
    except Exception as e:  # hub/cache failures surface as many exception types
        where = (
            "the Hugging Face hub" if online else "the local Hugging Face cache (hub unreachable)"
        )
        raise ModelLoadError(
            f"could not load {name!r} from {where}: {type(e).__name__}: {e}. Use a local checkpoint "
            f"directory instead (pass its path in place of the name), or a bundled offline toy "
            f"model: {_toys_text()}."
        ) from e


# ---------------------------------------------------------------- public API
def move_model(
    model: Any, device: str | None = None, dtype: str | torch.dtype | None = None
) -> Any:
    """Move ``model`` in place (like ``Module.to``) to ``device`` / ``dtype`` (see
    :func:`resolve_device`, :func:`resolve_dtype`); None leaves that property as it is."""
    if device is not None:
        dev = resolve_device(device)
        model.cfg.device = dev
        model.to(dev, print_details=False)
    if dtype is not None:
        model.to(resolve_dtype(dtype), print_details=False)  # also sets cfg.dtype
    return model


def _finish(model: Any, device: str, dtype: torch.dtype) -> Any:
    """``dtype``, eval mode, use_attn_result False, on ``device``."""
    model.cfg.use_attn_result = False
    move_model(model, device, dtype)
    model.eval()
    return model


def load(
    name_or_path: str, device: str | None = None, dtype: str | torch.dtype | None = None
) -> HookedTransformer:
    """Load a bundled toy, a local checkpoint directory, or an official TransformerLens model,
    on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``/None: cuda when available) in
    ``dtype`` (``float32``/None, ``bfloat16``, ``float16``, ``float64``)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)  # refuse bad values before loading
    with warnings.catch_warnings():
        # TransformerLens 3.x deprecates HookedTransformer in favour of 4.x's bridge (used under TL 4).
        warnings.filterwarnings(
            "ignore", message=r"HookedTransformer\S* is deprecated", category=DeprecationWarning
        )
        return _load(name_or_path, dev, dt)


def _load(name_or_path: str, dev: str, dt: torch.dtype) -> HookedTransformer:
    """:func:`load` without the warning filter."""
    if name_or_path in bundled_names():
        return _finish(
            _load_toy_dir(_bundled_root().joinpath(name_or_path), name_or_path, dev), dev, dt
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _finish(_load_local_dir(path, dev), dev, dt)
    repo_id = official_name(name_or_path)
    if repo_id is not None:
        return _finish(_load_official(name_or_path, repo_id, dev), dev, dt)
    raise ModelLoadError(
        f"unknown model {name_or_path!r}: not a bundled toy, not a local directory, not a "
        f"TransformerLens official name. Available toys: {_toys_text()}; "
        f"or pass a local Hugging Face checkpoint directory, or an official name such as gpt2-small."
    )


def list_models(
    local_dirs: Sequence[str | Path] = (), include_official: bool = True
) -> list[ModelInfo]:
    """Bundled toys, the given local checkpoint directories, and well-known official names."""
    out: list[ModelInfo] = []
    for name in bundled_names():
        d = _bundled_root().joinpath(name)
        cfg = _read_json(d.joinpath(CONFIG_FILE))
        tr = _read_json(d.joinpath(TRAINING_FILE)) if d.joinpath(TRAINING_FILE).is_file() else {}
        out.append(
            ModelInfo(
                name,
                "bundled",
                cfg["n_layers"],
                cfg["n_heads"],
                cfg["d_model"],
                str(tr.get("description", "")),
                tr.get("heldout_accuracy"),
            )
        )
    for ld in local_dirs:
        p = Path(ld)
        cfg = _read_json(p / "config.json")
        layers = cfg.get("n_layers", cfg.get("n_layer"))
        heads = cfg.get("n_heads", cfg.get("n_head"))
        width = cfg.get("d_model", cfg.get("n_embd"))
        out.append(
            ModelInfo(
                str(p),
                "local",
                layers,
                heads,
                width,
                f"local checkpoint ({cfg.get('model_type', 'pathdb toy')})",
            )
        )
    if include_official:
        for name, (layers, heads, width) in _OFFICIAL_LISTED.items():
            out.append(
                ModelInfo(
                    name,
                    "official",
                    layers,
                    heads,
                    width,
                    "TransformerLens official model (needs network or a Hugging Face cache)",
                )
            )
    return out


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes in sorted order), for provenance."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
