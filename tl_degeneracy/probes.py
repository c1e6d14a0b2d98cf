"""Output probes for estimating Jacobian Grams without materialising Jacobians (docs/theory.md §2).

Backpropagating ``⟨v, z⟩`` gives ``g = Jᵀ v`` at every hook point at once. With
``E[v vᵀ] = H`` (the output Hessian of the behavioural loss), ``E[g gᵀ] = Jᵀ H J``. The
loss object supplies the factor ``B`` (``B Bᵀ = H``); probes are ``v = B ξ`` with Rademacher
or Gaussian ``ξ``, and the exact mode uses ``v = B e_k`` for every output component ``k``
(``Σ_k B e_k e_kᵀ Bᵀ = H``).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .config import ProbeKind
from .losses import BehavioralLoss


def batch_generator(seed: int, batch_index: int, device: torch.device | str) -> torch.Generator:
    """A generator whose stream depends only on (seed, batch index): resumable, rank-independent."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + int(batch_index)) % (2**63 - 1))
    return gen


def _noise(shape: torch.Size, kind: ProbeKind, gen: torch.Generator, dtype: torch.dtype,
           device: torch.device) -> Tensor:
    if kind is ProbeKind.RADEMACHER:
        # drawn directly in the float dtype: the same values as an int64 draw, half the time
        return torch.randint(0, 2, shape, generator=gen, device=device, dtype=dtype).mul_(2).sub_(1)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def random_probes(z: Tensor, n_probes: int, kind: ProbeKind | str, gen: torch.Generator, loss: BehavioralLoss,
                  state: Tensor | None) -> Iterator[Tensor]:
    """``n_probes`` probes shaped like ``z`` with ``E[v vᵀ] = H``."""
    kind = ProbeKind(kind)
    for _ in range(n_probes):
        yield loss.apply_factor(_noise(z.shape, kind, gen, z.dtype, z.device), state)


def exact_probes(z: Tensor, loss: BehavioralLoss, state: Tensor | None) -> Iterator[Tensor]:
    """``B e_k`` for every output component ``k`` of one sequence (batched over sequences)."""
    per_seq = z[0].numel()
    for k in range(per_seq):
        e_k = torch.zeros_like(z).flatten(1)
        e_k[:, k] = 1.0
        yield loss.apply_factor(e_k.view_as(z), state)
