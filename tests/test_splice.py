"""Splicing a basis into a live model: output unchanged, new hook points usable, exact restore."""
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.basis import InteractionBasis
from tl_degeneracy.basis.splice import SpliceHandle, splice, splice_into, unsplice
from tl_degeneracy.testing import modadd_dataset, modadd_model, tiny_model

pytestmark = pytest.mark.models

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
TOKENS = torch.randint(0, 23, (32, 12), generator=torch.Generator().manual_seed(0))
def _missing_points(model, handles):
    return [name for handle in handles for name in handle.names if name not in model.hook_dict]


@pytest.fixture(scope="module")
def model32():
    return tiny_model(seed=0, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def basis(model32):
    stats = tld.collect(model32, TOKENS, HOOKS, jacobians=tld.JacobianConfig(n_probes=4), progress=False)
    return InteractionBasis.fit(stats)


@pytest.fixture
def model32_on(device, request, per_device):
    """``model32`` on ``device`` (built once per session there)."""
    if device == "cpu":
        return request.getfixturevalue("model32")
    return per_device("splice-model32", device, lambda: tiny_model(seed=0, dtype=torch.float32, device=device))


@pytest.fixture
def basis_on(device, request, per_device, model32_on):
    """``basis`` fitted on ``device`` (once per session there)."""
    if device == "cpu":
        return request.getfixturevalue("basis")
    return per_device("splice-basis", device, lambda: InteractionBasis.fit(tld.collect(
        model32_on, TOKENS, HOOKS, jacobians=tld.JacobianConfig(n_probes=4), progress=False)))


def test_spliced_logits_equal_plain(model32_on, basis_on, device):
    model32 = model32_on
    basis = basis_on
    tokens = TOKENS.to(device)
    plain = model32(tokens)
    hooks_before = set(model32.hook_dict)
    with splice(model32, basis) as handles:
        spliced = model32(tokens)
        assert isinstance(handles, list) and all(isinstance(h, SpliceHandle) for h in handles)
        names = [f"{h}.{p}" for h in HOOKS for p in ("hook_ib", "hook_ib_error")]
        assert [n for h in handles for n in h.names] == names
        assert all(any(m is h.module for m in model32.modules()) for h in handles)
        missing = _missing_points(model32, handles)
    assert float((spliced - plain).detach().abs().max()) < 1e-5
    assert set(model32.hook_dict) == hooks_before  # restored exactly
    assert torch.equal(model32(tokens), plain)
    assert not any("ib_splice" in name for name, _ in model32.named_modules())
    assert not hasattr(model32, "_tl_degeneracy_splices")  # nothing but modules is stored on the model
    assert not missing  # every point under the name the user asked for (on a bridge, resid_mid too)


def test_hook_ib_in_cache_and_hooks_forward_and_backward(model32_on, basis_on, device):
    model32 = model32_on
    basis = basis_on
    tokens = TOKENS.to(device)
    hook = "blocks.1.hook_resid_mid"
    layer = basis[hook]
    with splice(model32, basis):
        _, cache = model32.run_with_cache(tokens, names_filter=lambda n: n.endswith((".hook_ib", "hook_resid_mid")))
        f_hat = cache[f"{hook}.hook_ib"]
        assert f_hat.shape == (32, 12, layer.k)
        expected = layer.transform(cache[hook].double())
        assert torch.allclose(f_hat.double(), expected, atol=1e-4, rtol=1e-4)

        grads = {}
        with model32.hooks(bwd_hooks=[(f"{hook}.hook_ib", lambda g, hook: grads.setdefault("g", g.detach()))]):
            model32(tokens).sum().backward()
        assert grads["g"].shape == (32, 12, layer.k) and float(grads["g"].abs().sum()) > 0
    model32.zero_grad(set_to_none=True)


def test_error_term_and_pure_reconstruction(model32_on, basis_on, device):
    model32 = model32_on
    basis = basis_on
    tokens = TOKENS.to(device)
    hook = "blocks.0.hook_resid_pre"
    layer = basis[hook]
    assert layer.k < layer.d  # LayerNorm'd models lose a direction: a truncated basis
    with splice(model32, basis, hooks=[hook]):
        _, cache = model32.run_with_cache(tokens, names_filter=lambda n: n.startswith(hook))
    f = cache[hook].double()
    centered = f - layer.mean
    expected_error = centered - centered @ layer.C.T @ layer.C_pinv.T
    assert torch.allclose(cache[f"{hook}.hook_ib_error"].double(), expected_error, atol=1e-5)
    plain = model32(tokens)
    with splice(model32, basis, hooks=[hook], error_term=False):
        recon = model32(tokens)
    # The truncated basis really drops part of the activation (LayerNorm's all-ones direction) ...
    lost = float(expected_error.norm() / centered.norm())
    assert lost > 0.01, lost
    # ... which pure reconstruction removes: the spliced value is μ + C⁺C(f − μ), not f ...
    with splice(model32, basis, hooks=[hook], error_term=False) as (handle,):
        with torch.no_grad():
            spliced_f = handle.module(cache[hook]).double()
    assert torch.allclose(spliced_f, f - expected_error, atol=1e-5)
    assert float((spliced_f - f).norm() / centered.norm()) == pytest.approx(lost, rel=1e-3)
    # ... and the output does not depend on it (its Λ is 0): the logits are unchanged to float32 rounding,
    assert float((recon - plain).detach().abs().max()) < 1e-4 * float(plain.detach().abs().max())
    # whereas dropping a kept direction (Λ > 0) changes them.
    def drop_top(f_hat, hook):
        f_hat[..., 0] = 0.0
        return f_hat

    with splice(model32, basis, hooks=[hook], error_term=False):
        edited = model32.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.hook_ib", drop_top)])
    assert float((edited - plain).detach().abs().max()) > 1e-2 * float(plain.detach().abs().max())


def test_permanent_splice_and_unsplice(model32_on, basis_on, device):
    model32 = model32_on
    basis = basis_on
    tokens = TOKENS.to(device)
    plain = model32(tokens)
    hooks_before = set(model32.hook_dict)
    handles = splice_into(model32, basis)
    assert [h.hook for h in handles] == HOOKS
    with pytest.raises(ValueError, match="already"):
        splice_into(model32, basis)
    assert float((model32(tokens) - plain).detach().abs().max()) < 1e-5
    handles[0].remove()  # one splice out, the others stay
    handles[0].remove()  # idempotent
    assert "blocks.0.hook_resid_pre.hook_ib" not in model32.hook_dict
    assert "blocks.1.hook_resid_post.hook_ib" in model32.hook_dict
    splice_into(model32, basis, hooks=[HOOKS[0]])  # the removed one can be spliced again
    unsplice(model32)
    assert set(model32.hook_dict) == hooks_before
    assert not any("ib_splice" in name for name, _ in model32.named_modules())
    assert torch.equal(model32(tokens), plain)


def test_resid_mid_edit_is_the_same_on_every_splice(basis_on, device):
    """An edit of resid_mid's coordinates has the same effect each time the basis is spliced in
    (on a TransformerBridge the splice also carries it past ln2.hook_in, onto the skip path)."""
    basis = basis_on
    tokens = TOKENS.to(device)
    # fresh: no earlier splice has touched its hook registry
    model = tiny_model(seed=0, dtype=torch.float32, device=device)
    hook = "blocks.1.hook_resid_mid"

    def drop_top(f_hat, hook):
        f_hat[..., 0] = 0.0
        return f_hat

    plain = model(tokens).detach()
    outs = []
    for _ in range(3):
        with splice(model, basis, hooks=[hook]):
            outs.append(model.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.hook_ib", drop_top)]).detach())
        assert torch.equal(model(tokens).detach(), plain)  # and each time fully undone
    assert float((outs[0] - plain).abs().max()) > 1e-2  # the edit does something
    assert torch.allclose(outs[1], outs[0], atol=1e-5) and torch.allclose(outs[2], outs[0], atol=1e-5)


def test_mismatched_basis_is_refused(basis):
    other = tiny_model(seed=0, d_model=8, d_head=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="d_model"):
        with splice(other, basis):
            pass


def test_ablating_small_lambda_costs_far_less_than_large(modadd_dir, device):
    """Mod-add net: mean-ablate the k smallest- vs largest-Λ interaction directions of resid_post."""
    model = modadd_model(modadd_dir, dtype=torch.float64, device=device)
    tokens = modadd_dataset("train")[:1000]
    hook = "blocks.0.hook_resid_post"
    stats = tld.collect(model, tokens, hook, positions=[-1],
                        jacobians=tld.JacobianConfig(n_probes=8, output_positions=[-1]), batch_size=500,
                        progress=False)
    layer = InteractionBasis.fit(stats)[hook]
    tokens = tokens.to(device)  # collect takes host tokens; the direct forward passes need them on the model's device
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
