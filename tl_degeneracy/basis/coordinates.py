"""Bases fitted without Jacobians: PCA of the activations, the model's own coordinates, random rotations.

They are the interaction basis's comparisons (docs/theory.md §5–§6): PCA keeps the directions of
largest activation variance (``G``'s eigenvectors), the model's coordinates are the identity (ordered
by each coordinate's variance), and a random orthonormal basis of PCA's span is the floor an
ablation curve is read against. All three centre by ``μ`` like the interaction basis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from ..linalg import DEFAULT_RTOL, Threshold, symmetric_eigh, threshold
from .linear import LinearBasis
from .protocol import register_basis_kind


def keep_above(values: Tensor, rtol: float, atol: float | None) -> tuple[Tensor, float]:
    """Mask of eigenvalues above the package threshold (``rtol`` × the largest, or ``atol``), and its value."""
    cut = Threshold(rtol, float(atol)) if atol is not None else threshold(values, rtol)
    return cut.keep(values), cut.absolute


@register_basis_kind
@dataclass
class PCADirections(LinearBasis):
    """Eigenvectors of the activation covariance ``G`` above the threshold, by variance (``eigenvalues`` = D)."""

    kind: ClassVar[str] = "pca"

    @classmethod
    def fit(cls, hook: str, G: Float[Tensor, "d d"], mean: Float[Tensor, " d"], *, center: bool = True,
            rtol: float = DEFAULT_RTOL, atol: float | None = None, n_datapoints: int = 0) -> PCADirections:
        G, mean = G.to(torch.float64), mean.to(torch.float64)
        mu = mean if center else torch.zeros_like(mean)
        D_all, U_all = symmetric_eigh(G)
        keep, cut = keep_above(D_all, rtol, atol)
        D, U = D_all[keep], U_all[keep]
        return cls(hook, U, U.T.clone(), D, D_all, G.new_zeros(0), mu, "pca", center,
                   {"activation": cut, "rtol": rtol}, n_datapoints)


@register_basis_kind
@dataclass
class StandardCoordinates(LinearBasis):
    """The model's own coordinates (``C = I``), centred; ``eigenvalues`` = each coordinate's variance."""

    kind: ClassVar[str] = "standard"

    @classmethod
    def fit(cls, hook: str, G: Float[Tensor, "d d"], mean: Float[Tensor, " d"], *, center: bool = True,
            n_datapoints: int = 0) -> StandardCoordinates:
        G, mean = G.to(torch.float64), mean.to(torch.float64)
        eye = torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
        mu = mean if center else torch.zeros_like(mean)
        return cls(hook, eye, eye, G.diagonal().clone(), symmetric_eigh(G)[0], G.new_zeros(0), mu, "identity",
                   center, {}, n_datapoints)


@register_basis_kind
@dataclass
class RandomDirections(LinearBasis):
    """An orthonormal basis of another basis's span in random order (the floor of an ablation curve)."""

    kind: ClassVar[str] = "random"

    @property
    def importance(self) -> Tensor:
        # its own (random) order: the first direction counts most
        return torch.arange(self.k, 0, -1, dtype=torch.float64, device=self.C.device)


def random_basis(layer: LinearBasis, seed: int = 0) -> RandomDirections:
    """An orthonormal basis of the same span as ``layer`` (PCA's: the activations' span), in random order."""
    gen = torch.Generator().manual_seed(seed)
    span = torch.linalg.qr(layer.C_pinv.to(torch.float64))[0]  # [d, k], orthonormal columns
    # drawn on the host (the same rotation on every device), then moved to the basis
    rotation = torch.linalg.qr(torch.randn(layer.k, layer.k, generator=gen, dtype=torch.float64))[0]
    Q = span @ rotation.to(span.device)
    fields = {f: getattr(layer, f) for f in ("hook", "activation_eigenvalues", "interaction_eigenvalues", "mean",
                                             "center", "thresholds", "n_datapoints")}
    return RandomDirections(C=Q.T.contiguous(), C_pinv=Q, eigenvalues=Q.new_zeros(layer.k), scaling="random",
                            **fields)
