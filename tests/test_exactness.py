"""Batching, merging, kill-and-resume and multi-process runs give the same sums (1e-12)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models

WORKER = Path(__file__).parent / "scripts" / "collect_worker.py"
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
TOKENS = torch.randint(0, 23, (64, 12), generator=torch.Generator().manual_seed(1))


def assert_same_sums(a: tld.Stats, b: tld.Stats, rtol=1e-12):
    assert set(a.accumulators) == set(b.accumulators)
    assert a.n_tokens == b.n_tokens
    for key, acc in a.accumulators.items():
        other = b.accumulators[key]
        assert int(acc.tensors["n"]) == int(other.tensors["n"]), key
        for field in ("S_triu", "s"):
            x, y = acc.tensors[field].cpu(), other.tensors[field].cpu()  # a resumed run sums on the CPU
            assert float((x - y).norm() / y.norm()) <= rtol, (key, field)


@pytest.fixture(scope="module")
def reference():
    return tld.collect(tiny_model(seed=0), TOKENS, HOOKS, batch_size=4, progress=False)


@pytest.fixture
def reference_on(device, request, per_device):
    """``reference`` computed on ``device`` (built once per session there)."""
    if device == "cpu":
        return request.getfixturevalue("reference")
    return per_device("exactness-reference", device, lambda: tld.collect(
        tiny_model(seed=0, device=device), TOKENS, HOOKS, batch_size=4, progress=False))


def test_batch_sizes_and_merge_agree(reference_on, device):
    reference = reference_on
    model = tiny_model(seed=0, device=device)
    one_batch = tld.collect(model, TOKENS, HOOKS, batch_size=64, progress=False)
    three = tld.collect(model, [TOKENS[:20], TOKENS[20:41], TOKENS[41:]], HOOKS, progress=False)
    first = tld.collect(model, TOKENS[:32], HOOKS, progress=False)
    second = tld.collect(model, TOKENS[32:], HOOKS, progress=False)
    first_n = first.n_tokens
    added = first + second  # a new Stats; the operands are unchanged
    assert first.n_tokens == first_n and first.progress is not None
    assert added.progress is None  # two data streams have no single resume point
    in_place = tld.collect(model, TOKENS[:32], HOOKS, progress=False)
    assert in_place.merge(second) is None  # merge works in place, like dict.update
    assert in_place.progress is None and in_place.n_batches == first.n_batches + second.n_batches
    augmented = tld.collect(model, TOKENS[:32], HOOKS, progress=False)
    alias = augmented
    augmented += second
    assert augmented is alias
    for stats in (one_batch, three, added, in_place, augmented):
        assert_same_sums(stats, reference)


def test_merge_refuses_different_runs(reference):
    other = tld.collect(tiny_model(seed=0), TOKENS, HOOKS[:1], progress=False)
    with pytest.raises(ValueError, match="differ"):
        reference.merge(other)
    with pytest.raises(ValueError, match="differ"):
        reference + other


def test_max_tokens_stops_and_trims(reference):
    stats = tld.collect(tiny_model(seed=0), TOKENS, HOOKS, batch_size=4, max_tokens=100, progress=False)
    assert stats.n_tokens == 108  # 9 whole sequences of 12: the last batch trimmed to 1 row


def _run_worker(*args, env=None):
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, reference):
    ckpt = tmp_path / "run.ckpt.safetensors"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "never.safetensors"),
                             "--slow", "0.3", "--checkpoint", str(ckpt)])
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if ckpt.exists() and tld.Stats.load(ckpt).progress.batches_seen >= 4:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = tld.Stats.load(ckpt)
    done = partial.progress.batches_seen
    assert 4 <= done < 16, "the worker should have been killed mid-way"
    assert not (tmp_path / "never.safetensors").exists()
    resumed = tld.collect(tiny_model(seed=0), (TOKENS[i:i + 4] for i in range(0, 64, 4)), HOOKS,
                          checkpoint=ckpt, resume=True, progress=False)
    assert resumed.progress.batches_seen == 16
    assert_same_sums(resumed, reference)


def test_resume_with_jacobians_is_exact(tmp_path, device):
    # Probes are seeded per batch index, so a resumed run draws the same probes.
    model = tiny_model(seed=0, device=device)
    jac = tld.JacobianConfig(n_probes=2)
    full = tld.collect(model, TOKENS, HOOKS, batch_size=4, jacobians=jac, progress=False)
    ckpt = tmp_path / "j.safetensors"
    tld.collect(model, TOKENS[:24], HOOKS, batch_size=4, jacobians=jac, progress=False, checkpoint=ckpt)
    resumed = tld.collect(model, TOKENS, HOOKS, batch_size=4, jacobians=jac, progress=False,
                          checkpoint=ckpt, resume=True)
    assert_same_sums(resumed, full)


def test_torchrun_two_processes_equal_one(tmp_path, reference):
    out = tmp_path / "dist.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    stats = tld.Stats.load(out)
    assert stats.n_batches == 16
    assert_same_sums(stats, reference)
    assert stats.progress is not None
    assert stats.progress.world_size == 2 and stats.progress.batches_seen == 16
