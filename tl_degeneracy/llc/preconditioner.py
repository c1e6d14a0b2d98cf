"""Constant preconditioners ``P = L Lᵀ`` for the sampler, measured once at θ* (docs/llc.md §2).

Langevin dynamics ``dθ = −P∇U dt + √(2P) dW`` with a constant positive-definite ``P`` has
``p ∝ e^{−U}`` as its stationary law (no correction term: that is only needed when ``P`` depends
on θ). In the coordinates ``φ = L⁻¹θ`` it is plain Langevin dynamics on ``Ũ(φ) = U(Lφ)``, whose
Hessian is ``Lᵀ ∇²U L``; ``P`` is chosen so that this is close to the identity. Every kind aims at
``P ≈ (t Ĥ + γ)⁻¹`` with ``Ĥ`` an estimate of the Hessian of ``L_B`` at θ*:

- ``NONE``: ``L = I`` (plain SGLD).
- ``DIAG``: ``Ĥ`` the diagonal of the Gauss–Newton matrix, estimated by random output probes
  (``E[(Σ_x J_xᵀ B_x ξ_x)²] = n·diag(GN)``, ``B Bᵀ`` the loss's output Hessian).
- ``KFAC``: ``Ĥ = G ⊗ K`` on every weight matrix of the degeneracy account that the subset holds
  whole (``G``, ``K`` from a ``Stats``: the analysis' own, or collected on the sampling data; the one
  K-FAC count, ``degeneracy/kfac.py``, reads the same Grams), the diagonal on every other entry.
- ``RMSPROP``: ``P = 1/(√V + √γ)`` with ``V`` the mean of ``(∇U)²`` over the pilot chain's steps,
  then frozen (devinterp's ``rmsprop_sgld`` keeps adapting ``V``, which breaks exactness).

A ``Factor`` applies ``L`` and ``Lᵀ`` to the sampled entries (one flat tensor per slot). ``Curvature``
is what is measured once (ε-independent); ``preconditioner(...)`` turns it into the factor of one ε:
the one place the kinds are dispatched.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .config import Preconditioning
from .curvature import Curvature, KroneckerBlock
from .targets import Target


class Factor(ABC):
    """``L`` of ``P = L Lᵀ`` on the sampled entries (lists of flat tensors, one per slot)."""

    kind: Preconditioning

    @abstractmethod
    def lower(self, y: Sequence[Tensor]) -> list[Tensor]:
        """``L y``: a step in the sampler's coordinates φ, in θ."""

    @abstractmethod
    def upper(self, x: Sequence[Tensor]) -> list[Tensor]:
        """``Lᵀ x``: a gradient in θ, in the sampler's coordinates φ."""

    @abstractmethod
    def largest(self) -> float:
        """``λ_max(P)``: the scale a direction of zero curvature gets."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind.value}


class IdentityFactor(Factor):
    kind = Preconditioning.NONE

    def lower(self, y: Sequence[Tensor]) -> list[Tensor]:
        return list(y)

    def upper(self, x: Sequence[Tensor]) -> list[Tensor]:
        return list(x)

    def largest(self) -> float:
        return 1.0


class DiagonalFactor(Factor):
    """``L = diag(scale)``, ``P = diag(scale²)``."""

    def __init__(self, scale: list[Tensor], kind: Preconditioning = Preconditioning.DIAG):
        self.scale = scale
        self.kind = kind

    def lower(self, y: Sequence[Tensor]) -> list[Tensor]:
        return list(torch._foreach_mul(list(y), self.scale))

    def upper(self, x: Sequence[Tensor]) -> list[Tensor]:
        return list(torch._foreach_mul(list(x), self.scale))

    def largest(self) -> float:
        return max((float(s.max()) ** 2 for s in self.scale if s.numel()), default=1.0)

    def describe(self) -> dict[str, Any]:
        squares = torch.cat([s.double().square() for s in self.scale]) if self.scale else torch.ones(1)
        return {"kind": self.kind.value, "diagonal_entries": int(squares.numel()),
                "p_max": float(squares.max()), "p_min": float(squares.min())}


class KroneckerFactor(Factor):
    """``L = (U_G ⊗ U_K) diag((t g_i k_j + γ)^{-1/2})`` on each block; a diagonal on every other entry."""

    kind = Preconditioning.KFAC

    def __init__(self, blocks: list[KroneckerBlock], scales: list[Tensor], rest: DiagonalFactor,
                 kind: Preconditioning = Preconditioning.KFAC):
        self.kind = kind  # KFAC, or EKFAC (the same factor with corrected eigenvalues)
        self.blocks = blocks
        self.scales = scales  # per block, [d_in, d_out], the param dtype
        self.rest = rest  # zero on the entries the blocks hold

    def _each(self, x: Sequence[Tensor], transpose: bool) -> list[Tensor]:
        out = self.rest.lower(x)
        for block, scale in zip(self.blocks, self.scales):
            X = x[block.slot].index_select(0, block.positions).reshape(block.shape)
            if transpose:  # Lᵀ x = S ⊙ (U_Gᵀ X U_K)
                Y = block.u_in.T @ X
                Y = (Y if block.u_out is None else Y @ block.u_out) * scale
            else:  # L y = U_G (S ⊙ Y) U_Kᵀ
                Y = block.u_in @ (X * scale)
                Y = Y if block.u_out is None else Y @ block.u_out.T
            out[block.slot].index_copy_(0, block.positions, Y.reshape(-1))
        return out

    def lower(self, y: Sequence[Tensor]) -> list[Tensor]:
        return self._each(y, transpose=False)

    def upper(self, x: Sequence[Tensor]) -> list[Tensor]:
        return self._each(x, transpose=True)

    def largest(self) -> float:
        values = [float(s.max()) ** 2 for s in self.scales] + [self.rest.largest()]
        return max(values)

    def describe(self) -> dict[str, Any]:
        held = sum(b.positions.numel() for b in self.blocks)
        total = sum(s.numel() for s in self.rest.scale)
        return {"kind": self.kind.value, "kfac_blocks": len(self.blocks), "kfac_entries": held,
                "diagonal_entries": total - held}


def _floor(values: Tensor) -> Tensor:
    # an estimate of a curvature is never negative (rounding in eigh can make it so)
    return values.to(torch.float64).clamp_min(0)


def preconditioner(kind: Preconditioning, curvature: Curvature, target: Target, t: float, gamma: float,
                   squared_gradients: list[Tensor] | None = None) -> Factor:
    """The factor ``L`` of one ε (``t = 1/ε``): the one place the preconditioner kinds are dispatched.

    ``squared_gradients``: RMSprop's ``V`` (the mean of ``(∇U)²`` over the pilot chain; None before it,
    when RMSprop's pilot runs unpreconditioned).
    """
    dtypes = [s.param.dtype for s in target.slots]
    if kind is Preconditioning.NONE:
        return IdentityFactor()
    if kind is Preconditioning.RMSPROP:
        if squared_gradients is None:
            return IdentityFactor()
        root = math.sqrt(gamma)  # RMSprop's ε on the scale of √V: a direction of zero curvature has V ≈ γ
        return DiagonalFactor([(v.sqrt() + root).rsqrt().to(dt) for v, dt in zip(squared_gradients, dtypes)],
                              Preconditioning.RMSPROP)
    assert curvature.diagonal is not None, "the diagonal is measured for DIAG and KFAC"
    rest = [(t * _floor(d) + gamma).rsqrt().to(dt) for d, dt in zip(curvature.diagonal, dtypes)]
    if kind is Preconditioning.DIAG or not curvature.blocks:
        return DiagonalFactor(rest, kind)
    scales = []
    for block in curvature.blocks:
        rest[block.slot][block.positions] = 0  # these entries are the block's
        if kind is Preconditioning.EKFAC and block.corrected is not None:
            products = _floor(block.corrected)  # the Gauss–Newton diagonal in the K-FAC eigenbasis
        else:
            products = torch.outer(_floor(block.g), _floor(block.k))
        scales.append((t * products + gamma).rsqrt().to(dtypes[block.slot]))
    return KroneckerFactor(curvature.blocks, scales, DiagonalFactor(rest, kind), kind)
