"""Streamed Grams equal dense ones from run_with_cache (docs/theory.md §2), on the installed TL generation."""
import pytest
import torch
from dense_reference import dense_activations, rel_err

import tl_degeneracy as tld
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models

HOOKS = [
    "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.1.hook_resid_mid",
    "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
]


def test_gram_and_covariance_equal_dense(tiny_on, tiny_tokens, device):
    tiny = tiny_on
    stats = tld.collect(tiny, tiny_tokens, HOOKS, batch_size=3, progress=False)
    assert stats.hooks == HOOKS  # keyed by the names asked for, in order
    assert stats.n_tokens == tiny_tokens.numel()
    for hook in HOOKS:
        f = dense_activations(tiny, tiny_tokens.to(device), hook)
        assert stats.n_datapoints(hook) == f.shape[0]
        assert rel_err(stats.gram(hook), f.T @ f / f.shape[0]) < 1e-10, hook
        assert rel_err(stats.covariance(hook), torch.cov(f.T, correction=0)) < 1e-10, hook
        assert rel_err(stats.mean(hook), f.mean(0)) < 1e-10, hook


def test_globs_and_callables_select_hooks(tiny, tiny_tokens):
    by_glob = tld.collect(tiny, tiny_tokens, "blocks.*.mlp.hook_post", progress=False)
    assert by_glob.hooks == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    by_fn = tld.collect(tiny, tiny_tokens, lambda n: n.endswith("hook_resid_pre") and n.startswith("blocks."),
                        progress=False)
    assert set(by_fn.hooks) == {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"}
    default = tld.collect(tiny, tiny_tokens, progress=False)
    assert default.hooks == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def test_position_selection_and_padding(tiny_on, tiny_tokens, device):
    tiny = tiny_on
    hook = "blocks.1.hook_resid_pre"
    last = tld.collect(tiny, tiny_tokens, hook, positions=[-1], progress=False)
    f_all = dense_activations(tiny, tiny_tokens.to(device), hook).reshape(10, 12, -1)
    f_last = f_all[:, -1]
    assert last.n_datapoints(hook) == 10
    assert rel_err(last.gram(hook), f_last.T @ f_last / 10) < 1e-10

    # Left padding: a [batch, pos] attention mask excludes pads from every sum.
    attention_mask = torch.ones(10, 12, dtype=torch.bool)
    attention_mask[:5, :4] = False
    batches = [{"tokens": tiny_tokens[i:i + 5], "attention_mask": attention_mask[i:i + 5]} for i in (0, 5)]
    padded = tld.collect(tiny, batches, hook, progress=False)
    on_device = attention_mask.to(device)
    _, cache = tiny.run_with_cache(tiny_tokens.to(device), attention_mask=on_device.long())
    f = cache[hook].double()[on_device]
    assert padded.n_datapoints(hook) == padded.n_tokens == int(attention_mask.sum())
    assert rel_err(padded.gram(hook), f.T @ f / f.shape[0]) < 1e-10

    mask = torch.zeros(12, dtype=torch.bool)
    mask[[0, 5]] = True
    masked = tld.collect(tiny, tiny_tokens, hook, positions=mask, progress=False)
    f_mask = f_all[:, mask.to(device)].reshape(-1, f_all.shape[-1])
    assert rel_err(masked.gram(hook), f_mask.T @ f_mask / 20) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_accumulates_float64(dtype, tiny_tokens, device):
    model = tiny_model(seed=0, dtype=dtype, device=device)
    hook = "blocks.1.hook_resid_pre"
    stats = tld.collect(model, tiny_tokens, hook, progress=False)
    assert stats.gram(hook).dtype == torch.float64
    f = dense_activations(model, tiny_tokens.to(device), hook)  # the model's own low-precision values
    assert rel_err(stats.gram(hook), f.T @ f / f.shape[0]) < 1e-12


def test_modadd_fixture_grams(modadd_dir, device):
    from tl_degeneracy.testing import modadd_dataset, modadd_model

    model = modadd_model(modadd_dir, dtype=torch.float64, device=device)
    tokens = modadd_dataset("train")[:500]
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z"]
    stats = tld.collect(model, tokens, hooks, batch_size=128, positions=[-1], progress=False)
    for hook in hooks:
        f = dense_activations(model, tokens.to(device), hook).reshape(500, 3, -1)[:, -1]
        assert rel_err(stats.gram(hook), f.T @ f / 500) < 1e-10


def test_padding_does_not_leak_into_jacobian_grams(tiny_on, tiny_tokens):
    """Jacobian Grams of a right-padded batch equal those of the same sequences unpadded (exact mode).

    Padding rows after the real tokens attend to them: probes on those rows would leak in."""
    hook = "blocks.0.hook_resid_pre"
    short = tiny_tokens[:4, :8]
    padded = torch.cat([short, torch.zeros(4, 4, dtype=torch.long)], dim=1)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, :8] = True
    tiny = tiny_on
    ref = tld.collect(tiny, short, hook, jacobians=tld.JacobianConfig(exact=True), progress=False)
    got = tld.collect(tiny, [{"tokens": padded, "attention_mask": mask}], hook,
                      jacobians=tld.JacobianConfig(exact=True), progress=False)
    assert got.n_datapoints(hook) == ref.n_datapoints(hook) == 32
    a, b = got.jacobian_gram(hook), ref.jacobian_gram(hook)
    assert float((a - b).norm() / b.norm()) < 1e-8
