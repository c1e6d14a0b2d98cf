"""An affine basis as a sae_lens SAE, in the folder layout ``sae_lens.SAE.load_from_disk`` reads.

sae_lens's "standard" SAE (sae_lens 6.x ``StandardSAE``; 5.x ``SAE`` with ``architecture="standard"``) computes

    encode(x) = relu((x − b_dec · apply_b_dec_to_input) W_enc + b_enc)      W_enc: [d_in, d_sae]
    decode(z) = z W_dec + b_dec                                            W_dec: [d_sae, d_in]

A basis's coordinates ``f̂ = C (f − μ)`` are signed and a ReLU keeps one sign, so each of the ``k``
directions becomes two latents, ``d_sae = 2k``:

    W_enc = [Cᵀ, −Cᵀ]      b_enc = 0      apply_b_dec_to_input = True
    W_dec = [C⁺ᵀ; −C⁺ᵀ]    b_dec = μ

Latent ``i`` is ``relu(f̂_i)`` and latent ``k + i`` is ``relu(−f̂_i)``; since ``relu(t) − relu(−t) = t``,
``decode(encode(f)) = μ + C⁺ C (f − μ)``, the basis's own reconstruction (``f`` itself on the span it
keeps). μ is subtracted before the product (``b_dec`` applied to the input) rather than folded into
``b_enc = [−Cμ, Cμ]``: folded, each latent would be the difference of two large numbers wherever the
activations have a large mean (massive-activation coordinates), and float32 would lose it.

``cfg.json`` is written flat, in the layout sae_lens 5.x saved (every field at the top level, no
``sae_lens_version``). sae_lens 5.x reads it as its own, and 6.x reads it through the loader every SAE
published before 6.0 goes through (``handle_pre_6_0_config``), which moves ``model_name``, ``hook_name``,
``context_size``, ``dataset_path`` and ``prepend_bos`` into ``cfg.metadata``. The nested 6.x layout
would be readable by 6.x only, and would need a ``metadata.sae_lens_version`` ≥ 6 that no sae_lens
release wrote. What sae_lens has no field for (the basis kind, its importance ordering, the model's
weights checksum) is under ``"tl_degeneracy"`` in ``cfg.json``, which both versions ignore.

Nothing here imports sae_lens: the files are written from the formulas above, and
``tests/test_sae_lens_roundtrip.py`` loads them with sae_lens itself.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import atomic_save_safetensors
from ..hook_names import layer_of
from ..validation import positive_int
from ..version import __version__
from .protocol import Basis, require_linear

CFG_FILE = "cfg.json"  # the names sae_lens's loader looks for
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT = "tl_degeneracy.sae_lens/1"
LATENTS = "latent i < k is relu(f̂_i), latent k + i is relu(−f̂_i), f̂ = C (f − μ); importance[i] is direction i's"


@dataclass(frozen=True)
class SAELensSource:
    """Where the activations a basis reads come from, in sae_lens's terms.

    Attributes:
        model_name: the model as sae_lens should load it (``HookedSAETransformer.from_pretrained``'s name).
        context_size: tokens per sequence the basis was fitted on.
        dataset_path: the dataset it was fitted on (a ``datasets`` name, a local path, or a description).
        prepend_bos: whether each sequence started with BOS (tl_degeneracy tokenizes text with TransformerLens's
            ``tokenize_and_concatenate(add_bos_token=True)``).
        extra: JSON-able provenance with no sae_lens field, written under ``"tl_degeneracy"`` in cfg.json.
    """

    model_name: str
    context_size: int
    dataset_path: str
    prepend_bos: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        positive_int(self.context_size, "context_size")
        json.dumps(dict(self.extra))  # fails now, not halfway through writing a folder


def sae_lens_weights(basis: Basis, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` of the SAE that encodes ``relu(±f̂)`` (module docstring).

    Built in float64 from the basis's ``C``, ``C⁺`` and ``μ``, then cast to ``dtype``. A basis without
    those matrices (not affine) or without directions is a ValueError.
    """
    maps = require_linear(basis, "the sae_lens export")
    C, C_pinv, mu = (t.detach().to("cpu", torch.float64) for t in (maps.C, maps.C_pinv, maps.mean))
    k, d = C.shape
    if k == 0:
        raise ValueError(f"the {basis.kind!r} basis at {basis.hook!r} keeps no direction: nothing to export")
    if C_pinv.shape != (d, k) or mu.shape != (d,):
        raise ValueError(f"the {basis.kind!r} basis at {basis.hook!r} has C {tuple(C.shape)}, C_pinv "
                         f"{tuple(C_pinv.shape)} and mean {tuple(mu.shape)}; expected [k, d], [d, k] and [d]")
    weights = {
        "W_enc": torch.cat([C.T, -C.T], dim=1),
        "b_enc": torch.zeros(2 * k, dtype=torch.float64),
        "W_dec": torch.cat([C_pinv.T, -C_pinv.T], dim=0),
        "b_dec": mu,
    }
    return {name: t.to(dtype).contiguous() for name, t in weights.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``, the spelling sae_lens's cfg.json uses."""
    return str(dtype).removeprefix("torch.")


def sae_lens_config(basis: Basis, source: SAELensSource, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The flat cfg.json of ``basis``'s SAE (module docstring: why flat)."""
    require_linear(basis, "the sae_lens export")
    hook = basis.hook
    _, meta = basis.state()
    importance = basis.importance.detach().to("cpu", torch.float64).tolist()
    return {
        "architecture": "standard",
        "d_in": basis.d,
        "d_sae": 2 * basis.k,
        "dtype": dtype_name(dtype),
        "device": "cpu",
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
        "model_name": source.model_name,
        "hook_name": hook,
        # sae_lens 5 stops its activation store's forward after this block; a hook outside the blocks records 0
        "hook_layer": layer_of(hook) or 0,
        "hook_head_index": None,
        "context_size": source.context_size,
        "dataset_path": source.dataset_path,
        "dataset_trust_remote_code": False,
        "prepend_bos": source.prepend_bos,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "tl_degeneracy": {  # provenance first, so that it cannot overwrite what describes the latents
            **dict(source.extra), "format": FORMAT, "package_version": __version__, "basis_kind": basis.kind,
            "k": basis.k, "d": basis.d, "latents": LATENTS, "importance": importance,
            "fingerprint": basis.fingerprint(), "basis": meta,
        },
    }


def export_sae_lens(basis: Basis, folder: str | os.PathLike, source: SAELensSource,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` (each atomically); return ``folder``.

    ``sae_lens.SAE.load_from_disk(folder)`` then gives a standard SAE whose latents are ``relu(±f̂)`` and
    whose reconstruction is ``μ + C⁺ C (f − μ)`` (module docstring).
    """
    weights = sae_lens_weights(basis, dtype)
    config = sae_lens_config(basis, source, dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(weights, {"format": "pt"}, folder / WEIGHTS_FILE)
    tmp = folder / (CFG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, folder / CFG_FILE)
    return folder


def export_bases_sae_lens(bases: Mapping[str, Basis], out: str | os.PathLike, source: SAELensSource,
                          hooks: Iterable[str] | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """One sae_lens folder per hook, ``out/{hook}/`` (the hook name is the folder name, as in sae_lens's
    releases on the Hugging Face hub); ``bases`` maps hook names to bases (``InteractionBasis.layers``).
    Returns hook → folder."""
    chosen = list(bases) if hooks is None else list(hooks)
    missing = [h for h in chosen if h not in bases]
    if missing:
        raise ValueError(f"no basis at {missing}; the bases cover {list(bases)}")
    return {h: export_sae_lens(bases[h], Path(out) / h, source, dtype) for h in chosen}


__all__ = ["SAELensSource", "sae_lens_weights", "sae_lens_config", "export_sae_lens", "export_bases_sae_lens",
           "dtype_name", "CFG_FILE", "WEIGHTS_FILE", "FORMAT", "LATENTS"]
