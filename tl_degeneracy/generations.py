"""The two TransformerLens generations behind one small interface.

TL <= 3.x ships ``HookedTransformer``; TL 4.x replaced it with ``TransformerBridge``.
Both expose the same hook API (``hook_dict``, ``hooks()``, ``run_with_hooks``,
``run_with_cache``) and the same hook names, which is all the collectors use. This
module holds the few places where the generations differ: building a model from a
TL-format state dict and describing a model so that a checkpoint or basis file can be
checked against it. Loading pretrained models (hub names, local folders, GGUF files) is
``loading``'s.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import torch

# HookedTransformer (TL 3.x), TransformerBridge (TL 4.x) or another HookedRootModule with a cfg.
# Typed Any: both generations are nn.Modules whose cfg, blocks and hooks are resolved dynamically.
HookedModel = Any


def installed_generation() -> int:
    """3 when ``transformer_lens.HookedTransformer`` exists (TL <= 3.x), else 4."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return 4
    return 3


def transformer_lens_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def model_kind(model: HookedModel) -> str:
    """The class name users know the model by ("HookedTransformer", "TransformerBridge", ...)."""
    return type(model).__name__


def model_cfg(model: HookedModel) -> Any:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError(
            f"{model_kind(model)} has no .cfg; tl_degeneracy needs a TransformerLens model "
            "(HookedTransformer, TransformerBridge or a HookedRootModule with a cfg)."
        )
    return cfg


def model_dtype(model: HookedModel) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def model_device(model: HookedModel) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def trainable_parameter_count(model: HookedModel) -> int:
    """Distinct trainable parameter entries, tied weights once.

    Parameters sharing storage count once (a bridge keeps Hugging Face's tied embedding and
    unembedding as one tensor); so does an unembedding ``W_U`` equal to ``W_Eᵀ`` (TL 3.x copies a tied
    checkpoint's embedding into its own ``W_U``). Weight processing that changes ``W_U`` (centring)
    unties it, and it then counts.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if p.requires_grad and key not in seen:
            seen.add(key)
            total += p.numel()
    W_U, W_E = getattr(model, "W_U", None), getattr(model, "W_E", None)
    if isinstance(W_U, torch.Tensor) and isinstance(W_E, torch.Tensor) and W_U.shape == W_E.T.shape \
            and W_U.data_ptr() != W_E.data_ptr() and torch.equal(W_U.detach(), W_E.detach().T):
        total -= W_U.numel()
    return total


def _cfg_summary(model: HookedModel) -> dict[str, Any]:
    cfg = getattr(model, "cfg", None)
    keys = ("model_name", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx",
            "act_fn", "normalization_type", "n_key_value_heads", "gated_mlp", "positional_embedding_type")
    return {k: getattr(cfg, k, None) for k in keys if cfg is not None and getattr(cfg, k, None) is not None}


def _weight_checksum(model: HookedModel) -> tuple[float, float]:
    """Sum and sum of squares of every parameter, in float64, one slice at a time (no full copy)."""
    total, squares = 0.0, 0.0
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            for start in range(0, flat.numel(), 1 << 20):
                chunk = flat[start:start + (1 << 20)].to(torch.float64)
                total += float(chunk.sum())
                squares += float(chunk.square().sum())
    return total, squares


# describe_model's cache, keyed weakly by the model (nothing is stored on the user's model).
_DESCRIPTIONS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, dict[str, Any]]] = weakref.WeakKeyDictionary()


def describe_model(model: HookedModel) -> dict[str, Any]:
    """A JSON-able identity card: class, TL version, config, processing flags, weight checksum.

    The checksum (sum and sum of squares of every parameter, in float64) tells two
    models with the same config but different weights apart, cheaply. It is cached on the
    model and recomputed only when a parameter is replaced or changed in place.
    """
    key = tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())
    cached = _DESCRIPTIONS.get(model)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    total, squares = _weight_checksum(model)
    summary = _cfg_summary(model)
    digest = hashlib.sha256(json.dumps([summary, f"{total:.9e}", f"{squares:.9e}"]).encode()).hexdigest()
    description = {
        "class": model_kind(model),
        "transformer_lens": transformer_lens_version(),
        "cfg": {k: str(v) if not isinstance(v, (int, float, str, bool)) else v for k, v in summary.items()},
        "compatibility_mode": bool(getattr(model, "compatibility_mode", False)),
        "dtype": str(model_dtype(model)),
        "weights_sha256": digest,
    }
    _DESCRIPTIONS[model] = (key, description)
    return dict(description)


def _legacy_config_dict(cfg: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {**cfg, "dtype": dtype}


def model_from_tl_state_dict(
    cfg: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
) -> torch.nn.Module:
    """Build a model in the *installed* generation from a HookedTransformer-format state dict.

    TL 3.x: ``HookedTransformer(HookedTransformerConfig(**cfg))``. TL 4.x:
    ``TransformerBridge.boot_native`` of the same config, loaded through
    ``convert_tl_checkpoint``. Neither path processes the weights (no LN folding), so
    both generations compute the same function on the same weights.
    """
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    if installed_generation() == 3:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**_legacy_config_dict(cfg, dtype)), tokenizer=tokenizer)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        real_missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
        if real_missing or unexpected:
            raise ValueError(f"state dict does not fit the config: missing {real_missing}, unexpected {unexpected}")
    else:
        from transformer_lens import TransformerBridge
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

        bridge_cfg = TransformerBridgeConfig(**cfg)
        named = {"model_name": cfg["model_name"]} if "model_name" in cfg else {}
        model = TransformerBridge.boot_native(bridge_cfg, tokenizer=tokenizer, dtype=dtype, **named)
        model.load_state_dict(convert_tl_checkpoint(state_dict, bridge_cfg), strict=True)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def tokenizer_of(model: HookedModel) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            f"{model_kind(model)} has no tokenizer, so text data cannot be tokenized. "
            "Pass token ids (a tensor or an iterable of tensors) instead, or attach a tokenizer "
            "(model.set_tokenizer(...))."
        )
    return tok
