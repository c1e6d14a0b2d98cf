"""A transformer with two planted modules, for testing the interaction graph's module search.

Two modules of ``d_model / 2`` residual dimensions each: every token is a pair ``(a, b)`` (token id
``a · n + b``) whose ``a`` embeds into module A's dimensions and ``b`` into module B's; one head per
module reads and writes only its module; MLP neurons are split between the modules; no LayerNorm
and no positional embedding (both would couple the modules); the unembedding gives module A the
first ``n_a`` output tokens and module B the rest (separate output vocabularies). On the full
factorial data (``planted_tokens``: every A-sequence with every B-sequence) the two modules'
activations at any one position are independent *exactly*, so ``G`` and ``M`` are block-diagonal
and cross-module edges vanish in every basis. (Pooled over positions they are not: the position
is a common cause of both. Take the inner nodes at the last position, ``positions=[-1]``.)

``cross`` plants one weak cross-module edge in the last block: an extra neuron reads residual
coordinate ``A0`` at ``resid_mid`` and writes ``cross ·`` (its output) into ``B0``. Module A's
last head writes nothing into ``A0``, so the edge ``resid_pre[A0] → resid_post[B0]`` of the last
block is the only cross-module edge in the model's coordinates, and its strength scales as
``cross²`` exactly.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from ..generations import model_from_tl_state_dict


def planted_config(n_layers: int = 2, half: int = 4, n_symbols: int = 3, n_ctx: int = 3,
                   neurons_per_module: int = 6) -> dict[str, Any]:
    return dict(n_layers=n_layers, d_model=2 * half, n_heads=2, d_head=half, d_mlp=2 * neurons_per_module + 1,
                d_vocab=n_symbols * n_symbols, n_ctx=n_ctx, act_fn="gelu", normalization_type=None)


def planted_state_dict(cfg: dict[str, Any], seed: int = 0, cross: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, half, n = cfg["d_model"], cfg["d_model"] // 2, int(round(cfg["d_vocab"] ** 0.5))
    nm = (cfg["d_mlp"] - 1) // 2
    f64 = torch.float64

    def w(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=f64)

    mods = [slice(0, half), slice(half, d)]
    W_E = torch.zeros(n * n, d, dtype=f64)
    e_a, e_b = w(n, half), w(n, half)
    for a, b in itertools.product(range(n), range(n)):
        W_E[a * n + b, mods[0]] = e_a[a]
        W_E[a * n + b, mods[1]] = e_b[b]
    sd: dict[str, torch.Tensor] = {"embed.W_E": W_E, "pos_embed.W_pos": torch.zeros(cfg["n_ctx"], d, dtype=f64)}
    last = cfg["n_layers"] - 1
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}"
        for m in "QKV":
            W = torch.zeros(2, d, half, dtype=f64)
            for h in range(2):
                W[h, mods[h]] = w(half, half, scale=half ** -0.5)
            sd[f"{p}.attn.W_{m}"] = W
            sd[f"{p}.attn.b_{m}"] = w(2, half, scale=0.1)
        W_O = torch.zeros(2, half, d, dtype=f64)
        for h in range(2):
            W_O[h, :, mods[h]] = w(half, half, scale=half ** -0.5)
        if layer == last:
            W_O[0, :, 0] = 0.0  # module A's last head leaves A0 alone: the planted edge is then a single edge
        sd[f"{p}.attn.W_O"] = W_O
        sd[f"{p}.attn.b_O"] = w(d, scale=0.1)
        W_in = torch.zeros(d, cfg["d_mlp"], dtype=f64)
        W_out = torch.zeros(cfg["d_mlp"], d, dtype=f64)
        for h in range(2):
            cols = slice(h * nm, (h + 1) * nm)
            W_in[mods[h], cols] = w(half, nm, scale=half ** -0.5)
            W_out[cols, mods[h]] = w(nm, half, scale=nm ** -0.5)
        if layer == last and cross:
            W_in[0, -1] = 1.0  # the cross neuron reads A0 ...
            W_out[-1, half] = cross  # ... and writes into B0
        sd[f"{p}.mlp.W_in"] = W_in
        sd[f"{p}.mlp.b_in"] = w(cfg["d_mlp"], scale=0.1)
        sd[f"{p}.mlp.W_out"] = W_out
        sd[f"{p}.mlp.b_out"] = w(d, scale=0.1)
    V, cut = n * n, (n * n) // 2
    W_U = torch.zeros(d, V, dtype=f64)
    W_U[mods[0], :cut] = w(half, cut, scale=half ** -0.5)
    W_U[mods[1], cut:] = w(half, V - cut, scale=half ** -0.5)
    sd["unembed.W_U"] = W_U
    sd["unembed.b_U"] = torch.zeros(V, dtype=f64)
    return sd


def planted_modular_model(seed: int = 0, cross: float = 0.0, dtype: torch.dtype = torch.float64,
                          **cfg_overrides: Any) -> torch.nn.Module:
    """The two-module transformer in the installed TL generation (see the module docstring)."""
    cfg = planted_config(**cfg_overrides)
    return model_from_tl_state_dict(cfg, planted_state_dict(cfg, seed, cross), dtype=dtype)


def planted_tokens(n_symbols: int = 3, n_ctx: int = 3) -> torch.Tensor:
    """Every A-sequence paired with every B-sequence: ``n_symbols^(2·n_ctx)`` rows, independent modules."""
    seqs = torch.tensor(list(itertools.product(range(n_symbols), repeat=n_ctx)))
    a = seqs.repeat_interleave(len(seqs), 0)
    b = seqs.repeat(len(seqs), 1)
    return a * n_symbols + b
