"""Splicing an interaction basis into a live model as a hook transform.

At each hook point ``h`` of the basis a ``BasisSplice`` module runs right after the hook
point and exposes, in sae_lens's naming convention:
- ``{h}.hook_ib``        the coordinates ``f̂ = C (f − μ)``  ``[batch, pos, k]``
- ``{h}.hook_ib_error``  what the kept directions miss: ``f − μ − C⁺ C (f − μ)``
and writes back ``μ + C⁺ f̂ + error``, i.e. exactly ``f`` unless a user hook edits
``hook_ib`` (``error_term=False`` drops the error: pure reconstruction).

The new hook points are registered with the model, so ``run_with_hooks``, ``run_with_cache``
and ``hooks()`` see them, forwards and backwards, on TL 3.x and TL 4.x.

TL 4.x trap handled here: on a TransformerBridge ``hook_resid_mid`` is ``ln2.hook_in``, so an
edit there reaches only the MLP input. The splice adds the same change at ``hook_mlp_out``
so the skip path sees it too, as on a HookedTransformer.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn

from .generations import describe_model
from .interaction_basis import InteractionBasis, LayerBasis


def _hook_point_class():
    from transformer_lens.hook_points import HookPoint

    return HookPoint


class BasisSplice(nn.Module):
    def __init__(self, layer: LayerBasis, error_term: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        HookPoint = _hook_point_class()
        self.hook_ib = HookPoint()
        self.hook_ib_error = HookPoint()
        self.error_term = error_term
        self.register_buffer("C", layer.C.to(dtype))
        self.register_buffer("C_pinv", layer.C_pinv.to(dtype))
        self.register_buffer("mean", layer.mean.to(dtype))
        self.last_delta: Tensor | None = None  # f_out − f, for the bridge's resid_mid skip path

    def forward(self, f: Tensor) -> Tensor:
        shape = f.shape
        flat = f.reshape(*shape[:2], -1)
        if flat.shape[-1] != self.C.shape[1]:
            raise ValueError(f"the spliced basis expects activations of dimension {self.C.shape[1]}, the hook "
                             f"gives {flat.shape[-1]}: was the basis fitted on another model?")
        C, C_pinv, mean = self.C.to(flat.dtype), self.C_pinv.to(flat.dtype), self.mean.to(flat.dtype)
        centered = flat - mean
        coords = centered @ C.T
        # The error is taken *before* user hooks see f̂ (they may edit it in place); unedited,
        # the same matmul gives the same recon, so recon + error == f − μ to rounding.
        error = self.hook_ib_error(centered - coords @ C_pinv.T)
        recon = self.hook_ib(coords) @ C_pinv.T
        out = mean + recon + (error if self.error_term else 0.0)
        return out.reshape(shape)


def _register_hook_point(model: nn.Module, name: str, hook_point: nn.Module) -> None:
    hook_point.name = name
    registry = getattr(model, "_hook_registry", None)
    if isinstance(registry, dict):  # TransformerBridge: hook_dict is a view over this registry
        registry[name] = hook_point
    else:  # HookedRootModule: plain dicts built by setup()
        model.hook_dict[name] = hook_point
        model.mod_dict[name] = hook_point


def _unregister_hook_point(model: nn.Module, name: str) -> None:
    registry = getattr(model, "_hook_registry", None)
    if isinstance(registry, dict):
        registry.pop(name, None)
    else:
        model.hook_dict.pop(name, None)
        model.mod_dict.pop(name, None)


def _bridge_resid_mid_partner(model: nn.Module, hook: str) -> str | None:
    """For a bridge's resid_mid (really ln2.hook_in) the hook whose output must carry the edit too."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_mid", hook)
    if not match:
        return None
    canonical = getattr(model.hook_dict[hook], "name", hook)
    if canonical == hook:
        return None  # HookedTransformer: resid_mid really is the residual stream
    return f"blocks.{match.group(1)}.hook_mlp_out"


class _Spliced:
    def __init__(self, model: nn.Module, hook: str, module: BasisSplice):
        self.model, self.hook, self.module = model, hook, module
        self.handles = []
        self.names = [f"{hook}.hook_ib", f"{hook}.hook_ib_error"]
        target = model.hook_dict[hook]
        target.add_module("ib_splice", module)  # moves with model.to(...), shows in named_modules

        def run_splice(_mod, _inp, out):
            new = module(out)
            module.last_delta = new - out if partner else None
            return new

        partner = _bridge_resid_mid_partner(model, hook)
        self.handles.append(target.register_forward_hook(run_splice))
        if partner is not None:
            def add_delta(_mod, _inp, out):
                delta, module.last_delta = module.last_delta, None
                return out if delta is None else out + delta

            self.handles.append(model.hook_dict[partner].register_forward_hook(add_delta))
        _register_hook_point(model, self.names[0], module.hook_ib)
        _register_hook_point(model, self.names[1], module.hook_ib_error)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for name in self.names:
            _unregister_hook_point(self.model, name)
        target = self.model.hook_dict[self.hook]
        if "ib_splice" in target._modules:
            del target._modules["ib_splice"]


def check_basis_fits(model: nn.Module, basis: InteractionBasis) -> None:
    """Refuse a basis fitted on a model of another shape; warn if only the weights differ."""
    fitted = (basis.meta.get("model") or {}).get("cfg", {})
    current = describe_model(model)
    now = current["cfg"]
    shape_keys = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab")
    differ = [f"{k}: basis {fitted[k]!r} vs model {now.get(k)!r}" for k in shape_keys
              if k in fitted and fitted[k] != now.get(k)]
    if differ:
        raise ValueError("this basis was fitted on a different model (" + "; ".join(differ) + ")")
    fitted_sha = (basis.meta.get("model") or {}).get("weights_sha256")
    if fitted_sha and fitted_sha != current["weights_sha256"]:
        warnings.warn("the basis was fitted on a model with other weights (same shapes); splicing anyway",
                      stacklevel=3)


def splice_into(model: nn.Module, basis: InteractionBasis | LayerBasis, hooks: list[str] | None = None,
                error_term: bool = True) -> list[_Spliced]:
    """Permanently splice ``basis`` into ``model`` (undo with ``unsplice(model)``)."""
    if isinstance(basis, InteractionBasis):
        check_basis_fits(model, basis)
    layers = [basis] if isinstance(basis, LayerBasis) else [basis[h] for h in (hooks or basis.hooks)]
    existing = getattr(model, "_tl_degeneracy_splices", [])
    taken = {s.hook for s in existing}
    dtype = next(model.parameters()).dtype
    made = []
    for layer in layers:
        if layer.hook not in model.hook_dict:
            raise KeyError(f"the basis has hook {layer.hook!r}, which this model does not have; "
                           "was it fitted on another model?")
        if layer.hook in taken:
            raise ValueError(f"{layer.hook} already has a basis spliced in; unsplice(model) first")
        module = BasisSplice(layer, error_term=error_term, dtype=dtype).to(next(model.parameters()).device)
        made.append(_Spliced(model, layer.hook, module))
    model._tl_degeneracy_splices = existing + made
    return made


def unsplice(model: nn.Module) -> None:
    """Remove every spliced basis; the model is exactly as before."""
    for spliced in reversed(getattr(model, "_tl_degeneracy_splices", [])):
        spliced.remove()
    model._tl_degeneracy_splices = []


@contextlib.contextmanager
def splice(model: nn.Module, basis: InteractionBasis | LayerBasis, hooks: list[str] | None = None,
           error_term: bool = True) -> Iterator[nn.Module]:
    """``with splice(model, basis): ...`` — the basis is spliced in inside the block only."""
    made = splice_into(model, basis, hooks, error_term)
    try:
        yield model
    finally:
        for spliced in reversed(made):
            spliced.remove()
        model._tl_degeneracy_splices = [s for s in model._tl_degeneracy_splices if s not in made]
