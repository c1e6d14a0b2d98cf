"""Output probes for estimating Jacobian Grams without materialising Jacobians (MATH.md §2).

Backpropagating ``⟨v, z⟩`` gives ``g = Jᵀ v`` at every hook point at once. With
``E[v vᵀ] = H`` (the output Hessian of the behavioral loss), ``E[g gᵀ] = Jᵀ H J``:
- ``mse``: ``H = I``; ``v = ξ`` with Rademacher or Gaussian ``ξ``.
- ``kl``: per position ``H = diag(p) − p pᵀ``. It factors as ``B Bᵀ`` with
  ``B = (I − p 1ᵀ) diag(√p)``, so ``v = B ξ = √p ⊙ ξ − p ⟨√p, ξ⟩`` costs O(vocab).
The exact mode uses ``v = B e_k`` for every output component ``k``: ``Σ_k B e_k e_kᵀ Bᵀ = H``.
"""
from __future__ import annotations

from typing import Iterator, Literal

import torch
from jaxtyping import Float
from torch import Tensor

ProbeKind = Literal["rademacher", "gaussian"]
BehavioralLoss = Literal["mse", "kl"]


def batch_generator(seed: int, batch_index: int, device: torch.device | str) -> torch.Generator:
    """A generator whose stream depends only on (seed, batch index): resumable, rank-independent."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + int(batch_index)) % (2**63 - 1))
    return gen


def _noise(shape: torch.Size, kind: ProbeKind, gen: torch.Generator, dtype: torch.dtype,
           device: torch.device) -> Tensor:
    if kind == "rademacher":
        # drawn directly in the float dtype: the same values as an int64 draw, half the time
        return torch.randint(0, 2, shape, generator=gen, device=device, dtype=dtype).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")


def apply_output_factor(xi: Float[Tensor, "*batch vocab"], probs: Float[Tensor, "*batch vocab"] | None
                        ) -> Float[Tensor, "*batch vocab"]:
    """``B ξ`` for the KL Hessian factor (identity when ``probs`` is None, the MSE case)."""
    if probs is None:
        return xi
    sqrt_p = probs.sqrt()
    return sqrt_p * xi - probs * (sqrt_p * xi).sum(-1, keepdim=True)


def random_probes(
    z: Tensor, n_probes: int, kind: ProbeKind, gen: torch.Generator, probs: Tensor | None
) -> Iterator[Tensor]:
    """``n_probes`` probes shaped like ``z`` with ``E[v vᵀ] = H``."""
    for _ in range(n_probes):
        yield apply_output_factor(_noise(z.shape, kind, gen, z.dtype, z.device), probs)


def exact_probes(z: Tensor, probs: Tensor | None) -> Iterator[Tensor]:
    """``B e_k`` for every output component ``k`` of one sequence (batched over sequences)."""
    per_seq = z[0].numel()
    for k in range(per_seq):
        e_k = torch.zeros_like(z).flatten(1)
        e_k[:, k] = 1.0
        yield apply_output_factor(e_k.view_as(z), probs)
