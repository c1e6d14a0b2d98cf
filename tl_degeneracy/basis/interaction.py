"""The interaction basis (docs/theory.md §5), fitted from the Grams in a ``Stats``.

Per hook point, with ``G = Uᵀ D U`` and the Jacobian Gram ``M``:
1. whiten:      ``f' = D₊^{-1/2} U₊ f``                      (``E[f' f'ᵀ] = I``)
2. carry M:     ``M' = D₊^{1/2} U₊ M U₊ᵀ D₊^{1/2}``          (Jacobians transform inversely)
3. rotate:      ``M' = Vᵀ Λ V``
4. scale:       ``f̂ = Λ₊^{1/2} V₊ f'``, so ``C = Λ₊^{1/2} V₊ D₊^{-1/2} U₊``
``₊`` keeps eigenvalues above ``rtol`` × the largest (the package convention, ``linalg``). With this ("lib") scaling
``E[f̂ f̂ᵀ] = Λ`` and the Jacobian w.r.t. ``f̂`` is whitened: ``Λ_i`` is the behavioral-loss
importance of direction ``i``. Fitted state is plain tensors: inspectable and saveable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..linalg import DEFAULT_RTOL, symmetric_eigh
from .coordinates import PCADirections, StandardCoordinates, keep_above
from .linear import LinearBasis
from .protocol import register_basis_kind

Scaling = Literal["lib", "paper", "pca", "identity"]


@register_basis_kind
@dataclass
class InteractionDirections(LinearBasis):
    """The interaction basis at one hook: ``eigenvalues`` = Λ of the kept directions (descending),
    ``activation_eigenvalues`` = all of D, ``interaction_eigenvalues`` = all of Λ."""

    kind: ClassVar[str] = "interaction"


def fit_layer(
    hook: str,
    G: Float[Tensor, "d d"],
    M: Float[Tensor, "d d"] | None,
    mean: Float[Tensor, " d"],
    *,
    center: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    interaction_rtol: float | None = None,
    scaling: Scaling = "lib",
    n_datapoints: int = 0,
) -> LinearBasis:
    """docs/theory.md §5 at one hook. ``G`` is the centered covariance when ``center`` else ``S/n``.

    ``scaling="pca"`` and ``"identity"`` give the comparison kinds (``PCADirections``,
    ``StandardCoordinates``), which need no ``M``.
    """
    if scaling == "identity":
        return StandardCoordinates.fit(hook, G, mean, center=center, n_datapoints=n_datapoints)
    if scaling == "pca":
        return PCADirections.fit(hook, G, mean, center=center, rtol=rtol, atol=atol, n_datapoints=n_datapoints)
    G, mean = G.to(torch.float64), mean.to(torch.float64)
    mu = mean if center else torch.zeros_like(mean)
    D_all, U_all = symmetric_eigh(G)
    keep_D, d_threshold = keep_above(D_all, rtol, atol)
    D, U = D_all[keep_D], U_all[keep_D]
    thresholds = {"activation": d_threshold, "rtol": rtol}
    if M is None:
        raise ValueError(f"scaling={scaling!r} needs the Jacobian Gram at {hook}: collect with jacobians=True")
    M = M.to(torch.float64)
    sqrt_D = D.sqrt()
    M_white = (sqrt_D[:, None] * (U @ M @ U.T)) * sqrt_D[None, :]  # D^{1/2} U M Uᵀ D^{1/2}
    L_all, V_all = symmetric_eigh(M_white)
    keep_L, l_threshold = keep_above(L_all, interaction_rtol if interaction_rtol is not None else rtol, None)
    L, V = L_all[keep_L], V_all[keep_L]
    thresholds["interaction"] = l_threshold
    whiten = U / sqrt_D[:, None]  # D^{-1/2} U
    unwhiten = U.T * sqrt_D[None, :]  # Uᵀ D^{1/2}
    if scaling == "lib":
        C = L.sqrt()[:, None] * (V @ whiten)  # Λ^{1/2} V D^{-1/2} U
        C_pinv = (unwhiten @ V.T) / L.sqrt()[None, :]  # Uᵀ D^{1/2} Vᵀ Λ^{-1/2}
    elif scaling == "paper":
        C = (V @ whiten) / L.sqrt()[:, None]  # (Λ^{1/2})⁺ V D^{-1/2} U
        C_pinv = (unwhiten @ V.T) * L.sqrt()[None, :]
    else:
        raise ValueError(f"scaling must be 'lib', 'paper', 'pca' or 'identity', got {scaling!r}")
    return InteractionDirections(hook, C, C_pinv, L, D_all, L_all, mu, scaling, center, thresholds, n_datapoints)
