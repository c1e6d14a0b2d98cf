"""Splicing a basis into a live model as a hook transform.

At each hook point ``h`` of the basis a ``BasisSplice`` module runs right after the hook
point and exposes, in sae_lens's naming convention:
- ``{h}.hook_ib``        the coordinates ``f̂ = encode(f)`` (``C (f − μ)`` for the built-in kinds) ``[batch, pos, k]``
- ``{h}.hook_ib_error``  what the basis misses: ``f − decode(encode(f))``
and writes back ``decode(f̂) + error``, i.e. exactly ``f`` unless a user hook edits
``hook_ib`` (``error_term=False`` drops the error: pure reconstruction). Any basis kind splices
(``protocol.Basis``: only ``encode`` and ``decode`` are used).

The new hook points become children of the spliced hook point and are registered by
TransformerLens's own module scan (``setup()`` on a HookedRootModule, the bridge's hook-registry
scan on a TransformerBridge), as TransformerLens's SAE splicing does, so ``run_with_hooks``,
``run_with_cache`` and ``hooks()`` see them, forwards and backwards, and they survive the
bridge rebuilding its registry (``enable_compatibility_mode()``). Nothing is stored on the
model besides these modules: ``splice_into`` returns ``SpliceHandle``s, and ``unsplice`` finds
splices by scanning the model's modules.

TL 4.x trap handled here: on a TransformerBridge ``hook_resid_mid`` is ``ln2.hook_in``, so an
edit there reaches only the MLP input. The splice adds the same change at ``hook_mlp_out``
so the skip path sees it too, as on a HookedTransformer.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..generations import HookedModel, describe_model
from ..hook_names import bridge_resid_mid_partner, module_path
from .bases import InteractionBasis
from .protocol import Basis, map_tensors

SPLICE_MODULE = "ib_splice"
POINTS = ("hook_ib", "hook_ib_error")


def _hook_point_class():
    from transformer_lens.hook_points import HookPoint

    return HookPoint


class BasisSplice(nn.Module):
    """``f ↦ decode(hook_ib(encode(f))) + hook_ib_error(f − decode(encode(f)))``.

    The basis moves with the model (``model.to(...)`` reaches it through ``_apply``).
    """

    def __init__(self, layer: Basis, hook_ib: nn.Module, hook_ib_error: nn.Module, error_term: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        super().__init__()
        # A tuple, not attributes: the hook points are registered as children of the spliced
        # hook point (so the module scan names them {hook}.hook_ib), not of this module.
        self._points = (hook_ib, hook_ib_error)
        self.error_term = error_term
        self.basis = map_tensors(layer, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        self.last_delta: Tensor | None = None  # f_out − f, for the bridge's resid_mid skip path
        self.handle: SpliceHandle | None = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        self.basis = map_tensors(self.basis, fn)
        return super()._apply(fn, recurse)

    def forward(self, f: Tensor) -> Tensor:
        hook_ib, hook_ib_error = self._points
        shape = f.shape
        flat = f.reshape(*shape[:2], -1)
        if flat.shape[-1] != self.basis.d:
            raise ValueError(f"the spliced basis expects activations of dimension {self.basis.d}, the hook "
                             f"gives {flat.shape[-1]}: was the basis fitted on another model?")
        coords = self.basis.encode(flat)
        # The error is taken *before* user hooks see f̂ (they may edit it in place); unedited,
        # decoding the same coordinates gives the same reconstruction, so recon + error == f to rounding.
        error = hook_ib_error(flat - self.basis.decode(coords))
        recon = self.basis.decode(hook_ib(coords))
        out = recon + error if self.error_term else recon
        return out.reshape(shape)


def _is_bridge(model: HookedModel) -> bool:
    return hasattr(model, "clear_hook_registry") and hasattr(model, "_initialize_hook_registry")


def _rescan(model: HookedModel) -> None:
    """Let TransformerLens find the hook points again (as after splicing an SAE)."""
    if _is_bridge(model):
        model.clear_hook_registry()
        model._initialize_hook_registry()
    else:
        model.setup()


def _set_aliases(model: HookedModel, add: dict[str, str], remove: list[str]) -> None:
    """On a bridge, the user's names ``{hook}.hook_ib`` as aliases of the scanned canonical ones.

    The bridge's ``hook_aliases`` (a class-level dict) is copied to the instance first, so other
    models are untouched; the aliases survive ``enable_compatibility_mode()``.
    """
    aliases = {k: v for k, v in dict(model.hook_aliases).items() if k not in remove}
    aliases.update(add)
    for name in remove:  # what the bridge's own alias registration made of them
        model.__dict__.pop(name, None)
        getattr(model, "_hook_alias_registry", {}).pop(name, None)
    if aliases == type(model).hook_aliases:
        model.__dict__.pop("hook_aliases", None)
    else:
        object.__setattr__(model, "hook_aliases", aliases)


class SpliceHandle:
    """One spliced hook point; ``remove()`` restores the model exactly."""

    def __init__(self, model: HookedModel, hook: str, layer: Basis, error_term: bool):
        self.model, self.hook = model, hook
        self.names = [f"{hook}.{p}" for p in POINTS]
        target = model.hook_dict[hook]
        HookPoint = _hook_point_class()
        points = (HookPoint(), HookPoint())
        param = next(model.parameters())
        self.module = BasisSplice(layer, *points, error_term=error_term, dtype=param.dtype, device=param.device)
        for name, point in zip(POINTS, points):
            target.add_module(name, point)
        target.add_module(SPLICE_MODULE, self.module)  # moves with model.to(...), shows in named_modules
        self.module.handle = self  # so unsplice(model) finds every handle by scanning modules
        self._handles = []
        module = self.module
        partner = bridge_resid_mid_partner(model, hook)

        def run_splice(_mod, _inp, out):
            new = module(out)
            module.last_delta = new - out if partner else None
            return new

        self._handles.append(target.register_forward_hook(run_splice))
        if partner is not None:
            def add_delta(_mod, _inp, out):
                delta, module.last_delta = module.last_delta, None
                return out if delta is None else out + delta

            self._handles.append(model.hook_dict[partner].register_forward_hook(add_delta))
        self._target = target
        self._aliases: dict[str, str] = {}

    def _register(self) -> None:
        if _is_bridge(self.model):
            canonical = module_path(self.model, self._target)
            if canonical and canonical != self.hook:
                self._aliases = {f"{self.hook}.{p}": f"{canonical}.{p}" for p in POINTS}
                _set_aliases(self.model, self._aliases, [])

    def remove(self) -> None:
        """Undo this splice (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name in (*POINTS, SPLICE_MODULE):
            self._target._modules.pop(name, None)
        if self._aliases:
            _set_aliases(self.model, {}, list(self._aliases))
            self._aliases = {}
        _rescan(self.model)

    def __repr__(self) -> str:
        return f"SpliceHandle({self.hook!r}, k={self.module.basis.k})"


def check_basis_fits(model: HookedModel, basis: InteractionBasis) -> None:
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


def _spliced_targets(model: HookedModel) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "_modules", {}).get(SPLICE_MODULE), BasisSplice)]


def splice_into(model: HookedModel, basis: InteractionBasis | Basis, hooks: list[str] | None = None,
                error_term: bool = True) -> list[SpliceHandle]:
    """Splice ``basis`` (bases per hook, or one basis of any kind) into ``model`` until
    ``handle.remove()`` or ``unsplice(model)``."""
    if isinstance(basis, InteractionBasis):
        check_basis_fits(model, basis)
        layers = [basis[h] for h in (hooks or basis.hooks)]
    elif isinstance(basis, Basis):
        layers = [basis]
    else:
        raise TypeError(f"splice takes an InteractionBasis or a basis of a registered kind, got {type(basis).__name__}")
    for layer in layers:
        if layer.hook not in model.hook_dict:
            raise KeyError(f"the basis has hook {layer.hook!r}, which this model does not have; "
                           "was it fitted on another model?")
        if SPLICE_MODULE in model.hook_dict[layer.hook]._modules:
            raise ValueError(f"{layer.hook} already has a basis spliced in; remove it first (unsplice(model))")
    made = [SpliceHandle(model, layer.hook, layer, error_term) for layer in layers]
    _rescan(model)
    for handle in made:
        handle._register()
    return made


def unsplice(model: HookedModel) -> None:
    """Remove every spliced basis; the model is exactly as before."""
    for target in _spliced_targets(model):
        module = target._modules[SPLICE_MODULE]
        assert isinstance(module, BasisSplice) and module.handle is not None
        module.handle.remove()


@contextlib.contextmanager
def splice(model: HookedModel, basis: InteractionBasis | Basis, hooks: list[str] | None = None,
           error_term: bool = True) -> Iterator[list[SpliceHandle]]:
    """``with splice(model, basis) as handles: ...`` — the basis is spliced in inside the block only."""
    made = splice_into(model, basis, hooks, error_term)
    try:
        yield made
    finally:
        for handle in reversed(made):
            handle.remove()
