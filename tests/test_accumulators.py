import pytest
import torch

from tl_degeneracy import GramAccumulator, RunRecord, Stats


def _data(n=50, d=6, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def test_gram_mean_covariance_match_dense(device):
    f = _data(device=device)
    acc = GramAccumulator.from_batch(f)
    f64 = f.double()
    assert torch.allclose(acc.gram, f64.T @ f64 / 50, rtol=1e-14, atol=0)
    assert torch.allclose(acc.mean, f64.mean(0), rtol=1e-14, atol=1e-16)
    cov = torch.cov(f64.T, correction=0)
    assert torch.allclose(acc.covariance, cov, rtol=1e-12, atol=1e-14)
    assert acc.tensors["S"].dtype == torch.float64
    assert acc.tensors["S"].device == f.device and acc.tensors["n"].device == f.device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float64(dtype, device):
    f = _data(dtype=dtype, device=device)
    acc = GramAccumulator.from_batch(f)
    assert acc.tensors["S"].dtype == torch.float64
    exact = f.double().T @ f.double()  # the low-precision values, squared exactly in float64
    assert torch.allclose(acc.tensors["S"], exact, rtol=1e-14, atol=0)


def test_merge_is_exact_sum(device):
    f = _data(n=90, device=device)
    whole = GramAccumulator.from_batch(f)
    first, second = GramAccumulator.from_batch(f[:30]), GramAccumulator.from_batch(f[30:])
    first_before = first.copy()
    parts = first + second  # a new accumulator; neither operand changes
    assert first == first_before
    assert parts.n == whole.n == 90
    assert torch.allclose(parts.tensors["S"], whole.tensors["S"], rtol=1e-13, atol=0)
    in_place = first.add_(second)  # in place, returns self
    assert in_place is first and first == parts
    with pytest.raises(ValueError, match="shape"):
        whole + GramAccumulator.from_batch(_data(d=3, device=device))
    with pytest.raises(ValueError, match="shape"):
        whole.add_(GramAccumulator.from_batch(_data(d=3, device=device)))


def test_empty_accumulator_refuses_to_divide():
    with pytest.raises(ValueError, match="n = 0"):
        _ = GramAccumulator.zeros(4).gram


def test_stats_save_load_roundtrip(tmp_path, device):
    stats = Stats({("activations", "blocks.0.hook_resid_pre"): GramAccumulator.from_batch(_data(device=device)),
                   ("jacobians", "blocks.0.hook_resid_pre"): GramAccumulator.from_batch(
                       _data(seed=1, device=device))},
                  RunRecord(model={}, config={"hooks": ["blocks.0.hook_resid_pre"]}), n_tokens=50, n_batches=1)
    stats.save(tmp_path / "s.safetensors")
    back = Stats.load(tmp_path / "s.safetensors", device=device)
    assert back.hooks == ["blocks.0.hook_resid_pre"]
    assert back.n_tokens == 50 and back.n_batches == 1
    assert back.run == stats.run and back.progress is None
    for key, acc in stats.accumulators.items():
        assert back.accumulators[key] == acc
    assert torch.equal(back.jacobian_gram("blocks.0.hook_resid_pre"), stats.jacobian_gram("blocks.0.hook_resid_pre"))
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        back.gram("blocks.9.hook_resid_pre")


def test_not_a_stats_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a tl_degeneracy file"):
        Stats.load(tmp_path / "other.safetensors")
