"""The weight matrices the degeneracy account covers, and the hooks each reads and writes.

A weight matrix ``W`` (``d_out × d_in``) reads the activation at its *input hook* and writes the
preactivation at its *output hook*; its activation Gram ``G`` sits at the first, its Jacobian Gram
``K`` at the second (docs/theory.md §3). ``ln*`` hooks become ``hook_resid_*`` without LayerNorm:
``W_Q/W_K/W_V[h]``: ``ln1.hook_normalized → attn.hook_q/k/v`` (head ``h``'s slice of ``K``);
``W_O[h]``: ``attn.hook_z`` (head ``h``'s slice of ``G``) ``→ hook_attn_out``;
``W_in``: ``ln2.hook_normalized → mlp.hook_pre``; ``W_out``: ``mlp.hook_post → hook_mlp_out``;
``W_U``: ``ln_final.hook_normalized → logits``, where ``K`` is the output Hessian of the
behavioural loss. Biases, embeddings and LayerNorm weights are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def label(self) -> str:
        """``blocks.0.W_Q[3]``, ``unembed.W_U``: how tables name it."""
        where = "unembed" if self.layer is None else f"blocks.{self.layer}"
        return f"{where}.{self.name}" + ("" if self.head is None else f"[{self.head}]")

    @property
    def tl_name(self) -> str:
        """The TransformerLens parameter name (head slice as ``[h]``): ``blocks.0.attn.W_Q[3]``."""
        base = ("unembed.W_U" if self.layer is None else
                f"blocks.{self.layer}.{'mlp' if self.name in ('W_in', 'W_out') else 'attn'}.{self.name}")
        return base if self.head is None else f"{base}[{self.head}]"


def _uses_ln(model: HookedModel) -> bool:
    return getattr(model.cfg, "normalization_type", None) is not None


def weight_matrices(model: HookedModel) -> list[WeightMatrix]:
    """Every weight matrix the account covers, with its input and output hook."""
    cfg = model.cfg
    L, d, H, dh = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
    V = int(getattr(cfg, "d_vocab_out", -1) or -1)
    V = V if V > 0 else int(cfg.d_vocab)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or H)  # grouped-query attention: fewer K/V heads
    ln = _uses_ln(model)
    out: list[WeightMatrix] = []
    for l in range(L):
        attn_in = act_name("normalized", l, "ln1") if ln else act_name("resid_pre", l)
        for m in "qkv":
            for h in range(H if m == "q" else n_kv):
                out.append(WeightMatrix(l, f"W_{m.upper()}", h, attn_in, act_name(m, l), d, dh,
                                        out_slice=(h * dh, (h + 1) * dh)))
        for h in range(H):
            out.append(WeightMatrix(l, "W_O", h, act_name("z", l), act_name("attn_out", l), dh, d,
                                    in_slice=(h * dh, (h + 1) * dh)))
        if not getattr(cfg, "attn_only", False):
            d_mlp = int(cfg.d_mlp)
            mlp_in = act_name("normalized", l, "ln2") if ln else act_name("resid_mid", l)
            out.append(WeightMatrix(l, "W_in", None, mlp_in, act_name("pre", l), d, d_mlp))
            out.append(WeightMatrix(l, "W_out", None, act_name("post", l), act_name("mlp_out", l), d_mlp, d))
    unembed_in = act_name("normalized") if ln else act_name("resid_post", L - 1)
    out.append(WeightMatrix(None, "W_U", None, unembed_in, LOGITS, d, V))
    return out


def degeneracy_hooks(model: HookedModel) -> list[str]:
    """The hook points to collect for a full account:
    ``collect(model, data, degeneracy_hooks(model), jacobians=True, observers=[HeadSync(), NeuronSync()])``."""
    names: list[str] = []
    for w in weight_matrices(model):
        names += [w.input_hook] + ([w.output_hook] if w.output_hook != LOGITS else [])
    return list(dict.fromkeys(names))
