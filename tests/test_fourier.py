"""The 2-D Fourier spectrum of a direction on the (a, b) grid (tl_degeneracy/analysis/fourier.py).

Planted waves with known powers, a naive double-sum DFT as the dense reference, Parseval against the
variance computed directly; then the grokked mod-add model: the grid layout against single forwards,
one Fourier coefficient evaluated by hand, and its sparsity against the same values shuffled.
"""
from __future__ import annotations

import math

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.analysis.fourier import (
    FourierSpectrum,
    activation_grid,
    direction_grids,
    fourier_spectrum,
    modular_grid_tokens,
    signed_frequency,
)
from tl_degeneracy.testing import MODADD_P, modadd_dataset, modadd_model

P = 113


def wave(k_a: int, k_b: int, p_a: int = P, p_b: int = P, phase: float = 0.0) -> torch.Tensor:
    a = torch.arange(p_a, dtype=torch.float64)[:, None]
    b = torch.arange(p_b, dtype=torch.float64)[None, :]
    return torch.cos(2 * math.pi * (k_a * a / p_a + k_b * b / p_b) + phase)


def frequency_index(spectrum: FourierSpectrum, k_a: int, k_b: int) -> int:
    hits = ((spectrum.frequencies[:, 0] == k_a) & (spectrum.frequencies[:, 1] == k_b)).nonzero()
    assert hits.numel() == 1, (k_a, k_b)
    return int(hits)


def naive_dft(f: torch.Tensor, k_a: int, k_b: int) -> complex:
    """``F[k_a, k_b]`` with the ortho normalisation, as the double sum it is defined by."""
    p_a, p_b = f.shape
    total = 0j
    for a in range(p_a):
        for b in range(p_b):
            total += float(f[a, b]) * complex(math.cos(-2 * math.pi * (k_a * a / p_a + k_b * b / p_b)),
                                              math.sin(-2 * math.pi * (k_a * a / p_a + k_b * b / p_b)))
    return total / math.sqrt(p_a * p_b)


# --- planted waves -------------------------------------------------------------------------------


@pytest.mark.parametrize("k, named", [(14, (14, 14)), (100, (13, 13))])  # 100 ≡ −13 (mod 113)
def test_one_wave_in_a_plus_b_is_one_frequency(k, named):
    s = fourier_spectrum(wave(k, k, phase=0.7))
    index, shares = s.strongest(1)
    assert tuple(s.frequencies[index[0]].tolist()) == named
    assert float(shares[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(s.share(1)) == pytest.approx(1.0, abs=1e-12)
    # cos² averages 1/2 over whole periods: Var = 1/2, non-DC power = p² · 1/2, no DC
    assert float(s.variance) == pytest.approx(0.5, rel=1e-12)
    assert float(s.total) == pytest.approx(P * P / 2, rel=1e-12)
    assert float(s.dc) == pytest.approx(0.0, abs=1e-18)


def test_two_planted_waves_with_weights_and_an_offset():
    f = 3.0 + 2.0 * wave(5, 0) + 1.0 * wave(7, -7, phase=0.3)  # variances 2²/2 = 2 and 1²/2 = 1/2
    s = fourier_spectrum(f)
    index, shares = s.strongest(2)
    assert [tuple(s.frequencies[i].tolist()) for i in index] == [(5, 0), (7, -7)]
    assert shares.tolist() == pytest.approx([0.8, 0.2], abs=1e-12)
    assert float(s.share(1)) == pytest.approx(0.8, abs=1e-12)
    assert float(s.share(5)) == pytest.approx(1.0, abs=1e-12)
    assert float(s.dc) == pytest.approx(P * P * 9.0, rel=1e-12)  # |F[0, 0]|² = p² · mean²
    # Parseval against the variance and the sum of squares computed directly
    assert float(s.total) == pytest.approx(P * P * float(f.var(unbiased=False)), rel=1e-12)
    assert float(s.total + s.dc) == pytest.approx(float(f.square().sum()), rel=1e-12)
    assert float(s.variance) == pytest.approx(2.5, rel=1e-12)


def test_conjugate_pairs_are_merged_once_and_named_with_k_a_nonnegative():
    s = fourier_spectrum(torch.randn(P, P, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert s.frequencies.shape == ((P * P - 1) // 2, 2)  # every non-DC k paired with −k, no self-conjugate k
    k_a, k_b = s.frequencies.unbind(-1)
    assert bool((k_a >= 0).all()) and bool((k_b[k_a == 0] > 0).all())
    assert bool((k_a.abs() <= P // 2).all()) and bool((k_b.abs() <= P // 2).all())
    both = torch.cat([s.frequencies, -s.frequencies]) % P  # the pairs and their conjugates: every non-DC k once
    assert len({tuple(row) for row in both.tolist()}) == P * P - 1


@pytest.mark.parametrize("shape", [(5, 7), (6, 4), (8, 8), (1, 6)])
def test_merged_power_against_a_naive_dft(shape):
    """Odd and even sides (even ones have self-conjugate frequencies p/2, counted once)."""
    f = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = fourier_spectrum(f)
    p_a, p_b = shape
    n_self = sum(1 for x in range(p_a) for y in range(p_b) if (2 * x) % p_a == 0 and (2 * y) % p_b == 0)
    assert s.frequencies.shape[0] == (p_a * p_b - n_self) // 2 + n_self - 1
    seen = set()
    for j, (k_a, k_b) in enumerate(s.frequencies.tolist()):
        k, minus = (k_a % p_a, k_b % p_b), (-k_a % p_a, -k_b % p_b)
        expected = abs(naive_dft(f, *k)) ** 2 + (abs(naive_dft(f, *minus)) ** 2 if minus != k else 0.0)
        assert float(s.power[j]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        seen |= {k, minus}
    assert seen == {(x, y) for x in range(p_a) for y in range(p_b)} - {(0, 0)}
    assert float(s.dc) == pytest.approx(abs(naive_dft(f, 0, 0)) ** 2, rel=1e-12)
    assert float(s.total) == pytest.approx(p_a * p_b * float(f.var(unbiased=False)), rel=1e-12)


def test_self_conjugate_frequency_is_counted_once():
    f = wave(3, 0, p_a=6, p_b=4)  # (−1)^a: frequency (3, 0) = its own conjugate on a side of 6
    s = fourier_spectrum(f)
    j = frequency_index(s, 3, 0)
    assert float(s.power[j]) == pytest.approx(24.0, rel=1e-12)  # Σ f² = 24, no DC
    assert float(s.share(1)) == pytest.approx(1.0, abs=1e-12)


def test_key_frequency_groups_waves_in_a_b_a_plus_b_and_a_minus_b():
    f = wave(9, 0) * wave(0, 9)  # ½ cos(9(a+b)) + ½ cos(9(a−b)): two 2-D pairs, one key frequency
    s = fourier_spectrum(f + 0.5 * wave(0, 40))
    keys, mixed = s.key_frequency_shares()
    assert keys.shape == (P // 2,)
    total = 0.25 + 0.5 ** 2 / 2  # variances: (½)²/2 twice, then (½)²/2
    assert float(keys[9 - 1]) == pytest.approx(0.25 / total, abs=1e-12)
    assert float(keys[40 - 1]) == pytest.approx(0.125 / total, abs=1e-12)
    assert float(mixed) == pytest.approx(0.0, abs=1e-12)
    assert float(s.share(1)) == pytest.approx(0.125 / total, abs=1e-12)  # three equal 2-D pairs
    _, mixed = fourier_spectrum(wave(15, -18)).key_frequency_shares()
    assert float(mixed) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="square"):
        fourier_spectrum(torch.randn(4, 5, dtype=torch.float64)).key_frequency_shares()


def test_batched_grids_and_pooled_positions():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(P, 1, generator=g, dtype=torch.float64).expand(P, P)  # a function of a alone
    v = torch.randn(1, P, generator=g, dtype=torch.float64).expand(P, P)  # of b alone
    stacked = fourier_spectrum(torch.stack([u, v]))
    for i, grid in enumerate((u, v)):
        one = fourier_spectrum(grid)
        assert torch.allclose(stacked.power[i], one.power, rtol=1e-12, atol=1e-12)
        assert torch.allclose(stacked.dc[i], one.dc, rtol=1e-12)
    # u(a) and v(b) live on disjoint frequencies ((k, 0) vs (0, k)): pooling the two grids is the
    # spectrum of u + v, apart from the DC term (each grid's own mean is removed)
    pooled, summed = stacked.sum(0), fourier_spectrum(u + v)
    assert torch.allclose(pooled.power, summed.power, rtol=1e-10, atol=1e-10)
    assert float(stacked.power[0][stacked.frequencies[:, 1] != 0].sum()) <= 1e-20 * float(stacked.total[0])


def test_flat_grids_and_bad_input():
    s = fourier_spectrum(torch.full((2, 7, 7), 3.0, dtype=torch.float64))
    assert bool(s.flat.all()) and bool(s.share(1).isnan().all())
    assert float(s.dc[0]) == pytest.approx(49 * 9.0, rel=1e-12)
    mixed = fourier_spectrum(torch.stack([torch.full((7, 7), 3.0, dtype=torch.float64), wave(1, 2, 7, 7)]))
    assert mixed.flat.tolist() == [True, False]
    assert math.isnan(float(mixed.share(2)[0])) and float(mixed.share(2)[1]) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at most the number"):
        s.strongest(25)
    with pytest.raises(ValueError, match="positive integer"):
        s.strongest(0)
    with pytest.raises(ValueError, match="real"):
        fourier_spectrum(torch.ones(3, 3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="finite"):
        fourier_spectrum(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="two non-empty axes"):
        fourier_spectrum(torch.ones(5))
    with pytest.raises(ValueError, match="a spectrum needs"):
        FourierSpectrum((3, 3), torch.zeros(4, 2, dtype=torch.long), torch.zeros(3), torch.zeros(()))


def test_signed_frequency_and_grid_tokens():
    assert signed_frequency(torch.arange(6), 6).tolist() == [0, 1, 2, 3, -2, -1]
    assert signed_frequency(torch.arange(5), 5).tolist() == [0, 1, 2, -2, -1]
    tokens = modular_grid_tokens(4)
    assert tokens.shape == (16, 3) and tokens[1 * 4 + 3].tolist() == [1, 3, 4]
    assert modular_grid_tokens(3, equals_token=9)[5].tolist() == [1, 2, 9]


# --- the grokked modular-addition model -----------------------------------------------------------


@pytest.fixture(scope="module")
def modadd():
    """The model, PCA at resid_pre (all positions) and resid_post (last), and both hooks' direction grids."""
    model = modadd_model(dtype=torch.float64, device="cpu")
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]
    stats = tld.collect(model, modadd_dataset("train"), hooks, positions={hooks[1]: [-1]}, batch_size=1000,
                        progress=False)
    pca = tld.InteractionBasis.fit(stats, scaling="pca", rtol=1e-10)
    tokens, grid = modular_grid_tokens(MODADD_P), (MODADD_P, MODADD_P)
    post = direction_grids(pca[hooks[1]], activation_grid(model, hooks[1], tokens, grid, batch_size=5000))
    pre = direction_grids(pca[hooks[0]], activation_grid(model, hooks[0], tokens, grid, positions=[0, 1]))
    return model, pca, pre, post


@pytest.mark.models
def test_direction_grids_match_single_forwards(modadd):
    model, pca, pre, post = modadd
    layer = pca["blocks.0.hook_resid_post"]
    assert post.shape == (layer.k, 1, MODADD_P, MODADD_P) and post.dtype == torch.float64
    for a, b in [(0, 0), (3, 110), (112, 5), (57, 57)]:
        _, cache = model.run_with_cache(torch.tensor([[a, b, MODADD_P]]))
        direct = layer.encode(cache["blocks.0.hook_resid_post"][0, -1].to(torch.float64))
        assert torch.allclose(post[:, 0, a, b], direct, rtol=1e-10, atol=1e-10), (a, b)
    # resid_pre is the embedding: at position 0 a function of a alone, at position 1 of b alone
    s = fourier_spectrum(pre[:3])
    k_a, k_b = s.frequencies.unbind(-1)
    assert float(s.power[:, 0][:, k_b != 0].sum()) <= 1e-20 * float(s.total[:, 0].sum())
    assert float(s.power[:, 1][:, k_a != 0].sum()) <= 1e-20 * float(s.total[:, 1].sum())
    with pytest.raises(ValueError, match="tokens must be"):
        activation_grid(model, layer.hook, modular_grid_tokens(MODADD_P)[:-1], (MODADD_P, MODADD_P))
    with pytest.raises(ValueError, match="activations must be"):
        direction_grids(layer, torch.zeros(1, 3, 3, layer.d + 1, dtype=torch.float64))


@pytest.mark.models
def test_top_pca_directions_of_the_grokked_model_are_fourier_sparse(modadd):
    _, _, _, post = modadd
    grids = post[:3, 0]
    s = fourier_spectrum(grids)
    shares = torch.stack([s.share(m) for m in (1, 2, 5)], dim=-1)
    assert bool(((shares >= 0) & (shares <= 1 + 1e-12)).all())
    assert bool((shares.diff(dim=-1) >= 0).all())
    assert torch.allclose(s.variance, grids.var(dim=(-2, -1), unbiased=False), rtol=1e-10)
    # the strongest coefficient of direction 0, evaluated as the double sum (merged: twice |F[k]|², p odd)
    index, top = s.strongest(1)
    k_a, k_b = s.frequencies[index[0, 0]].tolist()
    a = torch.arange(MODADD_P, dtype=torch.float64)[:, None]
    b = torch.arange(MODADD_P, dtype=torch.float64)[None, :]
    angle = -2 * math.pi * (k_a * a + k_b * b) / MODADD_P
    coefficient = torch.complex(grids[0] * torch.cos(angle), grids[0] * torch.sin(angle)).sum() / MODADD_P
    assert 2 * abs(complex(coefficient)) ** 2 == pytest.approx(float(s.power[0, index[0, 0]]), rel=1e-10)
    assert float(top[0, 0]) == pytest.approx(2 * abs(complex(coefficient)) ** 2 / float(s.total[0]), rel=1e-10)
    # grokked: most of each top direction's variance sits in 5 of the 6384 frequency pairs; the same
    # values shuffled over the grid (same variance, structure destroyed) spread over all of them
    assert bool((s.share(5) > 0.8).all()), s.share(5)
    order = torch.randperm(MODADD_P ** 2, generator=torch.Generator().manual_seed(0))
    shuffled = fourier_spectrum(grids.reshape(3, -1)[:, order].reshape(grids.shape))
    assert torch.allclose(shuffled.total, s.total, rtol=1e-10)
    assert bool((shuffled.share(5) < 0.02).all()), shuffled.share(5)
