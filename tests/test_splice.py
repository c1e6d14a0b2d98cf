"""Splicing a basis into a live model: output unchanged, new hook points usable, exact restore."""
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.interaction_basis import InteractionBasis
from tl_degeneracy.splice import splice, splice_into, unsplice
from tl_degeneracy.testing import modadd_dataset, modadd_model, tiny_model

pytestmark = pytest.mark.models

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
TOKENS = torch.randint(0, 23, (32, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model32():
    return tiny_model(seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def basis(model32):
    stats = tld.collect(model32, TOKENS, HOOKS, jacobians=True, n_probes=4, progress=False)
    return InteractionBasis.fit(stats)


def test_spliced_logits_equal_plain(model32, basis):
    plain = model32(TOKENS)
    hooks_before = set(model32.hook_dict)
    with splice(model32, basis):
        spliced = model32(TOKENS)
        assert {f"{h}.hook_ib" for h in HOOKS} <= set(model32.hook_dict)
    assert float((spliced - plain).detach().abs().max()) < 1e-5
    assert set(model32.hook_dict) == hooks_before  # restored exactly
    assert torch.equal(model32(TOKENS), plain)
    assert not any("ib_splice" in name for name, _ in model32.named_modules())


def test_hook_ib_in_cache_and_hooks_forward_and_backward(model32, basis):
    hook = "blocks.1.hook_resid_mid"
    layer = basis[hook]
    with splice(model32, basis):
        _, cache = model32.run_with_cache(TOKENS, names_filter=lambda n: n.endswith((".hook_ib", "hook_resid_mid")))
        f_hat = cache[f"{hook}.hook_ib"]
        assert f_hat.shape == (32, 12, layer.k)
        expected = layer.transform(cache[hook].double())
        assert torch.allclose(f_hat.double(), expected, atol=1e-4, rtol=1e-4)

        grads = {}
        with model32.hooks(bwd_hooks=[(f"{hook}.hook_ib", lambda g, hook: grads.setdefault("g", g.detach()))]):
            model32(TOKENS).sum().backward()
        assert grads["g"].shape == (32, 12, layer.k) and float(grads["g"].abs().sum()) > 0
    model32.zero_grad(set_to_none=True)


def test_error_term_and_pure_reconstruction(model32, basis):
    hook = "blocks.0.hook_resid_pre"
    layer = basis[hook]
    assert layer.k < layer.d  # LayerNorm'd models lose a direction: a truncated basis
    with splice(model32, basis, hooks=[hook]):
        _, cache = model32.run_with_cache(TOKENS, names_filter=lambda n: n.startswith(hook))
    f = cache[hook].double()
    centered = f - layer.mean
    expected_error = centered - centered @ layer.C.T @ layer.C_pinv.T
    assert torch.allclose(cache[f"{hook}.hook_ib_error"].double(), expected_error, atol=1e-5)
    plain = model32(TOKENS)
    with splice(model32, basis, hooks=[hook], error_term=False):
        recon = model32(TOKENS)
    lost = float(expected_error.norm() / centered.norm())
    assert lost > 0 and float((recon - plain).detach().abs().max()) > 1e-6 or lost < 1e-6


def test_permanent_splice_and_unsplice(model32, basis):
    plain = model32(TOKENS)
    splice_into(model32, basis)
    with pytest.raises(ValueError, match="already"):
        splice_into(model32, basis)
    assert float((model32(TOKENS) - plain).detach().abs().max()) < 1e-5
    unsplice(model32)
    assert torch.equal(model32(TOKENS), plain)


def test_mismatched_basis_is_refused(basis):
    other = tiny_model(seed=0, d_model=8, d_head=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="d_model"):
        with splice(other, basis):
            pass


def test_ablating_small_lambda_costs_far_less_than_large(modadd_dir):
    """Mod-add net: mean-ablate the k smallest- vs largest-Λ interaction directions of resid_post."""
    model = modadd_model(modadd_dir, dtype=torch.float64)
    tokens = modadd_dataset("train")[:1000]
    hook = "blocks.0.hook_resid_post"
    stats = tld.collect(model, tokens, hook, positions=[-1], jacobians=True, n_probes=8,
                        output_positions=[-1], batch_size=500, progress=False)
    layer = InteractionBasis.fit(stats)[hook]
    with torch.no_grad():
        plain = model(tokens)[:, -1]

    def loss_after_zeroing(idx):
        def zero(f_hat, hook):
            f_hat[:, -1, idx] = 0.0
            return f_hat

        with torch.no_grad(), splice(model, InteractionBasis({hook: layer}, {})):
            edited = model.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.hook_ib", zero)])[:, -1]
        return float(((edited - plain) ** 2).sum(-1).mean())

    k = 10
    small, large = loss_after_zeroing(list(range(layer.k - k, layer.k))), loss_after_zeroing(list(range(k)))
    assert small < 0.01 * large, (small, large)
    # and Λ predicts it: zeroing direction i costs ≈ Λ_i in the MSE behavioral loss
    predicted = float(layer.eigenvalues[:k].sum())
    assert 0.5 < large / predicted < 2.0, (large, predicted)
