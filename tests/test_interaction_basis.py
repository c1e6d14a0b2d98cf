"""The interaction basis against closed forms (docs/theory.md §5): deep linear networks, invariance,
estimator vs exact, and the trained modular-addition net."""
import pytest
import torch
from deep_linear import DeepLinear
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_degeneracy as tld
from tl_degeneracy.basis import InteractionBasis, fit_layer

pytestmark = pytest.mark.models

TOKENS = torch.randint(0, 11, (64, 4), generator=torch.Generator().manual_seed(0))
DL_HOOKS = ["hook_0", "hooks_after.0", "hooks_after.1"]
EXACT = tld.JacobianConfig(exact=True)


def _pca_coords(z: torch.Tensor, center: bool) -> torch.Tensor:
    z = z - z.mean(0) if center else z
    values, vectors = torch.linalg.eigh(z.T @ z / z.shape[0])
    order = values.argsort(descending=True)
    return z @ vectors[:, order], values[order]


def _match_up_to_sign(a: torch.Tensor, b: torch.Tensor) -> float:
    signs = torch.sign((a * b).sum(0))
    return float((a * signs - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("center", [True, False])
def test_deep_linear_coordinates_are_output_pca(center, device):
    # Uncentered, the claim needs z = A f exactly (no biases); centered, affine maps are fine.
    model = DeepLinear(bias=center).to(device)
    stats = tld.collect(model, TOKENS, DL_HOOKS, jacobians=EXACT, batch_size=16, progress=False)
    basis = InteractionBasis.fit(stats, center=center)
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS.to(device))
        z = model(TOKENS.to(device)).reshape(-1, 5)
    z_pca, z_var = _pca_coords(z, center)
    for hook in DL_HOOKS:
        layer = basis[hook]
        assert layer.k == 5  # rank of the output map
        f_hat = layer.transform(cache[hook].reshape(-1, 8))
        assert _match_up_to_sign(f_hat, z_pca) < 1e-8, hook
        # E[f̂ f̂ᵀ] = Λ = the output's principal variances
        assert torch.allclose(layer.eigenvalues, z_var, rtol=1e-8)


def test_deep_linear_probe_estimate_converges_to_exact(device):
    """The probe estimate's relative error falls like 1/sqrt(probes × datapoints).

    The deep linear network has one Jacobian A at every datapoint, so the estimate is
    Aᵀ (mean of n·S outer products v vᵀ) A: its error times sqrt(S·n) is a constant up to
    estimator noise (averaged over seeds), across a 64× range of probe budgets and 4× of data.
    """
    model = DeepLinear().to(device)
    scaled = {}
    for n_seq in (16, 64):
        tokens = TOKENS[:n_seq]
        exact = tld.collect(model, tokens, "hook_0", jacobians=EXACT, progress=False).jacobian_gram("hook_0")
        for s in (1, 4, 16, 64):
            errors = []
            for seed in range(4):
                est = tld.collect(model, tokens, "hook_0", progress=False, jacobians=tld.JacobianConfig(
                    n_probes=s, seed=seed, probe="gaussian")).jacobian_gram("hook_0")
                errors.append(float((est - exact).norm() / exact.norm()))
            scaled[n_seq, s] = sum(errors) / len(errors) * (s * tokens.numel()) ** 0.5
    values = list(scaled.values())
    assert max(values) / min(values) < 2.0, scaled
    # and the constant is O(1): the estimator is unbiased with unit-variance probes, not merely shrinking
    assert 0.5 < min(values) and max(values) < 4.0, scaled


def _reparametrise(model: DeepLinear, R: torch.Tensor) -> DeepLinear:
    """f → R f at hooks_after.0, next weight → W R⁻¹: the same function."""
    other = DeepLinear(nonlinear=model.nonlinear, d_out=model.out.out_features)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.linears[0].weight.copy_(R @ model.linears[0].weight)
        other.linears[0].bias.copy_(R @ model.linears[0].bias)
        other.linears[1].weight.copy_(model.linears[1].weight @ torch.linalg.inv(R))
    return other


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), log_scales=st.lists(st.floats(-1.0, 1.0), min_size=8, max_size=8))
def test_invariance_under_invertible_reparametrisation(seed, log_scales):
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    R = q1 @ torch.diag(torch.tensor(log_scales, dtype=torch.float64).exp()) @ q2
    model = DeepLinear(nonlinear=True, d_out=8)
    other = _reparametrise(model, R)
    hook = "hooks_after.0"
    coords = []
    for m in (model, other):
        stats = tld.collect(m, TOKENS, hook, jacobians=EXACT, batch_size=32, progress=False)
        basis = InteractionBasis.fit(stats)
        _, cache = m.run_with_cache(TOKENS)
        coords.append(basis[hook].transform(cache[hook].reshape(-1, 8)))
    assert coords[0].shape == coords[1].shape
    assert _match_up_to_sign(coords[1], coords[0]) < 1e-6


def test_pca_and_identity_bases_and_reconstruction(device):
    model = DeepLinear().to(device)
    stats = tld.collect(model, TOKENS, DL_HOOKS, progress=False)
    pca = InteractionBasis.fit(stats, scaling="pca")
    _, cache = model.run_with_cache(TOKENS.to(device))
    f = cache["hook_0"].reshape(-1, 8)
    layer = pca["hook_0"]
    assert torch.allclose(layer.inverse(layer.transform(f)), f, atol=1e-10)  # full rank: exact round trip
    assert torch.allclose(layer.eigenvalues, torch.linalg.eigvalsh(stats.covariance("hook_0")).flip(0), rtol=1e-8)
    ident = InteractionBasis.fit(stats, scaling="identity")
    assert torch.allclose(ident["hook_0"].transform(f), f - stats.mean("hook_0"))
    with pytest.raises(ValueError, match="jacobians=True"):
        InteractionBasis.fit(stats, hooks=["hook_0"])


def test_lib_and_paper_scalings_span_the_same_directions(device):
    model = DeepLinear().to(device)
    stats = tld.collect(model, TOKENS, "hook_0", jacobians=EXACT, progress=False)
    lib, paper = (InteractionBasis.fit(stats, scaling=s)["hook_0"] for s in ("lib", "paper"))
    # paper = Λ^{-1} lib, row by row
    assert torch.allclose(paper.C * lib.eigenvalues[:, None], lib.C, rtol=1e-8, atol=1e-12)
    eye = torch.eye(lib.k, dtype=torch.float64, device=lib.C.device)
    assert torch.allclose(lib.C @ lib.C_pinv, eye, atol=1e-10)
    assert torch.allclose(paper.C @ paper.C_pinv, eye, atol=1e-10)


def test_planted_null_directions_are_dropped_with_threshold_reported(device):
    # G of rank 3 in 5 dims: the basis has 3 directions and says what threshold it used.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, generator=g, dtype=torch.float64).to(device)
    G = A @ A.T
    layer = fit_layer("h", G, torch.eye(5, dtype=torch.float64, device=device),
                      torch.zeros(5, dtype=torch.float64, device=device), rtol=1e-10)
    assert layer.k == 3
    assert 0 < layer.thresholds["activation"] < 1e-8


def test_basis_save_load_roundtrip(tmp_path):
    model = DeepLinear()
    stats = tld.collect(model, TOKENS, DL_HOOKS, jacobians=EXACT, progress=False)
    basis = InteractionBasis.fit(stats)
    basis.save(tmp_path / "b.safetensors")
    back = InteractionBasis.load(tmp_path / "b.safetensors")
    assert back.hooks == basis.hooks
    assert back.meta["jacobians"]["exact"] is True and back.meta["n_tokens"] == TOKENS.numel()
    for hook in DL_HOOKS:
        assert torch.equal(back[hook].C, basis[hook].C) and back[hook].thresholds == basis[hook].thresholds
    stats.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="not a tl_degeneracy file"):
        InteractionBasis.load(tmp_path / "s.safetensors")


def test_probe_error_falls_like_inverse_sqrt_budget(tiny):
    """Relative Frobenius error of the probe estimate of M vs the exact mode ~ 1/sqrt(n_tokens · S).

    CPU only: its bounds hold for the CPU generator's draws (2 seeds); CUDA draws other probes."""
    tokens = torch.randint(0, 23, (192, 12), generator=torch.Generator().manual_seed(5))
    hook = "blocks.0.hook_resid_pre"
    kwargs = dict(batch_size=192, progress=False)
    exact = {n: tld.collect(tiny, tokens[:n], hook, jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]),
                            **kwargs).jacobian_gram(hook) for n in (48, 192)}

    def error(n: int, s: int) -> float:
        runs = [tld.collect(tiny, tokens[:n], hook, jacobians=tld.JacobianConfig(
                    n_probes=s, seed=seed, output_positions=[-1]), **kwargs).jacobian_gram(hook)
                for seed in range(2)]
        return sum(float((r - exact[n]).norm() / exact[n].norm()) for r in runs) / len(runs)

    e = {(n, s): error(n, s) for n, s in ((48, 1), (48, 4), (48, 16), (192, 4), (192, 64))}
    # error · sqrt(S · sequences) is one constant across the whole table (within estimator noise)
    scaled = {key: err * (key[0] * key[1]) ** 0.5 for key, err in e.items()}
    assert max(scaled.values()) / min(scaled.values()) < 2.0, scaled
    # 4× the probes or 4× the tokens should halve the error; allow estimator noise.
    assert 0.3 < e[48, 4] / e[48, 1] < 0.75, e
    assert 0.3 < e[48, 16] / e[48, 4] < 0.75, e
    assert 0.3 < e[192, 4] / e[48, 4] < 0.75, e
    assert e[192, 64] < 0.05, e  # the stated budget: 192 sequences (last-position output) × 64 probes


def test_local_basis_equals_global_in_a_deep_linear_network(device):
    """With everything linear, Jacobians to the next layer's f̂ carry the same M as to the output
    (Aᵀ A = C_{l+1}ᵀ C_{l+1} on the data's span), so local and global bases agree up to sign."""
    model = DeepLinear(bias=True).to(device)
    stats = tld.collect(model, TOKENS, DL_HOOKS, jacobians=EXACT, batch_size=16, progress=False)
    global_basis = InteractionBasis.fit(stats)
    local = InteractionBasis.fit_local(model, TOKENS, DL_HOOKS, jacobians=EXACT, batch_size=16)
    assert local.hooks == DL_HOOKS and local.meta["local"] is True
    _, cache = model.run_with_cache(TOKENS.to(device))
    for hook in DL_HOOKS:
        f = cache[hook].reshape(-1, 8)
        a, b = local[hook].transform(f), global_basis[hook].transform(f)
        assert a.shape == b.shape
        assert _match_up_to_sign(a, b) < 1e-8, hook


def test_kl_jacobian_gram_equals_dense_jt_h_j(tiny_on, device):
    """JacobianConfig(loss='kl'): exact mode equals Σ Jᵀ (diag p − p pᵀ) J built from dense Jacobians,
    and the probe estimate (v = Bξ, B Bᵀ = H) converges to it."""
    tiny = tiny_on
    tokens = torch.randint(0, 23, (6, 5), generator=torch.Generator().manual_seed(3))
    hook = "blocks.1.hook_resid_pre"
    kl = dict(loss="kl", output_positions=[-1])
    exact = tld.collect(tiny, tokens, hook, jacobians=tld.JacobianConfig(exact=True, **kl),
                        progress=False).jacobian_gram(hook)

    captured = {}

    def keep(act, hook):
        captured["f"] = act
        return act

    M = torch.zeros(16, 16, dtype=torch.float64, device=device)
    for b in range(tokens.shape[0]):
        with tiny.hooks(fwd_hooks=[(hook, keep)]):
            logits = tiny(tokens[b:b + 1].to(device))[0, -1]
        J = torch.stack([torch.autograd.grad(logits[k], captured["f"], retain_graph=True)[0][0]
                         for k in range(logits.shape[0])])  # [vocab, pos, d]
        p = torch.softmax(logits.detach(), -1)
        H = torch.diag(p) - torch.outer(p, p)
        for t in range(tokens.shape[1]):
            M += J[:, t].T @ H @ J[:, t]
    M /= tokens.numel()
    assert float((exact - M).norm() / M.norm()) < 1e-10
    estimate = tld.collect(tiny, tokens, hook, jacobians=tld.JacobianConfig(n_probes=256, probe="gaussian", **kl),
                           progress=False).jacobian_gram(hook)
    assert float((estimate - M).norm() / M.norm()) < 0.2
