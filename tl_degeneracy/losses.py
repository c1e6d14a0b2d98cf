"""The behavioural loss: what "the model's behaviour" means for Jacobian Grams (docs/theory.md §1–§2).

A behavioural loss owns its output Hessian ``H`` at the unperturbed model through a factor
``B`` with ``B Bᵀ = H``: random probes are ``v = B ξ`` (``E[v vᵀ] = H``) and the exact mode
uses ``v = B e_k`` for every output component. Everything that differs between losses is
here; the collectors ask the loss object and never test its name.

- ``MSE()``: ``L_B = ½‖z − z*‖²`` (the paper's eq. 6 with a ½, so that ``H = I`` is exactly its
  Hessian, as ``diag(p) − ppᵀ`` is KL's; docs/theory.md §1), ``B = I``.
- ``KL()``: ``L_B = KL(softmax z* ‖ softmax z)``; per position ``H = diag(p) − p pᵀ`` and
  ``B = (I − p 1ᵀ) diag(√p)``, so ``B ξ = √p ⊙ ξ − p ⟨√p, ξ⟩`` costs O(vocab). It sees no
  change along the all-ones (logit shift) direction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class BehavioralLoss:
    """Base class: the identity output Hessian (MSE)."""

    name: ClassVar[str] = "mse"
    needs_logits: ClassVar[bool] = False  # True when H depends on the softmax of the logits

    def output_state(self, z: Float[Tensor, "*batch out"]) -> Tensor | None:
        """What the Hessian factor needs from the unperturbed output (None for MSE)."""
        return None

    def apply_factor(self, xi: Float[Tensor, "*batch out"], state: Tensor | None) -> Float[Tensor, "*batch out"]:
        """``B ξ``."""
        return xi

    def logit_hessian_eigenvalues(self, d_vocab: int) -> Float[Tensor, " d_vocab"]:
        """Eigenvalues of ``H`` standing in for ``K`` at the logits (the unembedding's account)."""
        return torch.ones(d_vocab, dtype=torch.float64)

    def to_dict(self) -> str:
        return self.name


@dataclass(frozen=True)
class MSE(BehavioralLoss):
    name: ClassVar[str] = "mse"


@dataclass(frozen=True)
class KL(BehavioralLoss):
    name: ClassVar[str] = "kl"
    needs_logits: ClassVar[bool] = True

    def output_state(self, z: Float[Tensor, "*batch out"]) -> Tensor:
        return torch.softmax(z.detach(), dim=-1)

    def apply_factor(self, xi: Float[Tensor, "*batch out"], state: Tensor | None) -> Float[Tensor, "*batch out"]:
        assert state is not None, "KL needs the output probabilities"
        sqrt_p = state.sqrt()
        return sqrt_p * xi - state * (sqrt_p * xi).sum(-1, keepdim=True)

    def logit_hessian_eigenvalues(self, d_vocab: int) -> Float[Tensor, " d_vocab"]:
        # E[diag(p) − ppᵀ] always annihilates the logit shift; its other eigenvalues are
        # positive but data-dependent: 1 stands in for them (the count is what matters).
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.ones(d_vocab - 1, dtype=torch.float64)])


LOSSES: dict[str, type[BehavioralLoss]] = {"mse": MSE, "kl": KL}


def as_loss(spec: str | BehavioralLoss) -> BehavioralLoss:
    """``"mse"`` / ``"kl"`` / a ``BehavioralLoss`` → the loss object (the one place names are read)."""
    if isinstance(spec, BehavioralLoss):
        return spec
    if isinstance(spec, str) and spec.lower() in LOSSES:
        return LOSSES[spec.lower()]()
    raise ValueError(f"behavioral loss must be one of {sorted(LOSSES)} or a BehavioralLoss, got {spec!r}")
