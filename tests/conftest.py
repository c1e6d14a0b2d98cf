"""Shared fixtures. Model tests run under whichever TransformerLens generation is installed;
CI runs the suite once per generation (TL 4.x main env, TL 3.9.0 second env)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tl_degeneracy.generations import installed_generation  # noqa: E402
from tl_degeneracy.toy_models import default_modadd_dir, tiny_model  # noqa: E402

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
    folder = default_modadd_dir()
    if not (folder / "model_epoch_60000.pt").exists():
        if os.environ.get("CI"):
            pytest.fail(f"the shared modadd fixture is missing at {folder}")
        pytest.skip(f"modadd fixture not found at {folder}")
    return folder
