"""The GPU path: no host–device synchronisation per hook, half-precision models with float64 sums.

Skipped without CUDA (the reason is printed with ``-rs``); on a GPU machine run
``pytest -k cuda`` to run these and every ``[cuda]`` variant of the numerical tests.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: torch.cuda.is_available() is False here")


def _count_syncs(fn, *args) -> int:
    """Host–device synchronisations PyTorch reports while ``fn(*args)`` runs (its sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("jacobians", [False, True], ids=["activations", "jacobians"])
def test_cuda_syncs_per_batch_do_not_grow_with_hooks(jacobians):
    """One sync per batch (the finiteness check), whatever the number of hooks and selections."""
    model = tiny_model(seed=0, dtype=torch.float32, device="cuda")
    tokens = torch.randint(0, 23, (12, 8), generator=torch.Generator().manual_seed(0))
    few = ["blocks.0.hook_resid_pre"]
    many = tld.residual_hooks(model) + [tld.act_name("post", 0), tld.act_name("post", 1)]
    jac = tld.JacobianConfig(n_probes=2) if jacobians else False

    def run(hooks, n_batches):
        positions = {hooks[-1]: [-1]} if len(hooks) > 1 else None
        tld.collect(model, tokens[: 4 * n_batches], hooks, jacobians=jac, positions=positions, batch_size=4,
                    observers=[tld.HeadSync(), tld.NeuronSync()], progress=False)

    run(many, 1)  # warm-up: first-call work (the run's identity, the read-out check) is per call anyway
    per_batch = {}
    for name, hooks in (("few", few), ("many", many)):
        one, three = _count_syncs(run, hooks, 1), _count_syncs(run, hooks, 3)
        per_batch[name] = (three - one) / 2
    assert per_batch["many"] == per_batch["few"], per_batch
    assert per_batch["many"] <= 1, per_batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_half_model_sums_in_float64_and_matches_cpu(dtype):
    """A half-precision model on the GPU: float64 accumulators, G within the dtype's rounding of CPU float64."""
    tokens = torch.randint(0, 23, (8, 12), generator=torch.Generator().manual_seed(1))
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    gpu = tld.collect(tiny_model(seed=1, dtype=dtype, device="cuda"), tokens, hooks, batch_size=4, progress=False)
    ref = tld.collect(tiny_model(seed=1, dtype=torch.float64), tokens, hooks, batch_size=4, progress=False)
    for hook in hooks:
        g, r = gpu.gram(hook), ref.gram(hook)
        assert g.dtype == torch.float64 and g.device.type == "cuda"
        rel = float((g.cpu() - r).norm() / r.norm())
        assert rel < (2e-2 if dtype is torch.bfloat16 else 3e-3), (hook, rel)
