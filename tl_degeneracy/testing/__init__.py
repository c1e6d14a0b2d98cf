"""Models for tests, examples and benchmarks (``numpy.testing``-style: not the analysis API).

Tiny random transformers and the grokked modular-addition net, none of which needs a hub.

Weights are drawn as a HookedTransformer-format state dict from a seeded generator, then
loaded into whichever TransformerLens generation is installed (see ``generations``), so the
same seed gives the same function under TL 3.x and TL 4.x.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..generations import model_from_tl_state_dict


def tiny_config(
    n_layers: int = 2,
    d_model: int = 16,
    n_heads: int = 4,
    d_head: int = 4,
    d_mlp: int = 32,
    d_vocab: int = 23,
    n_ctx: int = 12,
    act_fn: str = "gelu",
    normalization_type: str | None = "LN",
    attn_only: bool = False,
) -> dict[str, Any]:
    cfg = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_vocab=d_vocab,
        n_ctx=n_ctx, act_fn=act_fn, normalization_type=normalization_type,
    )
    if attn_only:
        cfg["attn_only"] = True
    else:
        cfg["d_mlp"] = d_mlp
    return cfg


def random_tl_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """A HookedTransformer-format state dict with N(0, 1/fan_in) weights and small biases."""
    g = torch.Generator().manual_seed(seed)
    d, H, dh, V = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_vocab"]

    def w(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) / fan_in**0.5

    def b(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)

    def ln(prefix: str) -> dict[str, torch.Tensor]:
        if cfg.get("normalization_type") != "LN":
            return {}
        return {f"{prefix}.w": 1.0 + b(d), f"{prefix}.b": b(d)}

    sd: dict[str, torch.Tensor] = {"embed.W_E": w(V, d, fan_in=1),
                                   "pos_embed.W_pos": 0.5 * w(cfg["n_ctx"], d, fan_in=1)}
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}"
        sd |= ln(f"{p}.ln1")
        for m in "QKV":
            sd[f"{p}.attn.W_{m}"] = w(H, d, dh, fan_in=d)
            sd[f"{p}.attn.b_{m}"] = b(H, dh)
        sd[f"{p}.attn.W_O"] = w(H, dh, d, fan_in=H * dh)
        sd[f"{p}.attn.b_O"] = b(d)
        if not cfg.get("attn_only", False):
            sd |= ln(f"{p}.ln2")
            sd[f"{p}.mlp.W_in"] = w(d, cfg["d_mlp"], fan_in=d)
            sd[f"{p}.mlp.b_in"] = b(cfg["d_mlp"])
            sd[f"{p}.mlp.W_out"] = w(cfg["d_mlp"], d, fan_in=cfg["d_mlp"])
            sd[f"{p}.mlp.b_out"] = b(d)
    sd |= ln("ln_final")
    sd["unembed.W_U"] = w(d, V, fan_in=d)
    sd["unembed.b_U"] = b(V)
    return sd


def tiny_model(
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    **cfg_overrides: Any,
) -> torch.nn.Module:
    """A tiny random transformer in the installed TL generation (float64 by default)."""
    cfg = tiny_config(**cfg_overrides)
    return model_from_tl_state_dict(cfg, random_tl_state_dict(cfg, seed), dtype=dtype, device=device)


# --- the grokked modular-addition transformer (shipped in ./modadd_rib_seed0) ----------------

MODADD_CONFIG: dict[str, Any] = dict(
    n_layers=1, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=114, n_ctx=3,
    act_fn="relu", normalization_type=None,
)
MODADD_P = 113
MODADD_DIR = Path(__file__).resolve().parent / "modadd_rib_seed0"  # RIB's checkpoint, MIT (see LICENSE there)


def modadd_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """The modular-addition transformer (``(a + b) mod 113``; inputs ``[a, b, 113]``).

    ``path``: a folder holding ``model_epoch_60000.pt`` (default: the copy shipped with the package).
    """
    folder = Path(path) if path is not None else MODADD_DIR
    weights = folder / "model_epoch_60000.pt"
    if not weights.exists():
        raise FileNotFoundError(f"modular-addition checkpoint not found at {weights}")
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    return model_from_tl_state_dict(MODADD_CONFIG, state_dict, dtype=dtype, device=device)


def modadd_dataset(split: str = "train", seed: int = 0, frac_train: float = 0.3) -> torch.Tensor:
    """Token rows ``[a, b, 113]`` of the train (3830 pairs) or test split, as in the rib repo."""
    p = MODADD_P
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(frac_train * p * p)
    idx = order[:n_train] if split == "train" else order[n_train:]
    a, b = idx // p, idx % p
    return torch.stack([a, b, torch.full_like(a, p)], dim=1)
