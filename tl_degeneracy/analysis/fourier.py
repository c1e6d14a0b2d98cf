"""A direction's activation as a function of two modular inputs, and its 2-D Fourier spectrum.

A model of ``(a, b) ↦ (a + b) mod p`` (``tl_degeneracy.testing.modadd_model``) sees every input on a
``p_a × p_b`` grid, so one direction of a basis at one position is a function ``f[a, b]`` on the
grid. Grokked networks compute with a few frequencies (Nanda et al. 2023): their activations are
sums of ``cos``/``sin`` of ``2πk·a/p``, ``2πk·b/p`` and ``2πk·(a ± b)/p`` for a handful of ``k``. The
2-D discrete Fourier transform says how much of a direction's variance each frequency carries.

**Normalisation.** ``F = torch.fft.fft2(f, norm="ortho")``, i.e.
``F[k_a, k_b] = (p_a p_b)^{-1/2} Σ_{a,b} f[a, b] · exp(−2πi (k_a a / p_a + k_b b / p_b))``, in float64.
The power of a frequency is ``|F[k]|²``, and Parseval reads ``Σ_k |F[k]|² = Σ_{a,b} f[a, b]²``. The
DC term is ``|F[0, 0]|² = p_a p_b · f̄²`` (``f̄`` the grid mean) and is reported apart; the rest,
the **non-DC power**, is ``Σ_{a,b} (f[a, b] − f̄)² = p_a p_b × Var(f)`` (the population variance
over the grid, ``FourierSpectrum.variance``). "Share of variance" always means a share of the
non-DC power.

**Conjugate pairs merged.** ``f`` is real, so ``F[−k] = conj F[k]``: ``k`` and ``−k`` (mod the grid)
are one real wave, ``cos(2π(k_a a / p_a + k_b b / p_b) + φ)``, and their powers are summed. Each
merged pair is named by its *signed* frequencies (``k`` for ``k ≤ p // 2``, else ``k − p``), the
representative being the lexicographically larger of ``k`` and ``−k``: ``k_a ≥ 0`` always, and
``k_b > 0`` when ``k_a = 0``. So ``(k, 0)`` is a wave in ``a`` alone, ``(0, k)`` one in ``b`` alone,
``(k, k)`` one in ``a + b`` and ``(k, −k)`` one in ``a − b``. On even sides a frequency whose every
component is 0 or ``p/2`` is its own conjugate: its own pair, counted once.

**Key frequencies.** A product of waves of one frequency ``k`` in ``a`` and in ``b`` (what a grokked
network's neurons compute) spreads over ``(k, k)`` and ``(k, −k)``, and a direction reading ``k`` in both
inputs over ``(k, 0)`` and ``(0, k)``; ``FourierSpectrum.key_frequency_shares`` adds those four pairs up
per ``k``, so "which key frequency is this direction about" has one number per ``k``.

Several grids of one direction (e.g. its activation at several positions) are combined by adding
their spectra (``FourierSpectrum.sum``): each grid's own mean is removed, so the shares are of the
pooled within-grid variance.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..basis import Basis
from ..forward import model_device, output_at, to_device
from ..generations import HookedModel
from ..validation import nonnegative_float, positive_int

# A grid counts as flat (no variance: shares are NaN) when its non-DC power is at most this fraction of
# Σ f²: float64 FFT rounding leaves ~1e-32 of Σ f² in the non-DC terms of a constant grid.
DEFAULT_FLAT_RTOL = 1e-20


def signed_frequency(k: Tensor, n: int) -> Tensor:
    """``k`` (0 ≤ k < n) as a signed frequency in ``(−n/2, n/2]``: ``k`` and ``k − n`` are the same wave."""
    return torch.where(k <= n // 2, k, k - n)


@dataclass(frozen=True)
class FourierSpectrum:
    """The conjugate-merged power spectrum of one or more real grids ``f[..., a, b]`` (module docstring).

    ``frequencies[j] = (k_a, k_b)`` (signed) names merged pair ``j``; ``power[..., j]`` is its power
    ``|F[k]|² + |F[−k]|²`` (once for a self-conjugate ``k``); ``dc[...] = |F[0, 0]|²``;
    ``flat[...]`` marks grids whose non-DC power is at most ``flat_rtol × Σ f²`` (their shares are NaN).
    """

    shape: tuple[int, int]
    frequencies: Int[Tensor, "n_freq 2"]
    power: Float[Tensor, "*grids n_freq"]
    dc: Float[Tensor, " *grids"]
    flat_rtol: float = DEFAULT_FLAT_RTOL

    def __post_init__(self) -> None:
        n = self.frequencies.shape[0]
        if self.frequencies.shape != (n, 2) or self.power.shape[-1:] != (n,) or self.dc.shape != self.power.shape[:-1]:
            raise ValueError(f"a spectrum needs frequencies [n, 2], power [..., n] and dc [...]; got "
                             f"{tuple(self.frequencies.shape)}, {tuple(self.power.shape)}, {tuple(self.dc.shape)}")
        nonnegative_float(self.flat_rtol, "flat_rtol")

    @property
    def total(self) -> Tensor:
        """Non-DC power ``Σ_{k≠0} |F[k]|² = Σ_{a,b} (f − f̄)²``."""
        return self.power.sum(-1)

    @property
    def variance(self) -> Tensor:
        """``Var(f)`` over the grid (population): the non-DC power over ``p_a p_b``."""
        return self.total / (self.shape[0] * self.shape[1])

    @property
    def flat(self) -> Tensor:
        """Grids with no variance to speak of (relative to ``Σ f² = total + dc``)."""
        return self.total <= self.flat_rtol * (self.total + self.dc)

    def shares(self) -> Tensor:
        """Each frequency's share of the non-DC power (NaN for flat grids)."""
        total = self.total.unsqueeze(-1)
        out = self.power / torch.where(total > 0, total, torch.ones_like(total))
        return out.masked_fill(self.flat.unsqueeze(-1), float("nan"))

    def strongest(self, m: int) -> tuple[Int[Tensor, "*grids m"], Float[Tensor, "*grids m"]]:
        """The ``m`` strongest frequencies per grid: indices into ``frequencies`` and their shares
        (descending; ties broken by ``torch.topk``)."""
        m = positive_int(m, "m")
        if m > self.power.shape[-1]:
            raise ValueError(f"m must be at most the number of merged frequencies, {self.power.shape[-1]}; got {m}")
        index = self.power.topk(m, dim=-1).indices
        return index, self.shares().gather(-1, index)

    def share(self, m: int) -> Float[Tensor, " *grids"]:
        """The share of the non-DC power in the ``m`` strongest frequencies (NaN for flat grids)."""
        return self.strongest(m)[1].sum(-1)

    def key_frequency_shares(self) -> tuple[Float[Tensor, "*grids half"], Float[Tensor, " *grids"]]:
        """Shares grouped by one key frequency ``k = 1 … p // 2`` (column ``k − 1``) on a square grid: the
        pairs ``(k, 0)``, ``(0, k)``, ``(k, k)``, ``(k, −k)`` (``k`` in ``a``, in ``b``, in ``a + b``, in
        ``a − b``: what a product of waves of one frequency in ``a`` and ``b`` gives). Second: the share
        of every other (mixed) pair, e.g. ``(15, −18)``. Each row sums to 1 (NaN for flat grids)."""
        p, p_b = self.shape
        if p != p_b:
            raise ValueError(f"key frequencies need a square grid, got {p} × {p_b}")
        k_a, k_b = self.frequencies.abs().unbind(-1)
        family = torch.where(k_b == 0, k_a, torch.where((k_a == 0) | (k_a == k_b), k_b, 0))  # 0: mixed
        shares = self.shares()
        grouped = shares.new_zeros(*shares.shape[:-1], p // 2 + 1).index_add_(-1, family, shares)
        return grouped[..., 1:], grouped[..., 0]

    def sum(self, dim: int) -> FourierSpectrum:
        """The spectrum of several grids pooled along a grid axis ``dim`` (powers add; ``dim`` counts
        over the grid axes only, not the frequency axis)."""
        axis = dim if dim >= 0 else dim - 1  # in ``power`` the frequency axis comes last
        return FourierSpectrum(self.shape, self.frequencies, self.power.sum(axis), self.dc.sum(dim), self.flat_rtol)


def fourier_spectrum(grid: Float[Tensor, "*grids p_a p_b"], flat_rtol: float = DEFAULT_FLAT_RTOL) -> FourierSpectrum:
    """The 2-D DFT power spectrum of real grids ``grid[..., a, b]``, conjugate pairs merged (module docstring)."""
    if grid.ndim < 2 or grid.shape[-1] < 1 or grid.shape[-2] < 1:
        raise ValueError(f"grid must have at least two non-empty axes (..., p_a, p_b), got shape {tuple(grid.shape)}")
    if grid.is_complex():
        raise ValueError("grid must be real: a complex grid has no conjugate symmetry to merge")
    flat_rtol = nonnegative_float(flat_rtol, "flat_rtol")
    f = grid.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(f).all()):
        raise ValueError("grid must be finite")
    n_a, n_b = f.shape[-2:]
    full = torch.fft.fft2(f, norm="ortho").abs().square()  # |F[k_a, k_b]|²
    # |F[−k]|² at k: reverse each axis, then roll by one so index 0 maps to itself
    mirrored = full.flip(-2, -1).roll(shifts=(1, 1), dims=(-2, -1))
    k_a, k_b = torch.meshgrid(torch.arange(n_a), torch.arange(n_b), indexing="ij")
    self_conjugate = ((2 * k_a) % n_a == 0) & ((2 * k_b) % n_b == 0)
    merged = torch.where(self_conjugate, full, full + mirrored)
    s_a, s_b = signed_frequency(k_a, n_a), signed_frequency(k_b, n_b)
    m_a, m_b = signed_frequency((-k_a) % n_a, n_a), signed_frequency((-k_b) % n_b, n_b)
    representative = (s_a > m_a) | ((s_a == m_a) & (s_b >= m_b))  # the larger of k, −k
    representative[0, 0] = False  # DC apart
    frequencies = torch.stack([s_a[representative], s_b[representative]], dim=-1)
    return FourierSpectrum((n_a, n_b), frequencies, merged[..., representative], full[..., 0, 0], flat_rtol)


def modular_grid_tokens(p: int, equals_token: int | None = None) -> Int[Tensor, "p2 3"]:
    """Every input ``[a, b, =]`` of a modular-arithmetic model, row ``a·p + b`` (``=``: token ``p``
    unless given), so a ``[p², ...]`` output reshapes to ``[p, p, ...]`` indexed ``[a, b]``."""
    p = positive_int(p, "p")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    eq = torch.full_like(a, p if equals_token is None else int(equals_token))
    return torch.stack([a, b, eq], dim=-1).reshape(p * p, 3)


@torch.no_grad()
def activation_grid(
    model: HookedModel,
    hook: str,
    tokens: Int[Tensor, "n pos"],
    grid: tuple[int, int],
    positions: Sequence[int] = (-1,),
    batch_size: int = 2048,
) -> Float[Tensor, "n_positions p_a p_b d"]:
    """The activation at ``hook`` for every input of a grid, in float64 on the host: ``out[j, a, b]`` is
    position ``positions[j]`` for input row ``a·p_b + b`` of ``tokens`` (``modular_grid_tokens`` lays
    them out so). Nothing after ``hook`` is computed."""
    n_a, n_b = (positive_int(n, "grid side") for n in grid)
    if tokens.ndim != 2 or tokens.shape[0] != n_a * n_b:
        raise ValueError(f"tokens must be [{n_a * n_b}, pos] for a {n_a} × {n_b} grid, got {tuple(tokens.shape)}")
    batch_size = positive_int(batch_size, "batch_size")
    device = model_device(model)
    chunks = []
    for start in range(0, tokens.shape[0], batch_size):
        act = output_at(model, to_device(tokens[start:start + batch_size], device), hook)
        chunks.append(act[:, list(positions)].to(device="cpu", dtype=torch.float64))  # [batch, n_positions, d]
    return torch.cat(chunks).reshape(n_a, n_b, len(positions), -1).permute(2, 0, 1, 3).contiguous()


def direction_grids(basis: Basis, activations: Float[Tensor, "n_positions p_a p_b d"]) -> Float[
        Tensor, "k n_positions p_a p_b"]:
    """Every direction of ``basis`` as a function on the grid: ``out[i, j, a, b]`` is coordinate ``i``
    (``basis.encode``) of ``activations[j, a, b]`` (from ``activation_grid`` at ``basis.hook``)."""
    if activations.ndim != 4 or activations.shape[-1] != basis.d:
        raise ValueError(f"activations must be [n_positions, p_a, p_b, {basis.d}] for the basis at {basis.hook}, "
                         f"got {tuple(activations.shape)}")
    return basis.encode(activations.to(torch.float64)).permute(3, 0, 1, 2).contiguous()
