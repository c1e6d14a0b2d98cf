"""The K-FAC count: ``#{(i, j): g_i·k_j > c}`` per weight matrix, from the collected Grams.

K-FAC (paper eq. 37) approximates a weight matrix's Gauss–Newton block by ``G ⊗ K``, whose
eigenvalues are the products ``g_i·k_j`` of the eigenvalues of the activation Gram ``G`` at its input
and the Jacobian Gram ``K`` at its output. Counting the products above a curvature cut-off ``c``
estimates the block's effective parameter count at that loss scale (docs/theory.md §3).

This module is the one place that count is made: the degeneracy account (at ``eps``), the analysis's
SGLD section and ``tl-degeneracy llc --kfac`` (at ``γε``) all read ``KfacSpectra``. At the logits ``K``
is the behavioural loss's output Hessian (``BehavioralLoss.logit_hessian_eigenvalues``): the identity
for MSE, one zero (the logit shift) and ``d_vocab − 1`` ones for KL.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..collection.config import JacobianConfig
from ..generations import HookedModel
from ..hook_names import LOGITS
from ..linalg import psd_eigenvalues
from ..losses import MSE, BehavioralLoss
from .weights import WeightMatrix, input_gram, weight_matrices

_CHUNK = 1 << 22  # products formed at once: an outer product of W_U's spectra is d_model × d_vocab


def kfac_count(g: Tensor, k: Tensor, cutoff: float) -> int:
    """``#{(i, j): g_i·k_j > cutoff}``, formed a block of rows at a time (no ``d_in × d_out`` matrix)."""
    rows = max(1, _CHUNK // max(k.numel(), 1))
    return sum(int((torch.outer(g[i:i + rows], k) > cutoff).sum()) for i in range(0, g.numel(), rows))


def logit_hessian(jacobians: JacobianConfig | None, d_vocab: int) -> tuple[Tensor | None, str | None]:
    """Eigenvalues of ``K`` at the logits (the behavioural loss's output Hessian), or why there is none."""
    if jacobians is None:
        return None, "no Jacobians were collected: no K for W_U"
    if jacobians.output != LOGITS:
        return None, f"Jacobians were taken to {jacobians.output!r}, not the logits: no K for W_U"
    return jacobians.behavioral_loss.logit_hessian_eigenvalues(d_vocab), None


def recorded_jacobians(stats: Any) -> JacobianConfig | None:
    """The ``JacobianConfig`` a ``Stats`` was collected with (None without Jacobians)."""
    recorded = None if stats.run is None else stats.run.jacobians
    return None if recorded is None else JacobianConfig.from_dict(recorded)


@dataclass
class MatrixSpectra:
    """One weight matrix's ``G`` and ``K`` eigenvalues (descending, float64), or why one is missing."""

    weight: WeightMatrix
    g: Tensor | None
    k: Tensor | None
    missing: list[str] = field(default_factory=list)

    def count(self, cutoff: float) -> int | None:
        return None if self.g is None or self.k is None else kfac_count(self.g, self.k, cutoff)

    @property
    def largest_product(self) -> float | None:
        if self.g is None or self.k is None or not self.g.numel() or not self.k.numel():
            return None
        return float(self.g.max()) * float(self.k.max())


class KfacSpectra:
    """The ``G``/``K`` spectra of every weight matrix of the account, from one ``Stats``.

    ``count(c, covers)`` is ``Σ #{g_i·k_j > c}`` over the matrices ``covers`` accepts; matrices
    whose statistics are missing are listed in each ``MatrixSpectra.missing``.
    """

    def __init__(self, model: HookedModel, stats: Any, matrices: Iterable[WeightMatrix] | None = None):
        self.jacobians = recorded_jacobians(stats)
        self.loss: BehavioralLoss = self.jacobians.behavioral_loss if self.jacobians is not None else MSE()
        cache: dict[tuple[str, str, tuple[int, int] | None], Tensor | None] = {}

        def g_eigs(w: WeightMatrix) -> Tensor | None:
            key = ("G", w.input_hook, w.in_slice)
            if key not in cache:
                try:
                    cache[key] = psd_eigenvalues(input_gram(model, stats, w))
                except KeyError:
                    cache[key] = None
            return cache[key]

        def k_eigs(hook: str, sl: tuple[int, int] | None) -> Tensor | None:
            key = ("K", hook, sl)
            if key not in cache:
                try:
                    matrix = stats.jacobian_gram(hook)
                except KeyError:
                    cache[key] = None
                else:
                    cache[key] = psd_eigenvalues(matrix if sl is None else matrix[sl[0]:sl[1], sl[0]:sl[1]])
            return cache[key]

        self.matrices: list[MatrixSpectra] = []
        for w in (weight_matrices(model) if matrices is None else matrices):
            entry = MatrixSpectra(w, g_eigs(w), None)
            if entry.g is None:
                entry.missing.append(f"no activation Gram at {w.input_hook} (add it to collect's hooks)")
            if w.output_hook == LOGITS:
                entry.k, why = logit_hessian(self.jacobians, w.d_out)
                if why:
                    entry.missing.append(why)
            else:
                entry.k = k_eigs(w.output_hook, w.out_slice)
                if entry.k is None:
                    entry.missing.append(f"no Jacobian Gram at {w.output_hook} (collect it with jacobians=True)")
            self.matrices.append(entry)

    def largest_product(self) -> float:
        """``max g_i·k_j`` over every matrix with both spectra (the scale a relative cut-off refers to)."""
        return max((p for m in self.matrices if (p := m.largest_product) is not None), default=0.0)

    def count(self, cutoff: float, covers: Callable[[WeightMatrix], bool] | None = None) -> tuple[int | None, int]:
        """``(Σ #{g·k > cutoff}, Σ nominal)`` over the covered matrices with both spectra (None when none is)."""
        counts = [(m.count(cutoff), m.weight) for m in self.matrices if covers is None or covers(m.weight)]
        chosen = [(c, w) for c, w in counts if c is not None]
        if not chosen:
            return None, 0
        return sum(c for c, _ in chosen), sum(w.d_in * w.d_out for _, w in chosen)


def covering(parameter_labels: Iterable[str]) -> Callable[[WeightMatrix], bool]:
    """The weight matrices a sampled parameter subset covers, from its slots' labels (``"a+b"`` joins
    several names of one parameter): a whole matrix by name, or one head's slice (``W_Q[3]``)."""
    names = {name for label in parameter_labels for name in label.split("+")}
    return lambda w: w.tl_name in names or w.tl_name.split("[")[0] in names
