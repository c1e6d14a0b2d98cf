"""Shared fixtures. Model tests run under whichever TransformerLens generation is installed;
CI runs the suite once per generation (TL 4.x main env, TL 3.9.0 second env)."""
from __future__ import annotations

import sys
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
    """A 2-layer float64 random transformer (LN, GELU), same weights in both generations."""
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    return torch.randint(0, 23, (10, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def modadd_dir() -> Path:
    """RIB's grokked modular-addition checkpoint, shipped inside the package."""
    assert (MODADD_DIR / "model_epoch_60000.pt").exists(), MODADD_DIR
    return MODADD_DIR
