"""Probes in the residual basis (readout.py), per-hook positions, batches cut to batch_size."""
from __future__ import annotations

import math

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.collection.config import ProbeSpace
from tl_degeneracy.collection.readout import find_readout, readout_factor
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]


def _tokens(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 23, (n, 12), generator=torch.Generator().manual_seed(seed))


def _tied(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.W_U.copy_(model.W_E.T)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_factor_squares_to_the_unembedding_gram(device):
    W = torch.randn(16, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    L = readout_factor(W)
    assert L.shape == (16, 16)
    torch.testing.assert_close(L @ L.T, W @ W.T, rtol=0, atol=1e-12)
    low_rank = W[:, :5]  # rank 5 in 16 dimensions: only 5 columns are kept
    assert readout_factor(low_rank).shape == (16, 5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("output_positions", [None, [-1]], ids=["all", "last"])
def test_exact_residual_probes_equal_exact_vocabulary_probes(tied, output_positions, device):
    model = tiny_model(seed=1, device=device)
    if tied:
        _tied(model)
    tokens = _tokens()
    stats = {}
    for space in ("vocabulary", "residual"):
        jac = tld.JacobianConfig(exact=True, output_positions=output_positions, probe_space=space)
        stats[space] = tld.collect(model, tokens, HOOKS, jacobians=jac, batch_size=3, progress=False)
        assert stats[space].run.jacobians["probe_space"] == space
    for hook in HOOKS:
        assert _rel(stats["residual"].jacobian_gram(hook), stats["vocabulary"].jacobian_gram(hook)) < 1e-10


def test_auto_chooses_the_residual_basis_for_mse_logits_and_vocabulary_otherwise():
    model = tiny_model(seed=1)
    tokens = _tokens(4)
    assert tld.collect(model, tokens, HOOKS[:1], jacobians=True, progress=False).run.jacobians["probe_space"] \
        == "residual"
    kl = tld.collect(model, tokens, HOOKS[:1], jacobians=tld.JacobianConfig(loss="kl"), progress=False)
    assert kl.run.jacobians["probe_space"] == "vocabulary"
    local = tld.collect(model, tokens, HOOKS[:1], jacobians=tld.JacobianConfig(output="blocks.1.hook_resid_post"),
                        progress=False)
    assert local.run.jacobians["probe_space"] == "vocabulary"
    with pytest.raises(ValueError, match="probe_space='residual' needs"):
        tld.JacobianConfig(loss="kl", probe_space="residual")


def test_a_non_linear_head_falls_back_to_vocabulary_probes():
    """A model whose logits are not r W_U + b_U (here: W_U changed after the check's premise)."""
    model = tiny_model(seed=1)
    assert find_readout(model) is not None

    def softcap(z: torch.Tensor, hook) -> torch.Tensor:
        return 3.0 * torch.tanh(z / 3.0)

    model.hook_dict["unembed.hook_out"].add_hook(softcap)
    try:
        with pytest.warns(UserWarning, match="not a linear read-out"):
            assert find_readout(model) is None
        with pytest.raises(ValueError, match="not a linear read-out"), pytest.warns(UserWarning):
            tld.RunConfig.build(model, HOOKS[:1], jacobians=tld.JacobianConfig(probe_space="residual"))
    finally:
        model.reset_hooks()


def test_random_residual_probes_are_unbiased_and_error_falls_like_one_over_root_samples(device):
    """Relative error of M against exact at S probes × n sequences: error·sqrt(S·n) stays
    within a factor 2.5 over a 16× range of S·n, and falls overall."""
    model = tiny_model(seed=2, device=device)
    tokens = _tokens(64, seed=3)
    hook = HOOKS[0]
    exact = tld.collect(model, tokens, hook, jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]),
                        batch_size=16, progress=False).jacobian_gram(hook)
    rows = []
    for n_seq, probes in [(16, 1), (16, 4), (64, 4), (64, 16)]:
        errors = []
        for seed in range(6):  # average the squared error over seeds: a stable estimate of its scale
            jac = tld.JacobianConfig(n_probes=probes, seed=seed, output_positions=[-1], probe_space="residual")
            est = tld.collect(model, tokens[:n_seq], hook, jacobians=jac, batch_size=16, progress=False)
            ref = exact if n_seq == 64 else tld.collect(
                model, tokens[:n_seq], hook, jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]),
                batch_size=16, progress=False).jacobian_gram(hook)
            errors.append(_rel(est.jacobian_gram(hook), ref) ** 2)
        rows.append((n_seq, probes, math.sqrt(sum(errors) / len(errors))))
    scaled = [err * math.sqrt(n * s) for n, s, err in rows]
    assert rows[-1][2] < rows[0][2] / 2.5, rows
    assert max(scaled) / min(scaled) < 2.5, rows


def test_positions_per_hook_in_one_pass_equal_separate_runs(device):
    model = tiny_model(seed=1, device=device)
    tokens = _tokens()
    jac = tld.JacobianConfig(n_probes=2, seed=5)
    positions = {"blocks.1.hook_resid_mid": [-1], "blocks.1.hook_resid_post": [0, -1]}
    both = tld.collect(model, tokens, HOOKS, positions=positions, jacobians=jac, batch_size=4, progress=False)
    for hook in HOOKS:
        alone = tld.collect(model, tokens, hook, positions=positions.get(hook), jacobians=jac, batch_size=4,
                            progress=False)
        assert both.n_datapoints(hook) == alone.n_datapoints(hook)
        torch.testing.assert_close(both.gram(hook), alone.gram(hook), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(both.jacobian_gram(hook), alone.jacobian_gram(hook), rtol=1e-10, atol=1e-12)
    assert both.n_datapoints("blocks.1.hook_resid_mid") == tokens.shape[0]
    with pytest.raises(ValueError, match="not collected"):
        tld.collect(model, tokens, HOOKS[:1], positions={"blocks.1.hook_resid_mid": [-1]}, progress=False)
    assert both.run.config["positions"]["blocks.1.hook_resid_mid"] == [-1]


def test_an_oversized_batch_in_an_iterable_is_cut_to_batch_size(device):
    model = tiny_model(seed=1, device=device)
    tokens = _tokens(10)
    one_big = tld.collect(model, [tokens], HOOKS[:1], batch_size=3, progress=False)
    assert one_big.n_batches == 4  # 3 + 3 + 3 + 1 rows
    split = tld.collect(model, tokens, HOOKS[:1], batch_size=3, progress=False)
    torch.testing.assert_close(one_big.gram(HOOKS[0]), split.gram(HOOKS[0]), rtol=1e-13, atol=0)


def test_automatic_probe_chunk_gives_the_same_m_as_a_fixed_one(device):
    model = tiny_model(seed=1, device=device)
    tokens = _tokens(6)
    auto = tld.collect(model, tokens, HOOKS, jacobians=tld.JacobianConfig(exact=True), progress=False)
    fixed = tld.collect(model, tokens, HOOKS, jacobians=tld.JacobianConfig(exact=True, probe_chunk=3),
                        progress=False)
    tiny_budget = tld.collect(model, tokens, HOOKS, progress=False,
                              jacobians=tld.JacobianConfig(exact=True, chunk_budget_bytes=1))
    for hook in HOOKS:
        torch.testing.assert_close(auto.jacobian_gram(hook), fixed.jacobian_gram(hook), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(auto.jacobian_gram(hook), tiny_budget.jacobian_gram(hook), rtol=1e-12, atol=1e-14)
    assert ProbeSpace(auto.run.jacobians["probe_space"]) is ProbeSpace.RESIDUAL


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False here")
def test_cuda_float64_accumulators_for_a_half_precision_model():
    model = tiny_model(seed=1, dtype=torch.bfloat16, device="cuda")
    stats = tld.collect(model, _tokens(), HOOKS, jacobians=True, progress=False)
    assert stats.accumulators[("activations", HOOKS[0])].tensors["S_triu"].dtype == torch.float64
    ref = tld.collect(tiny_model(seed=1, dtype=torch.float64, device="cpu"), _tokens(), HOOKS, progress=False)
    assert _rel(stats.gram(HOOKS[0]).cpu(), ref.gram(HOOKS[0])) < 3e-2


def test_readout_factor_is_cached_until_a_weight_changes():
    """W_U W_Uᵀ is formed once per model (59 GFLOP for GPT-2), and again after any in-place change."""
    model = tiny_model(seed=3)
    first = find_readout(model)
    assert first is not None and find_readout(model).factor is first.factor
    W = model.W_U
    param = next(p for p in model.parameters() if p.data_ptr() == W.data_ptr())
    with torch.no_grad():
        param.mul_(2.0)
    again = find_readout(model)
    assert again is not first
    torch.testing.assert_close(again.factor @ again.factor.T, 4 * (first.factor @ first.factor.T), rtol=1e-10,
                               atol=1e-10)
