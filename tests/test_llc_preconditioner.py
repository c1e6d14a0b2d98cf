"""The preconditioned sampler (docs/llc.md §2): the factors against dense matrices, the tempered
posterior unchanged by a constant P (quadratic truth with every kind), the pilot's checkpoint under
SIGTERM, and the figures and CLI when no chain is kept."""
from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tl_degeneracy.llc import Preconditioning, estimate_neff, preconditioner, quadratic_neff
from tl_degeneracy.llc import pilot as pilot_module
from tl_degeneracy.llc.curvature import Curvature, KroneckerBlock
from tl_degeneracy.llc.plots import layer_bars, loss_traces, neff_curve

sys.path.insert(0, str(Path(__file__).parent))
from test_llc_truths import exact_gn_eigenvalues  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops lose to thread synchronisation


def spd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def dense(apply, n: int) -> torch.Tensor:
    """The matrix of a linear map on one flat slot of ``n`` entries, column by column."""
    eye = torch.eye(n, dtype=torch.float64)
    return torch.stack([apply([eye[:, i]])[0] for i in range(n)], dim=1)


@pytest.mark.parametrize("kind,diagonal_k", [("kfac", False), ("kfac", True), ("ekfac", False)])
def test_kronecker_factor_is_the_dense_inverse_square_root(kind, diagonal_k):
    """One slot of 14 entries: a 3×4 matrix at positions 1..12 (row-major [d_in, d_out]) and two loose
    entries. ``L Lᵀ`` must be ``(t Ĥ + γ)⁻¹`` with ``Ĥ = G ⊗ K`` on the block (EK-FAC: the corrected
    eigenvalues in the same eigenbasis) and the diagonal elsewhere; ``upper`` must be ``Lᵀ``."""
    t, gamma, d_in, d_out = 50.0, 2.0, 3, 4
    G, K = spd(d_in, 0), spd(d_out, 1)
    if diagonal_k:
        K = torch.diag(torch.diag(K))
    g, u_in = torch.linalg.eigh(G)
    k, u_out = torch.linalg.eigh(K)
    positions = torch.arange(1, 1 + d_in * d_out)
    corrected = None
    if kind == "ekfac":
        corrected = torch.rand(d_in, d_out, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    block = KroneckerBlock(slot=0, label="W", positions=positions, u_in=u_in, g=g,
                           u_out=None if diagonal_k else u_out, k=torch.diag(K) if diagonal_k else k,
                           corrected=corrected)
    diag = torch.rand(14, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    curvature = Curvature(Preconditioning(kind), diagonal=[diag], blocks=[block])
    target = SimpleNamespace(slots=[SimpleNamespace(param=torch.zeros(14, dtype=torch.float64))])
    factor = preconditioner(Preconditioning(kind), curvature, target, t, gamma)  # type: ignore[arg-type]

    L, LT = dense(factor.lower, 14), dense(factor.upper, 14)
    assert torch.allclose(LT, L.T, atol=1e-12)
    H = torch.diag(diag)
    H[1:13, 1:13] = torch.kron(G, K)
    if kind == "ekfac":
        U = torch.kron(u_in, u_out)  # vec of U_G X U_Kᵀ, row-major
        H[1:13, 1:13] = U @ torch.diag(corrected.reshape(-1)) @ U.T
    want = torch.linalg.inv(t * H + gamma * torch.eye(14, dtype=torch.float64))
    assert torch.allclose(L @ L.T, want, atol=1e-12, rtol=1e-10)
    assert factor.largest() == pytest.approx(float(torch.linalg.eigvalsh(L @ L.T).max()) if kind == "ekfac"
                                             else float(torch.linalg.eigvalsh(want).max()), rel=1e-9)


def test_diagonal_and_rmsprop_factors():
    t, gamma = 10.0, 4.0
    diag = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    target = SimpleNamespace(slots=[SimpleNamespace(param=torch.zeros(3, dtype=torch.float64))])
    factor = preconditioner(Preconditioning.DIAG, Curvature(Preconditioning.DIAG, diagonal=[diag]), target, t, gamma)
    assert torch.allclose(dense(factor.lower, 3) ** 2, torch.diag(1 / (t * diag + gamma)))
    V = torch.tensor([0.0, 16.0, 100.0], dtype=torch.float64)
    rms = preconditioner(Preconditioning.RMSPROP, Curvature(Preconditioning.RMSPROP), target, t, gamma,
                         squared_gradients=[V])
    assert torch.allclose(dense(rms.lower, 3) ** 2, torch.diag(1 / (V.sqrt() + math.sqrt(gamma))))
    # before its pilot, RMSprop samples plainly
    assert preconditioner(Preconditioning.RMSPROP, Curvature(Preconditioning.RMSPROP), target, t, gamma).largest() == 1


@pytest.mark.models
@pytest.mark.parametrize("kind", ["kfac", "diag", "rmsprop"])
def test_constant_preconditioner_keeps_the_quadratic_truth(kind):
    """L_B exactly quadratic in W_U: N_eff(ε) = Σ t h/(t h + γ) whatever constant P the chain uses."""
    from tl_degeneracy.llc import ParamSubset
    from tl_degeneracy.testing import tiny_model

    model = tiny_model(seed=0)
    tokens = torch.randint(0, 23, (8, 12), generator=torch.Generator().manual_seed(0))
    subset = ParamSubset("unembed.W_U")
    h = exact_gn_eigenvalues(model, tokens, subset)
    eps = float(h.max()) / 30  # γ = 1: the cut-off at 1/30 of the spectrum's top
    want = quadratic_neff(h, eps, 1.0)
    result = estimate_neff(model, tokens, eps=eps, params=subset, gamma=1.0, n_chains=2, n_draws=600, burn_in=50,
                           preconditioner=kind, seed=3, progress=False)
    s = result.scales[0]
    assert s.preconditioner is not None and s.preconditioner["kind"] == kind
    assert s.kept == 2, s.flags
    assert abs(s.n_eff / want - 1) < 0.05, (kind, s.n_eff, want)
    assert s.standard_error < 0.03 * want  # the 5% is not within the noise


class Quadratic(nn.Module):
    """``z = A w`` per datapoint: a full-rank quadratic L_B with correlated directions."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        return x @ torch.diag(torch.linspace(1, 30, self.w.numel(), dtype=torch.float64)) * self.w


def test_sigterm_during_the_pilot_loses_nothing(tmp_path, monkeypatch):
    """SIGTERM in the middle of a pilot's Hessian–vector product: held until the product is whole, then
    the pilot's state is checkpointed; the resumed run gives the uninterrupted result exactly."""
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = dict(eps=[1e-2, 1e-1], n_chains=2, n_draws=30, burn_in=10, gamma=1.0, preconditioner="diag",
                   pilot_steps=12, seed=4, progress=False)
    whole = estimate_neff(Quadratic(), x, **options)
    calls = {"n": 0}
    real = pilot_module.hessian_vector

    def signalling(target, y):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the unit: deferred to its end
        return real(target, y)

    monkeypatch.setattr(pilot_module, "hessian_vector", signalling)
    path = tmp_path / "llc.safetensors"
    with pytest.raises(KeyboardInterrupt):
        estimate_neff(Quadratic(), x, checkpoint=path, **options)
    assert calls["n"] == 3 and path.exists()
    calls["n"] = 100  # no more signals
    resumed = estimate_neff(Quadratic(), x, checkpoint=path, resume=True, **options)
    assert calls["n"] - 100 < sum(s.step_size_choice["hessian_vector_products"] for s in whole.scales)
    for a, b in zip(resumed.scales, whole.scales):
        assert a.step_size == b.step_size
        assert [c.trace for c in a.chains] == [c.trace for c in b.chains]


def test_figures_with_no_kept_chain_or_nothing_positive(tmp_path):
    """A scale with no kept chain, zero or negative counts, an empty part list: a figure with a note."""
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = estimate_neff(Quadratic(), x, eps=[1e-2, 1e-1], n_chains=2, n_draws=8, burn_in=0, gamma=1.0,
                           preconditioner="none", step_size=1e-6, progress=False)
    for s in result.scales:  # as if every chain had been left out
        s.n_eff, s.standard_error, s.kept = math.nan, math.nan, 0
    for name, write in [("curve", lambda p: neff_curve(result, p, kfac=[0, -3], quadratic=[math.nan, 0.0])),
                        ("bars", lambda p: layer_bars({"model": result}, 1e-2, p, kfac={"model": -1})),
                        ("empty", lambda p: layer_bars({}, 1e-2, p)),
                        ("traces", lambda p: loss_traces(result, p))]:
        path = write(tmp_path / f"{name}.png")
        assert Path(path).stat().st_size > 1000


def test_cli_llc_with_no_kept_chain_writes_results_and_exits_2(tmp_path, capsys, monkeypatch):
    """Every chain diverges (a step size far too large): llc.json and the plots are written first, then one
    paragraph and exit code 2, no traceback."""
    from tl_degeneracy.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["llc", "--eps", "1e-3", "1e-2", "--params", "blocks.0.attn.W_V", "--head", "0", "--chains", "2",
                 "--draws", "10", "--burn-in", "0", "--step-size", "10", "--preconditioner", "none",
                 "--tokens", "32", "--context", "16", "--no-progress", "--out", "run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "every chain diverged" in err and "llc.json" in err
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "every chain diverged" in message[0]  # one paragraph
    assert (tmp_path / "run" / "llc.json").exists()
    assert (tmp_path / "run" / "plots" / "llc_curve.png").stat().st_size > 1000


def test_shared_tensors_are_saved_as_copies(tmp_path):
    """The query heads of a grouped-query layer share one input Gram: the checkpoint writer must not refuse."""
    from safetensors.torch import load_file

    from tl_degeneracy.checkpoint import atomic_save_safetensors

    g = torch.arange(6.0).reshape(2, 3)
    atomic_save_safetensors({"a": g, "b": g, "row": g[1]}, {}, tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], g) and torch.equal(back["b"], g) and torch.equal(back["row"], g[1])


@pytest.mark.models
def test_checkpointed_ekfac_run_on_a_grouped_query_llama_resumes(tmp_path):
    """SmolLM2's architecture at toy size (GQA, SwiGLU, RMSNorm): K-FAC blocks per query head share their
    Grams; the checkpoint is written and a resume gives the uninterrupted result."""
    from tl_degeneracy.llc import ParamSubset
    from tl_degeneracy.testing.hf_models import LLAMA, tiny_hf_model

    model = tiny_hf_model("llama", seed=0)
    tokens = torch.randint(3, LLAMA["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(0))
    options = dict(eps=1e-2, params=ParamSubset(layer=1), n_chains=1, n_draws=20, burn_in=10, pilot_steps=10,
                   seed=1, progress=False)
    path = tmp_path / "llc.safetensors"
    whole = estimate_neff(model, tokens, checkpoint=path, **options)
    assert whole.scales[0].preconditioner["kind"] == "ekfac" and whole.scales[0].preconditioner["kfac_blocks"] > 0
    again = estimate_neff(model, tokens, checkpoint=path, resume=True, **options)
    assert [c.trace for c in again.scales[0].chains] == [c.trace for c in whole.scales[0].chains]
