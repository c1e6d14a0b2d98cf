"""Probes in the residual basis: skip the unembedding when the output is a linear read-out.

With MSE on logits, ``z = r W_U + b_U`` where ``r`` is the unembedding's input
(``unembed.hook_in``). A probe ``v`` with ``E[v vᵀ] = I_vocab`` backpropagates to
``W_U v`` at ``r``, whose covariance is ``W_U W_Uᵀ`` (``d_model × d_model``). So drawing
``u = L ξ`` with ``L Lᵀ = W_U W_Uᵀ`` and ``E[ξ ξᵀ] = I_k`` and backpropagating from ``r``
gives the same ``E[g gᵀ] = Jᵀ J`` without the unembedding's forward and backward passes and
without vocabulary-sized random numbers; the exact mode loops over the ``k ≤ d_model``
columns of ``L`` instead of ``d_vocab`` output components (docs/theory.md §2).

For KL the factor would be ``W_U (diag p − p pᵀ) W_Uᵀ`` per position: forming it costs
``O(d_model² · d_vocab)`` per position, more than the vocabulary probes' backward pass it
would save, so KL keeps vocabulary probes.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..generations import HookedModel
from ..linalg import symmetric_eigh, threshold

READOUT_HOOK = "unembed.hook_in"
# L keeps the eigen-directions of W_U W_Uᵀ above this fraction of the largest: the rest carry
# at most ~1e-13 of M's trace, far below float64 agreement checks (1e-10).
FACTOR_RTOL = 1e-14
# A model whose logits are not r W_U + b_U to this relative accuracy falls back to vocabulary probes.
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass(frozen=True)
class LinearReadout:
    """``z = r W + b`` at ``hook``; ``factor`` is ``L`` (``[d_model, k]``, float64), ``L Lᵀ = W Wᵀ``."""

    hook: str
    factor: Float[Tensor, "d_model k"]

    @property
    def k(self) -> int:
        return int(self.factor.shape[1])

    def apply(self, xi: Float[Tensor, "*batch k"]) -> Float[Tensor, "*batch d_model"]:
        """``u = L ξ`` for every leading index."""
        return xi @ self.factor.to(device=xi.device, dtype=xi.dtype).T


def readout_factor(W: Float[Tensor, "d_model d_out"]) -> Float[Tensor, "d_model k"]:
    """``L`` with ``L Lᵀ = W Wᵀ`` from the eigen-decomposition (float64), near-zero directions dropped."""
    values, vectors = symmetric_eigh(W.detach().to(torch.float64) @ W.detach().to(torch.float64).T)
    keep = threshold(values.clamp_min(0.0), FACTOR_RTOL).keep(values)
    return (vectors[keep].T * values[keep].sqrt()).contiguous()


# The factor's cache, keyed weakly by the model: W_U W_Uᵀ costs 2·d_model²·d_vocab float64 FLOPs
# (59 GFLOP, ~1 s on two CPU cores for GPT-2), more than a short collect itself. The linearity
# check is not cached: it is one tiny forward, and hooks added since can change the head.
_FACTORS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, Tensor]] = weakref.WeakKeyDictionary()


def _factor_of(model: HookedModel, W: Tensor) -> Tensor:
    """``readout_factor(W)``, recomputed only when ``W`` is replaced or changed in place."""
    key = (W.data_ptr(), W._version, tuple(W.shape), W.dtype, W.device)
    cached = _FACTORS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, readout_factor(W))
        _FACTORS[model] = cached
    return cached[1]


def find_readout(model: HookedModel) -> LinearReadout | None:
    """The model's unembedding as a linear read-out of ``unembed.hook_in``, checked numerically.

    None (vocabulary probes) when the model has no such hook or ``W_U``, or when its logits are
    not ``r W_U + b_U`` on a probe input (a soft-capped or otherwise non-linear head; checked on
    every call, since hooks can change the head). The factor ``L`` is cached per model until
    ``W_U`` is replaced or changed in place.
    """
    hook_dict = getattr(model, "hook_dict", {})
    W = getattr(model, "W_U", None)
    if READOUT_HOOK not in hook_dict or not isinstance(W, Tensor) or W.ndim != 2:
        return None
    b = getattr(model, "b_U", None)
    n_ctx = int(getattr(model.cfg, "n_ctx", 4))
    d_vocab = int(getattr(model.cfg, "d_vocab", W.shape[1]))
    device = W.device
    tokens = (torch.arange(min(4, n_ctx), device=device) * 7919 % d_vocab)[None]
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: object) -> None:
        captured["r"] = act.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(READOUT_HOOK, capture)]):
        logits = model(tokens)
    if "r" not in captured or not isinstance(logits, Tensor) or logits.shape[-1] != W.shape[1]:
        return None
    rebuilt = captured["r"] @ W.detach() + (b.detach() if isinstance(b, Tensor) else 0.0)
    scale = float(logits.abs().max()) or 1.0
    rtol = CHECK_RTOL.get(logits.dtype, 1e-2)
    if float((rebuilt - logits).abs().max()) > rtol * scale:
        warnings.warn("the logits are not a linear read-out of unembed.hook_in on this model: Jacobian probes "
                      "stay in the vocabulary basis", stacklevel=3)
        return None
    return LinearReadout(READOUT_HOOK, _factor_of(model, W))
