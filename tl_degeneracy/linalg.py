"""Eigen-decompositions, thresholds and ranks: one convention for the whole package.

**The convention** (docs/theory.md §7): an eigenvalue ``λ`` of a symmetric positive
semi-definite matrix counts as zero when ``λ ≤ rtol · λ_max`` (``λ_max`` the largest
eigenvalue of the same matrix). For a rectangular matrix ``W`` the rank is that of the PSD
matrix ``WᵀW``: a singular value ``σ`` counts as zero when ``σ² ≤ rtol · σ_max²``, so one
``rtol`` means the same thing everywhere. Every count is reported with the absolute
threshold it used (``Threshold``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

DEFAULT_RTOL = 1e-8


@dataclass(frozen=True)
class Threshold:
    """The relative tolerance asked for and the absolute cut-off it became for one matrix."""

    rtol: float
    absolute: float

    def keep(self, values: Tensor) -> Tensor:
        """Mask of the values above the cut-off (the ones that count as non-zero)."""
        return values > self.absolute


def symmetric_eigh(matrix: Float[Tensor, "d d"]) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
    """Eigenvalues in descending order and eigenvectors as *rows*, in float64.

    The matrix is symmetrised first (a streamed Gram is symmetric only up to rounding).
    """
    m = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.flip(0), vectors.flip(1).T


def psd_eigenvalues(matrix: Float[Tensor, "d d"]) -> Float[Tensor, " d"]:
    """Eigenvalues of a PSD matrix, descending, float64, negative rounding clamped to 0."""
    m = matrix.to(torch.float64)
    return torch.linalg.eigvalsh((m + m.T) / 2).flip(0).clamp_min(0.0)


def threshold(values: Float[Tensor, " d"], rtol: float = DEFAULT_RTOL) -> Threshold:
    """The cut-off ``rtol × max(values)`` for eigenvalues of one PSD matrix."""
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    top = float(values.max()) if values.numel() else 0.0
    return Threshold(float(rtol), float(rtol) * max(top, 0.0))


def rank(values: Float[Tensor, " d"], rtol: float = DEFAULT_RTOL) -> tuple[int, Threshold]:
    """How many eigenvalues of one PSD matrix exceed ``rtol × the largest``, and the cut-off."""
    cut = threshold(values, rtol)
    return int(cut.keep(values).sum()), cut


def gram_rank(matrix: Float[Tensor, "d d"], rtol: float = DEFAULT_RTOL) -> int:
    """Rank of a PSD (Gram) matrix under the package convention."""
    return rank(psd_eigenvalues(matrix), rtol)[0]


def matrix_rank(matrix: Float[Tensor, "m n"], rtol: float = DEFAULT_RTOL) -> int:
    """Rank of a rectangular matrix: eigenvalues ``σ²`` of ``WᵀW`` above ``rtol · σ_max²``."""
    sigma = torch.linalg.svdvals(matrix.to(torch.float64))
    return rank(sigma.square(), rtol)[0]
