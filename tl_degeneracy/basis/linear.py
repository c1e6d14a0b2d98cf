"""``LinearBasis``: the affine bases every built-in kind is — ``f̂ = C (f − μ)``, ``f ≈ C⁺ f̂ + μ``.

The interaction basis, PCA, the model's own coordinates and random rotations differ only in how
``C`` is fitted and what orders the directions (``eigenvalues``: Λ, variance, ...); the maps, the
fingerprint and the on-disk state are this one class's. Fitted state is plain tensors: inspectable,
saveable, and movable to any device.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from .protocol import register_basis_kind

_TENSORS = ("C", "C_pinv", "eigenvalues", "activation_eigenvalues", "interaction_eigenvalues", "mean")


@dataclass
class LinearBasis:
    """An affine basis at one hook point: ``f̂ = C (f − μ)``, ``f ≈ C⁺ f̂ + μ``.

    ``eigenvalues`` orders the kept directions (descending for fitted kinds): Λ for the interaction
    basis, the activation covariance's eigenvalues for PCA, each coordinate's variance for the model's
    own coordinates. ``activation_eigenvalues`` / ``interaction_eigenvalues`` hold the full spectra a
    fit saw (empty where a kind has none); ``thresholds`` the absolute cut-offs it used.
    """

    kind: ClassVar[str] = "linear"

    hook: str
    C: Float[Tensor, "k d"]
    C_pinv: Float[Tensor, "d k"]
    eigenvalues: Float[Tensor, " k"]
    activation_eigenvalues: Float[Tensor, " _d"]
    interaction_eigenvalues: Float[Tensor, " _m"]
    mean: Float[Tensor, " d"]  # μ; zeros when not centered
    scaling: str = "lib"
    center: bool = True
    thresholds: dict[str, float] = field(default_factory=dict)  # absolute values actually used
    n_datapoints: int = 0

    @property
    def k(self) -> int:
        return self.C.shape[0]

    @property
    def d(self) -> int:
        return self.C.shape[1]

    @property
    def importance(self) -> Tensor:
        return self.eigenvalues

    def encode(self, f: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch k"]:
        """Coordinates ``f̂ = C (f − μ)`` (in ``f``'s dtype)."""
        C, mu = self.C.to(f), self.mean.to(f)
        return (f - mu) @ C.T

    def decode(self, f_hat: Float[Tensor, "*batch k"]) -> Float[Tensor, "*batch d"]:
        """Back to activations: ``C⁺ f̂ + μ`` (the projection of ``f`` onto the kept span)."""
        return f_hat @ self.C_pinv.to(f_hat).T + self.mean.to(f_hat)

    transform = encode  # the scikit-learn names
    inverse = decode

    def n_directions_for(self, fraction: float = 0.99) -> int:
        """Fewest leading directions carrying ``fraction`` of ``Σ eigenvalues`` (ΣΛ, or the variance)."""
        values = self.eigenvalues.clamp_min(0)
        cumulative = torch.cumsum(values, 0) / values.sum()
        target = torch.full((), fraction, dtype=cumulative.dtype, device=cumulative.device)
        return min(int(torch.searchsorted(cumulative, target)) + 1, self.k)

    def fingerprint(self) -> str:
        """A short hash of ``C`` and ``μ`` (names this basis in a run identity)."""
        h = hashlib.sha256()
        for t in (self.C, self.mean):
            h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _TENSORS}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "scaling": self.scaling, "center": self.center, "thresholds": self.thresholds,
                "n_datapoints": self.n_datapoints, "k": self.k, "d": self.d}

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.tensors(), self.meta()

    @classmethod
    def from_state(cls, hook: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> LinearBasis:
        empty = torch.zeros(0, dtype=torch.float64)
        t = {name: tensors.get(name, empty) for name in _TENSORS}
        return cls(hook, t["C"], t["C_pinv"], t["eigenvalues"], t["activation_eigenvalues"],
                   t["interaction_eigenvalues"], t["mean"], meta.get("scaling", cls.kind), meta.get("center", True),
                   dict(meta.get("thresholds", {})), int(meta.get("n_datapoints", 0)))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LinearBasis:
        """A copy with every tensor on ``device`` / in ``dtype``."""
        tensors, meta = self.state()
        return type(self).from_state(self.hook, {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()},
                                     meta)


register_basis_kind(LinearBasis)  # a plain affine basis built by hand
