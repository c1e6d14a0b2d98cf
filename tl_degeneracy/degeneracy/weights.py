"""The weight matrices the degeneracy account covers, and the hooks each reads and writes.

A weight matrix ``W`` (``d_out × d_in``) reads the activation at its *input hook* and writes the
preactivation at its *output hook*; its activation Gram ``G`` sits at the first, its Jacobian Gram
``K`` at the second (docs/theory.md §3). ``ln*`` hooks become ``hook_resid_*`` without LayerNorm:
``W_Q/W_K/W_V[h]``: ``ln1.hook_normalized → attn.hook_q/k/v`` (head ``h``'s slice of ``K``);
``W_O[h]``: ``attn.hook_z`` (head ``h``'s slice of ``G``) ``→ hook_attn_out``;
``W_in``: ``ln2.hook_normalized → mlp.hook_pre`` (gated MLPs: ``W_gate → mlp.hook_pre``, ``W_in →
mlp.hook_pre_linear``); ``W_out``: ``mlp.hook_post → hook_mlp_out``;
``W_U``: ``ln_final.hook_normalized → logits``, where ``K`` is the output Hessian of the
behavioural loss. Biases, embeddings and normalisation weights are not counted as matrices.

A normalisation's ``hook_normalized`` is taken before its weight ``w`` and bias ``b`` (both generations),
so when they are not folded into the reading matrix (a model loaded unprocessed) the matrix's true
input is ``n ⊙ w + b``; ``input_gram`` turns the collected sums at ``hook_normalized`` into that Gram
exactly: ``E[f fᵀ] = diag(w) E[n nᵀ] diag(w) + (w ⊙ μ) bᵀ + b (w ⊙ μ)ᵀ + b bᵀ``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..generations import HookedModel
from ..hook_names import LOGITS, act_name


@dataclass
class WeightMatrix:
    """One weight matrix's slot in the account (the hooks it is read from)."""

    layer: int | None  # None for W_U
    name: str  # "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U"
    head: int | None
    input_hook: str
    output_hook: str
    d_in: int
    d_out: int
    in_slice: tuple[int, int] | None = None  # head slice of the input Gram (W_O)
    out_slice: tuple[int, int] | None = None  # head slice of the output Gram (W_Q/K/V)
    input_norm: str | None = None  # the normalisation whose affine (w, b) follows the input hook (module path)

    @property
    def label(self) -> str:
        """``blocks.0.W_Q[3]``, ``unembed.W_U``: how tables name it."""
        where = "unembed" if self.layer is None else f"blocks.{self.layer}"
        return f"{where}.{self.name}" + ("" if self.head is None else f"[{self.head}]")

    @property
    def tl_name(self) -> str:
        """The TransformerLens parameter name (head slice as ``[h]``): ``blocks.0.attn.W_Q[3]``."""
        base = ("unembed.W_U" if self.layer is None else
                f"blocks.{self.layer}.{'mlp' if self.name in ('W_in', 'W_gate', 'W_out') else 'attn'}.{self.name}")
        return base if self.head is None else f"{base}[{self.head}]"


def _uses_norm(model: HookedModel) -> bool:
    return getattr(model.cfg, "normalization_type", None) is not None


def _module(model: HookedModel, path: str) -> Any:
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
        if module is None:
            return None
    return module


def norm_affine(model: HookedModel, path: str) -> tuple[Tensor, Tensor | None] | None:
    """The weight and bias ``(w, b)`` a normalisation at ``path`` applies after its ``hook_normalized``
    (TransformerLens names them ``w``, ``b`` on both generations); None once folded into the next weights."""
    module = _module(model, path)
    w = getattr(module, "w", None)
    if not isinstance(w, Tensor):
        return None
    b = getattr(module, "b", None)
    return w.detach().to(torch.float64), (b.detach().to(torch.float64) if isinstance(b, Tensor) else None)


def weight_matrices(model: HookedModel, layers: Iterable[int] | None = None) -> list[WeightMatrix]:
    """Every weight matrix the account covers (of ``layers``, default all, and ``W_U``), with its hooks.

    Gated MLPs (``cfg.gated_mlp``: SwiGLU, GeGLU) have three matrices: ``W_gate`` writes ``mlp.hook_pre``,
    ``W_in`` (the up-projection) writes ``mlp.hook_pre_linear``, ``W_out`` reads ``mlp.hook_post``.
    Grouped-query attention has ``n_key_value_heads`` ``W_K``/``W_V`` heads. A matrix reading a
    normalisation's ``hook_normalized`` records the normalisation (``input_norm``): its weight and bias,
    when not folded into the matrix, are part of the matrix's true input.
    """
    cfg = model.cfg
    L, d, H, dh = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
    V = int(getattr(cfg, "d_vocab_out", -1) or -1)
    V = V if V > 0 else int(cfg.d_vocab)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or H)  # grouped-query attention: fewer K/V heads
    norm = _uses_norm(model)
    gated = bool(getattr(cfg, "gated_mlp", False))
    chosen = range(L) if layers is None else sorted({int(l) for l in layers})
    out: list[WeightMatrix] = []
    for l in chosen:
        attn_in = act_name("normalized", l, "ln1") if norm else act_name("resid_pre", l)
        ln1 = f"blocks.{l}.ln1" if norm else None
        for m in "qkv":
            for h in range(H if m == "q" else n_kv):
                out.append(WeightMatrix(l, f"W_{m.upper()}", h, attn_in, act_name(m, l), d, dh,
                                        out_slice=(h * dh, (h + 1) * dh), input_norm=ln1))
        for h in range(H):
            out.append(WeightMatrix(l, "W_O", h, act_name("z", l), act_name("attn_out", l), dh, d,
                                    in_slice=(h * dh, (h + 1) * dh)))
        if not getattr(cfg, "attn_only", False):
            d_mlp = int(cfg.d_mlp)
            mlp_in = act_name("normalized", l, "ln2") if norm else act_name("resid_mid", l)
            ln2 = f"blocks.{l}.ln2" if norm else None
            if gated:
                out.append(WeightMatrix(l, "W_gate", None, mlp_in, act_name("pre", l), d, d_mlp, input_norm=ln2))
                out.append(WeightMatrix(l, "W_in", None, mlp_in, act_name("pre_linear", l), d, d_mlp,
                                        input_norm=ln2))
            else:
                out.append(WeightMatrix(l, "W_in", None, mlp_in, act_name("pre", l), d, d_mlp, input_norm=ln2))
            out.append(WeightMatrix(l, "W_out", None, act_name("post", l), act_name("mlp_out", l), d_mlp, d))
    unembed_in = act_name("normalized") if norm else act_name("resid_post", L - 1)
    out.append(WeightMatrix(None, "W_U", None, unembed_in, LOGITS, d, V, input_norm="ln_final" if norm else None))
    return out


def degeneracy_hooks(model: HookedModel, layers: Iterable[int] | None = None) -> list[str]:
    """The hook points to collect for a full account:
    ``collect(model, data, degeneracy_hooks(model), jacobians=True, observers=[HeadSync(), NeuronSync()])``."""
    names: list[str] = []
    for w in weight_matrices(model, layers):
        names += [w.input_hook] + ([w.output_hook] if w.output_hook != LOGITS else [])
    return list(dict.fromkeys(names))


def input_hooks(model: HookedModel, layers: Iterable[int] | None = None) -> list[str]:
    """Where the account needs activation Grams ``G`` (the matrices' inputs)."""
    return list(dict.fromkeys(w.input_hook for w in weight_matrices(model, layers)))


def output_hooks(model: HookedModel, layers: Iterable[int] | None = None) -> list[str]:
    """Where the account needs Jacobian Grams ``K`` (the matrices' outputs, the logits excepted)."""
    return list(dict.fromkeys(w.output_hook for w in weight_matrices(model, layers) if w.output_hook != LOGITS))


def input_gram(model: HookedModel, stats: Any, w: WeightMatrix) -> Tensor:
    """The uncentered Gram ``E[f fᵀ]`` of the matrix's true input (KeyError when not collected).

    At a normalisation's output the collected ``n`` becomes ``f = n ⊙ w + b`` (see the module docstring);
    a head's slice is taken last.
    """
    G = stats.gram(w.input_hook)
    affine = None if w.input_norm is None else norm_affine(model, w.input_norm)
    if affine is not None:
        scale = affine[0].to(G.device)
        G = scale[:, None] * G * scale[None, :]
        if affine[1] is not None:
            shift = affine[1].to(G.device)
            mu = stats.mean(w.input_hook) * scale
            G = G + torch.outer(mu, shift) + torch.outer(shift, mu) + torch.outer(shift, shift)
    if w.in_slice is not None:
        a, b = w.in_slice
        G = G[a:b, a:b]
    return G
