"""N_eff(ε) by SGLD against known truths (docs/llc.md §5).

- Quadratic truth: the exact Gauss–Newton eigenvalues ``h_k`` of the behavioural loss (dense
  Jacobian by ``torch.func.jacrev``, independent of the sampler) predict
  ``N_eff(ε) = Σ t h_k/(t h_k + γ)``; SGLD agrees within 5% at three ε spanning 4 decades.
- Singular truths a Hessian cannot see (the Hessian at w* = 0 is zero for k ≥ 2): ``z = w^k x``
  (λ = 1/(2k)), the normal crossing ``z = w1 w2² x`` (λ = 1/4, multiplicity 1) and reduced-rank
  regression at the origin (Aoyagi–Watanabe's closed form), within 10% at small ε. Each toy is
  ``D`` independent copies (block-diagonal parameters): ``Z`` factorises, so ``λ`` is ``D`` times
  the one-copy value and the per-draw noise of ``t·L_B`` is ``√D`` times smaller relative to it.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from tl_degeneracy.llc import ParamSubset, estimate_neff, quadratic_neff, resolve_subset
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops lose to thread synchronisation


# -- quadratic truth -------------------------------------------------------------------------------

def exact_gn_eigenvalues(model, tokens, subset: ParamSubset) -> torch.Tensor:
    """Eigenvalues of the Hessian of L_B = 1/n Σ ½‖z − z*‖² at θ*: GN = 1/n Σ JᵀJ (n = positions)."""
    (slot,) = resolve_subset(model, subset)  # only to learn the parameter's name in this generation
    p = dict(model.named_parameters())[slot.name].detach()
    J = jacrev(lambda w: functional_call(model, {slot.name: w}, (tokens,), strict=False))(p)
    J = J.reshape(-1, p.numel())
    return torch.linalg.eigvalsh(J.T @ J / tokens.numel()).detach()


@pytest.mark.models
def test_quadratic_truth_gauss_newton_predicts_sgld_within_5_percent():
    model = tiny_model(seed=0)
    tokens = torch.randint(0, 23, (8, 12), generator=torch.Generator().manual_seed(0))
    subset = ParamSubset("unembed.W_U")
    h = exact_gn_eigenvalues(model, tokens, subset)
    gamma = 1.0
    # The cut γε from far above the spectrum (prior-dominated, N_eff ≈ t tr(H)/γ) to 1/30 of its top.
    base = float(h.max()) / (30 * gamma)
    eps = [base * 1e4, base * 1e2, base]
    truth = [quadratic_neff(h, e, gamma) for e in eps]
    assert truth[0] < 1 < truth[1] < 0.2 * h.numel() < truth[2] < h.numel()  # three regimes of the curve
    result = estimate_neff(model, tokens, eps=eps, params=subset, gamma=gamma, n_chains=2, n_draws=300, burn_in=50,
                           step_fraction=1.0, seed=1, progress=False)
    assert result.n_params == h.numel() == 16 * 23
    for s, want in zip(result.scales, truth):
        assert s.kept == 2, s.flags
        assert abs(s.n_eff / want - 1) < 0.05, (s.eps, s.n_eff, want)
        assert s.standard_error < 0.03 * want  # the 5% is not within the noise
    # Unpreconditioned, the automatic step size sees the top of the same spectrum at θ*: t h_max + γ.
    plain = estimate_neff(model, tokens, eps=eps[0], params=subset, gamma=gamma, n_chains=1, n_draws=4, burn_in=0,
                          preconditioner="none", seed=1, progress=False).scales[0]
    t = 1 / eps[0]
    assert plain.step_size_choice["stiffness_at_optimum"] == pytest.approx(t * float(h.max()) + gamma, rel=0.01)


# -- singular truths ---------------------------------------------------------------------------------

class Power(nn.Module):
    """``z_j = w_j^k x`` for D copies: ``L_B = ½ mean(x²) Σ_j w_j^{2k}``, λ = D/(2k) at w* = 0."""

    def __init__(self, copies: int, k: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(copies, dtype=torch.float64))
        self.k = k

    def forward(self, x):
        return x * self.w ** self.k


class Crossing(nn.Module):
    """``z_j = w1_j^a w2_j^b x``: λ = D/(2 max(a, b)), multiplicity 1 when a ≠ b."""

    def __init__(self, copies: int, a: int, b: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(copies, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.zeros(copies, dtype=torch.float64))
        self.a, self.b = a, b

    def forward(self, x):
        return x * self.w1 ** self.a * self.w2 ** self.b


class ReducedRank(nn.Module):
    """D copies of ``z = B A x`` (A: H×M, B: N×H) at A = B = 0: true rank r = 0."""

    def __init__(self, copies: int, M: int, H: int, N: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(copies, H, M, dtype=torch.float64))
        self.B = nn.Parameter(torch.zeros(copies, N, H, dtype=torch.float64))

    def forward(self, x):  # x: [n, copies, M]
        return torch.einsum("dnh,dhm,idm->idn", self.B, self.A, x)


def aoyagi_watanabe(M: int, N: int, H: int, r: int) -> tuple[float, int]:
    """(λ, multiplicity) of reduced-rank regression (Aoyagi & Watanabe 2005, Neural Networks 18)."""
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        base = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
        return ((base, 1) if (M + N + H + r) % 2 == 0 else (base + 1, 2))[0] / 8, 1 + (M + N + H + r) % 2
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2, 1
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2, 1
    return M * N / 2, 1


def test_aoyagi_watanabe_closed_form():
    assert aoyagi_watanabe(3, 3, 2, 0) == (2.5, 1)  # 12 parameters, N_eff 5: half the regular count
    assert aoyagi_watanabe(3, 3, 3, 3) == (9 / 2, 1)  # full rank: regular, λ = (MH + HN − H²)/2
    assert aoyagi_watanabe(2, 2, 8, 2) == (2.0, 1)  # M + N < H + r: λ = MN/2


def crossing_lambda_at(t: float, c: float, gamma: float) -> float:
    """Exact finite-t λ(t) = −d log Z/d log t of one copy of ``c w1² w2⁴ + γ/2 (w1² + w2²)`` (a=1, b=2):
    the w1 integral is Gaussian, the w2 one is done on a log grid."""
    w = torch.logspace(-9, 1.5, 400_001, dtype=torch.float64)

    def log_z(tt: float) -> float:
        f = (tt * c * w ** 4 + gamma / 2).rsqrt() * torch.exp(-gamma * w ** 2 / 2) * w  # dw = w d(log w)
        return math.log(float(torch.trapezoid(f, torch.log(w))))

    d = 1e-3
    return -(log_z(t * (1 + d)) - log_z(t * (1 - d))) / (math.log1p(d) - math.log1p(-d))


def inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_power_law_w_to_the_k(k):
    copies = 100
    result = estimate_neff(Power(copies, k), inputs(64, 1), eps=1e-8, gamma=1.0, n_chains=4, n_draws=1000,
                           burn_in=200, seed=k, progress=False)
    s = result.scales[0]
    want = 2 * copies / (2 * k)  # N_eff = 2λ
    assert s.kept == 4, s.flags
    assert abs(s.n_eff / want - 1) < 0.10, (k, s.n_eff, want)
    if k > 1:  # flat to second order at w* = 0 (a Hessian count would say 0): only the localisation γ is stiff
        assert s.step_size_choice["stiffness_at_optimum"] == pytest.approx(1.0)


def test_normal_crossing_w1_w2_squared():
    copies, eps, gamma = 100, 1e-8, 1.0
    x = inputs(64, 1)
    c = 0.5 * float(x.square().mean())
    finite_t = crossing_lambda_at(1 / eps, c, gamma)
    assert abs(finite_t / 0.25 - 1) < 0.03  # at this ε the asymptotic λ = 1/4 holds to 3%
    result = estimate_neff(Crossing(copies, 1, 2), x, eps=eps, gamma=gamma, n_chains=4, n_draws=2000, burn_in=500,
                           step_fraction=0.25, seed=3, progress=False)
    s = result.scales[0]
    assert s.kept == 4, s.flags
    assert abs(s.n_eff / (2 * copies * 0.25) - 1) < 0.10, s.n_eff


def test_reduced_rank_regression_aoyagi_watanabe():
    copies, (M, H, N) = 20, (3, 2, 3)
    lam, multiplicity = aoyagi_watanabe(M, N, H, 0)
    assert multiplicity == 1  # no log t correction at finite ε
    result = estimate_neff(ReducedRank(copies, M, H, N), inputs(128, copies, M), eps=1e-8, gamma=1.0, n_chains=4,
                           n_draws=1500, burn_in=500, seed=4, progress=False)
    s = result.scales[0]
    assert s.kept == 4, s.flags
    want = 2 * copies * lam  # 100, against a regular count of 2·copies·(MH + HN)/2 = 240
    assert abs(s.n_eff / want - 1) < 0.10, s.n_eff
