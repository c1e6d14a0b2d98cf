"""Shared fixtures. Model tests run under whichever TransformerLens generation is installed;
CI runs the suite once per generation (TL 4.x main env, TL 3.9.0 second env)."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tl_degeneracy.generations import installed_generation  # noqa: E402
from tl_degeneracy.testing import MODADD_DIR, tiny_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def generation() -> int:
    return installed_generation()


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer float64 random transformer (LN, GELU), same weights in both generations, on the CPU
    (named: TL 3.x would otherwise put it on a GPU when there is one)."""
    return tiny_model(seed=0, device="cpu")


CUDA_REASON = "needs CUDA: torch.cuda.is_available() is False here"
_ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)]


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_ON_CUDA)])
def device(request) -> str:
    """Where a numerics test runs: always on the CPU, and on CUDA too when a GPU is present
    (the cuda param is skipped, with the reason, otherwise). Select the GPU runs with ``-m cuda``."""
    return request.param


@pytest.fixture(scope="session")
def per_device() -> Callable[..., object]:
    """A session-wide cache: ``per_device(key, device, build)`` builds once per (key, device)."""
    cache: dict[tuple[object, str], object] = {}

    def get(key: object, device: str, build: Callable[[], object]) -> object:
        if (key, device) not in cache:
            cache[key, device] = build()
        return cache[key, device]

    return get


@pytest.fixture
def tiny_on(device, request, per_device):
    """``tiny`` on ``device``: the session's ``tiny`` itself on the CPU, built once per session on CUDA."""
    if device == "cpu":
        return request.getfixturevalue("tiny")
    return per_device("tiny", device, lambda: tiny_model(seed=0, device=device))


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    return torch.randint(0, 23, (10, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def modadd_dir() -> Path:
    """RIB's grokked modular-addition checkpoint, shipped inside the package."""
    assert (MODADD_DIR / "model_epoch_60000.pt").exists(), MODADD_DIR
    return MODADD_DIR


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny ops lose to thread synchronisation on a shared 2-core machine
    (7x measured in the sampler tests); the previous count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
