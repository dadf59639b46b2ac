"""TransformerLens 4 ``TransformerBridge`` models behind the model seam, as HookedTransformer look-alikes.

TransformerLens 4.0 removed ``HookedTransformer``; a model is a ``TransformerBridge`` around a
Hugging Face module (``boot_transformers``) or a TL-native module (``boot_native``). The path engine
recomputes node functions from weights and the residual stream, so :class:`BridgeModel` presents
exactly the surface of ``HookedTransformer`` that the seam (:mod:`pathdb.arch.compute`), the metric
readout and prompt tokenisation use, fed from the bridge:

- ``cfg``: HookedTransformer field names and meanings (``original_architecture`` is the bridge's
  HF architecture, ``use_normalization_before_and_after`` is read from the blocks' post norms);
- ``blocks[l].attn``: ``W_Q/W_K/W_V [H, D, dh]``, ``W_O [H, dh, D]`` and biases in HookedTransformer
  layout from the bridge's compatibility-mode weight views (unprocessed: no LN folding or
  centring), grouped key/value heads expanded per query head, absent biases as zeros;
  ``attn_scale`` from the attention module's own scaling, ``attn_type`` from its sliding window,
  ``rotary_cos/sin`` tables from the model's own rotary module (every RoPE scaling it implements;
  TL-native toys rotate adjacent pairs, so their ``cfg.rotary_adjacent_pairs`` is True);
- ``blocks[l].ln1/ln2/mlp/ln1_post/ln2_post``, ``ln_final``: the wrapped model's own modules, called
  directly (pure functions of their input: no hook fires, nothing is re-implemented);
- ``run_with_cache``: one bridge forward keeping the residual hooks the engine reads
  (``hook_embed``, ``blocks.l.hook_resid_pre/mid/post``), never per-head ln1 sub-hooks;
- ``W_E``, ``W_U``, ``b_U``, the tokenizer and ``to_tokens``/``to_str_tokens``: the bridge's own.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from pathdb.arch import (
    BRIDGE_ARCHITECTURES,
    UnsupportedModelError,
    check_supported,
    unsupported_features,
)

TL_MAJOR = int(version("transformer-lens").split(".")[0])

_CFG_FIELDS = (
    "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "n_key_value_heads",
    "normalization_type", "positional_embedding_type", "act_fn", "gated_mlp", "eps", "final_rms",
    "default_prepend_bos", "attn_only", "num_experts", "use_qk_norm", "attention_dir", "clip_qkv",
)  # fmt: skip


def _inner(component: Any) -> Any:
    """The wrapped (Hugging Face or TL-native) module of a bridge component."""
    return getattr(component, "original_component", None) or component


class BridgeConfig:
    """HookedTransformer-style config of a bridge: the fields the seam and the metric read."""

    rotary_dim: int | None  # set from the rotary tables once they are read

    def __init__(self, bridge: Any, **facts: Any) -> None:
        """Copy the bridge config's shared fields, then the facts read from its modules."""
        src = bridge.cfg
        for name in _CFG_FIELDS:
            setattr(self, name, getattr(src, name, None))
        self.attention_dir: str = getattr(self, "attention_dir", None) or "causal"
        self.original_architecture = str(getattr(src, "architecture", None) or "unknown")
        self.model_name = str(getattr(src, "model_name", None) or "bridge")
        self.dtype = bridge.W_E.dtype
        self.device = str(bridge.W_E.device)
        self.use_attn_result = False
        self.rotary_adjacent_pairs = False
        self.__dict__.update(facts)

    def __getattr__(self, name: str) -> Any:
        """Fields are set in ``__init__``; a field the bridge lacks is an AttributeError (so
        ``getattr(cfg, name, default)`` falls back as on a HookedTransformerConfig)."""
        raise AttributeError(name)

    def is_layer_norm_activation(self) -> bool:
        """Whether the MLP activation carries a LayerNorm (SoLU-LN), as HookedTransformerConfig says."""
        return str(self.act_fn).lower() in ("solu_ln", "ln")


class BridgeAttention:
    """One layer's attention weights in HookedTransformer layout, read from the bridge on access."""

    def __init__(self, owner: BridgeModel, layer: int, scale: float, window: int | None) -> None:
        """Keep the owner (for the rotary tables) and the layer's scale and sliding window."""
        self._owner = owner
        self._attn = owner.bridge.blocks[layer].attn
        self.attn_scale = scale
        self.attn_type = "local" if window is not None else "global"
        self.window = window

    def _per_query_head(self, t: Tensor) -> Tensor:
        """Grouped key/value weights repeated for every query head reading them (like TL's W_K)."""
        n = self._owner.cfg.n_heads
        return t if t.shape[0] == n else t.repeat_interleave(n // t.shape[0], dim=0)

    def _bias(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The bias ``name``, zeros where the model has none."""
        b = getattr(self._attn, name)
        w = self._owner.W_E
        return torch.zeros(shape, dtype=w.dtype, device=w.device) if b is None else b

    W_Q = property(lambda self: self._attn.W_Q)
    W_O = property(lambda self: self._attn.W_O)
    W_K = property(lambda self: self._per_query_head(self._attn.W_K))
    W_V = property(lambda self: self._per_query_head(self._attn.W_V))
    b_Q = property(lambda self: self._bias("b_Q", tuple(self.W_Q.shape[::2])))
    b_K = property(
        lambda self: self._per_query_head(self._bias("b_K", tuple(self._attn.W_K.shape[::2])))
    )
    b_V = property(
        lambda self: self._per_query_head(self._bias("b_V", tuple(self._attn.W_V.shape[::2])))
    )
    b_O = property(lambda self: self._bias("b_O", (self.W_O.shape[-1],)))
    rotary_cos = property(lambda self: self._owner.rotary_tables()[0])
    rotary_sin = property(lambda self: self._owner.rotary_tables()[1])


class BridgeBlock:
    """One block's norms, MLP and attention as the seam reads them (``ln*_post`` where present)."""

    def __init__(self, owner: BridgeModel, layer: int, scale: float, window: int | None) -> None:
        """The wrapped model's own norm and MLP modules of block ``layer``."""
        block = owner.bridge.blocks[layer]
        self.attn = BridgeAttention(owner, layer, scale, window)
        self.ln1, self.ln2, self.mlp = _inner(block.ln1), _inner(block.ln2), _inner(block.mlp)
        self.ln1_post = _inner(block.ln1_post) if hasattr(block, "ln1_post") else None
        self.ln2_post = _inner(block.ln2_post) if hasattr(block, "ln2_post") else None


def _attn_scale(module: Any, d_head: int, native_scale: float | None) -> float:
    """What the layer divides its scores by: ``1 / scaling`` of an HF attention module, the native
    module's ``scale``, else ``sqrt(d_head)`` (GPT-2)."""
    if native_scale is not None:
        return float(native_scale)
    scaling = getattr(module, "scaling", None)
    return 1.0 / float(scaling) if scaling else float(d_head) ** 0.5


def _windows(hf: Any, inner_attn: list[Any]) -> list[int | None]:
    """Per layer, the sliding window (None for global layers): the attention module's own, else the
    HF config's ``sliding_window`` on ``sliding_attention`` layers (all layers without ``layer_types``)."""
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * len(inner_attn)
    return [
        getattr(a, "sliding_window", None)
        or (int(window) if window and types[i] == "sliding_attention" else None)
        for i, a in enumerate(inner_attn)
    ]


def _is_native_rotary(module: Any) -> bool:
    """Whether ``module`` is TL's native rotary (adjacent-pair cos/sin tables, no forward), not an
    HF rotary embedding (half-split tables from its forward)."""
    return type(module).__name__ == "NativeRotary"


def _rotary_module(bridge: Any) -> Any | None:
    """The wrapped model's one rotary-embedding module, None without rotary positions."""
    found = [
        m
        for _, m in bridge.original_model.named_modules()
        if type(m).__name__.endswith("RotaryEmbedding") or _is_native_rotary(m)
    ]
    if len(found) > 1:
        raise UnsupportedModelError(
            str(getattr(bridge.cfg, "model_name", "bridge")),
            [f"{len(found)} rotary embeddings (per-layer-type rotary tables)"],
        )
    return found[0] if found else None


class BridgeModel:
    """A TransformerLens 4 bridge presented as the ``HookedTransformer`` surface the engine uses."""

    is_bridge = True  # what HookedTransformer-only code (the edge-masked forward) checks to refuse

    def __init__(self, bridge: Any) -> None:
        """Refuse architectures the adapter does not read, read the facts once, check support."""
        arch = str(getattr(bridge.cfg, "architecture", None))
        name = str(getattr(bridge.cfg, "model_name", None) or "bridge")
        facts = SimpleNamespace(**{f: getattr(bridge.cfg, f, None) for f in _CFG_FIELDS})
        facts.original_architecture, facts.attention_dir = arch, facts.attention_dir or "causal"
        problems = unsupported_features(facts)
        if arch not in BRIDGE_ARCHITECTURES:
            problems.append(
                f"TransformerBridge architecture {arch!r} (the TL 4 route reads {', '.join(BRIDGE_ARCHITECTURES)})"
            )
        if problems:
            raise UnsupportedModelError(name, problems)
        self.bridge = bridge
        blocks = list(bridge.blocks)
        inner_attn = [_inner(b.attn) for b in blocks]
        hf = getattr(bridge.original_model, "config", None)
        windows = _windows(hf, inner_attn)
        self._rotary = _rotary_module(bridge)
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedModelError(name, ["scale_attn_by_inverse_layer_idx=True"])
        if len({w for w in windows if w is not None}) > 1:
            raise UnsupportedModelError(name, [f"sliding windows of different sizes {windows}"])
        caps = {
            f: float(getattr(bridge.cfg, f, -1.0) or -1.0)
            for f in ("attn_scores_soft_cap", "output_logits_soft_cap")
        }
        self.cfg = BridgeConfig(
            bridge,
            positional_embedding_type="rotary" if self._rotary is not None else "standard",
            rotary_dim=None,
            rotary_adjacent_pairs=self._rotary is not None and _is_native_rotary(self._rotary),
            parallel_attn_mlp=bool(getattr(bridge.cfg, "parallel_attn_mlp", False)),
            use_normalization_before_and_after=all(hasattr(b, "ln1_post") for b in blocks),
            use_local_attn=any(w is not None for w in windows),
            window_size=next((int(w) for w in windows if w is not None), None),
            **caps,
        )
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        if self._rotary is not None:
            self.cfg.rotary_dim = int(self.rotary_tables()[0].shape[-1])
        d_head = int(self.cfg.d_head)
        self.blocks = [
            BridgeBlock(self, i, _attn_scale(a, d_head, getattr(a, "scale", None)), windows[i])
            for i, a in enumerate(inner_attn)
        ]
        self.ln_final = _inner(bridge.ln_final)
        check_supported(self)

    # ---- weights and tables --------------------------------------------------------------
    @property
    def W_E(self) -> Tensor:
        """Token embedding ``[V, D]``."""
        return self.bridge.W_E

    @property
    def W_U(self) -> Tensor:
        """Unembedding ``[D, V]``."""
        return self.bridge.W_U

    @property
    def b_U(self) -> Tensor:
        """Unembedding bias ``[V]`` (zeros where the model has none)."""
        b = self.bridge.b_U
        return (
            torch.zeros(self.W_U.shape[-1], dtype=self.W_U.dtype, device=self.W_U.device)
            if b is None
            else b
        )

    def rotary_tables(self) -> tuple[Tensor, Tensor]:
        """``(cos, sin) [n_ctx, rotary_dim]`` from the model's own rotary module (half-split layout
        for HF modules, adjacent-pair layout for TL's native one, with whatever scaling it applies),
        built once per device and dtype."""
        w = self.W_E
        key = (w.device, w.dtype)
        if key not in self._tables:
            rotary = self._rotary
            assert rotary is not None, "rotary tables of a model without rotary positions"
            if _is_native_rotary(rotary):
                cos, sin = rotary.cos_cached[None], rotary.sin_cached[None]
            else:
                pos = torch.arange(int(self.cfg.n_ctx), device=w.device)[None]
                with torch.inference_mode(False), torch.no_grad():
                    cos, sin = rotary(torch.zeros(1, dtype=w.dtype, device=w.device), pos)
            self._tables[key] = (
                cos[0].to(w.device, w.dtype).clone(),
                sin[0].to(w.device, w.dtype).clone(),
            )
        return self._tables[key]

    # ---- running ---------------------------------------------------------------------------
    def run_with_cache(
        self, tokens: Tensor, names_filter: Callable[[str], bool] | None = None, **kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One bridge forward; the logits and the activations of the hooks ``names_filter`` keeps."""
        logits, cache = self.bridge.run_with_cache(tokens, names_filter=names_filter, **kwargs)
        return logits, {k: v for k, v in cache.items()}

    def __call__(self, tokens: Tensor, **kwargs: Any) -> Tensor:
        """The bridge's logits for ``tokens``."""
        return self.bridge(tokens, **kwargs)

    def to(
        self, target: str | torch.device | torch.dtype, print_details: bool = False
    ) -> BridgeModel:
        """Move or cast the bridge in place (``HookedTransformer.to``'s signature)."""
        self.bridge.to(target)
        if isinstance(target, torch.dtype):
            self.cfg.dtype = target
        else:
            self.cfg.device = str(target)
        return self

    def eval(self) -> BridgeModel:
        """Eval mode for the bridge."""
        self.bridge.eval()
        return self

    def __getattr__(self, name: str) -> Any:
        """Everything else (tokenizer, ``to_tokens``, ``to_str_tokens``, ``state_dict``) from the bridge."""
        if name == "bridge":
            raise AttributeError(name)
        return getattr(self.bridge, name)


def adapt(bridge: Any) -> BridgeModel:
    """A bridge in compatibility mode without weight processing, behind the seam."""
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    bridge.eval()
    return BridgeModel(bridge)
