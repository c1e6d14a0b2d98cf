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
    assert acc.tensors["S_triu"].dtype == torch.float64 and acc.tensors["S_triu"].shape == (6 * 7 // 2,)
    assert acc.tensors["S_triu"].device == f.device and acc.tensors["n"].device == f.device
    assert torch.equal(acc.S, acc.S.T)  # unpacked symmetric, both triangles from the one stored


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float64(dtype, device):
    f = _data(dtype=dtype, device=device)
    acc = GramAccumulator.from_batch(f)
    assert acc.tensors["S_triu"].dtype == torch.float64
    exact = f.double().T @ f.double()  # the low-precision values, squared exactly in float64
    assert torch.allclose(acc.S, exact, rtol=1e-14, atol=0)


def test_merge_is_exact_sum(device):
    f = _data(n=90, device=device)
    whole = GramAccumulator.from_batch(f)
    first, second = GramAccumulator.from_batch(f[:30]), GramAccumulator.from_batch(f[30:])
    first_before = first.copy()
    parts = first + second  # a new accumulator; neither operand changes
    assert first == first_before
    assert parts.n == whole.n == 90
    assert torch.allclose(parts.S, whole.S, rtol=1e-13, atol=0)
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


def test_packed_triangle_round_trip_and_in_place_add():
    from tl_degeneracy.triangular import add_packed_, pack, packed_dim, unpack

    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    S = a.T @ a
    packed = pack(S)
    assert packed.shape == (15,) and packed_dim(15) == 5
    assert torch.equal(unpack(packed), S)  # both triangles from the one kept, exactly
    i, j = torch.triu_indices(5, 5)
    assert torch.equal(packed, S[i, j])  # row by row, i ≤ j
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    add_packed_(packed, b.T @ b, alpha=0.5)
    assert torch.allclose(unpack(packed), S + 0.5 * b.T @ b, rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="upper triangle"):
        packed_dim(14)


def test_format_2_statistics_with_square_sums_still_load(tmp_path):
    """Files written before the sums were packed (format 2: ``.../S`` square) load into the packed form."""
    import json

    from safetensors.torch import save_file

    from tl_degeneracy.collection.stats import Stats

    f = _data(n=40, d=6)
    acc = GramAccumulator.from_batch(f)
    path = tmp_path / "v2.safetensors"
    key = "activations/blocks.0.hook_resid_pre"
    meta = {"format_version": 2, "run": None, "n_tokens": 40, "n_batches": 1, "progress": None,
            "accumulators": {key: "gram"}}
    save_file({f"{key}/S": acc.S, f"{key}/s": acc.tensors["s"], f"{key}/n": acc.tensors["n"]}, str(path),
              metadata={"tl_degeneracy": json.dumps(meta)})
    loaded = Stats.load(path)
    assert loaded.accumulators[("activations", "blocks.0.hook_resid_pre")] == acc
    Stats({("activations", "blocks.0.hook_resid_pre"): acc}).save(tmp_path / "v3.safetensors")
    assert Stats.load(tmp_path / "v3.safetensors").accumulators[("activations", "blocks.0.hook_resid_pre")] == acc


def test_saved_accumulator_kinds_load_in_a_fresh_process(tmp_path):
    """An analysis' stats.safetensors holds accumulators defined above the collection layer (the massive-
    activation moments): ``Stats.load`` imports the module that registers a kind, so loading needs nothing
    imported first; a kind nobody registers is one clear error."""
    import subprocess
    import sys

    from tl_degeneracy.analysis.outliers import PositionMoments

    stats = Stats({("activations", "h"): GramAccumulator.from_batch(torch.randn(5, 3, dtype=torch.float64)),
                   ("extreme_activations", "h#moments"): PositionMoments({"sq": torch.ones(5, 3, dtype=torch.float64),
                                                                         "n": torch.ones(5, dtype=torch.float64)})},
                  n_tokens=5, n_batches=1)
    stats.save(tmp_path / "stats.safetensors")
    code = ("from tl_degeneracy.collection.stats import Stats; import sys; "
            f"s = Stats.load({str(tmp_path / 'stats.safetensors')!r}); "
            "print(sorted(g for g, _ in s.accumulators))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "extreme_activations" in out.stdout
    from tl_degeneracy.collection.stats import accumulator_kind

    with pytest.raises(ValueError, match="no imported module registers"):
        accumulator_kind("no_such_kind")
