"""Output probes for estimating Jacobian Grams without materialising Jacobians (docs/theory.md §2).

Backpropagating ``⟨v, z⟩`` gives ``g = Jᵀ v`` at every hook point at once. With
``E[v vᵀ] = H`` (the output Hessian of the behavioural loss), ``E[g gᵀ] = Jᵀ H J``. A
``ProbeMap`` supplies the factor ``B`` (``B Bᵀ = H``: the loss's, or ``W_U``'s square root when
probes live in the residual basis); probes are ``v = B ξ`` with Rademacher or Gaussian ``ξ``,
and the exact mode uses ``v = B e_k`` for every component ``k`` (``Σ_k B e_k e_kᵀ Bᵀ = H``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ProbeKind


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


@dataclass(frozen=True)
class ProbeMap:
    """Probes are ``v = apply(ξ)`` with ``ξ`` of size ``k`` per output position and ``E[ξ ξᵀ] = I``.

    Vocabulary probes: ``k`` = the output size and ``apply`` = the loss's factor ``B``.
    Residual probes: ``k`` = rank of ``W_U`` and ``apply`` = ``L`` (``readout.py``).
    """

    k: int
    apply: Callable[[Tensor], Tensor]
    # apply(e_j) for every j, when it is the same at every position (the residual read-out):
    # exact probes are then written directly instead of mapped one by one
    columns: Tensor | None = None


def random_probes(z: Tensor, n_probes: int, kind: ProbeKind | str, gen: torch.Generator,
                  space: ProbeMap) -> Iterator[Tensor]:
    """``n_probes`` probes shaped like ``z`` with ``E[v vᵀ] = B Bᵀ`` (the output Hessian)."""
    kind = ProbeKind(kind)
    shape = torch.Size([*z.shape[:-1], space.k])
    for _ in range(n_probes):
        yield space.apply(_noise(shape, kind, gen, z.dtype, z.device))


def exact_probes(z: Tensor, space: ProbeMap) -> Iterator[Tensor]:
    """``apply(e_c)`` for every component ``c`` of one sequence's ``ξ`` (batched over sequences):
    ``Σ_c apply(e_c) apply(e_c)ᵀ = B Bᵀ``."""
    shape = [*z.shape[:-1], space.k]
    per_seq = math.prod(shape[1:])
    if space.columns is not None:
        columns = space.columns.to(device=z.device, dtype=z.dtype)
        positions = math.prod(z.shape[1:-1])
        for t in range(positions):
            for j in range(space.k):
                v = torch.zeros(z.shape[0], positions, z.shape[-1], dtype=z.dtype, device=z.device)
                v[:, t] = columns[j]
                yield v.view(z.shape)
        return
    for c in range(per_seq):
        e_c = torch.zeros(shape[0], per_seq, dtype=z.dtype, device=z.device)
        e_c[:, c] = 1.0
        yield space.apply(e_c.view(shape))
