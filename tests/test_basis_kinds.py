"""Bases as registered kinds: a new kind is a few lines, splices like the built-in ones, saves and loads.

The toy kind below is a *nonlinear* basis — each coordinate of a random orthogonal rotation, cubed —
so splice, save/load and the spliced hook points are exercised through ``encode``/``decode`` alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.basis import BASIS_KINDS, InteractionBasis, LinearBasis, register_basis_kind, require_linear
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models
HOOK = "blocks.1.hook_resid_pre"


@register_basis_kind
@dataclass
class CubedRotation:
    """f̂ = (Q f)³ coordinate-wise; decode takes the real cube root and rotates back."""

    kind: ClassVar[str] = "cubed_rotation"
    hook: str
    Q: torch.Tensor

    k = property(lambda self: self.Q.shape[0])
    d = property(lambda self: self.Q.shape[1])
    importance = property(lambda self: torch.ones(self.k, dtype=torch.float64))

    def encode(self, f):
        return (f @ self.Q.to(f).T) ** 3

    def decode(self, f_hat):
        return (f_hat.sign() * f_hat.abs() ** (1 / 3)) @ self.Q.to(f_hat)

    def fingerprint(self) -> str:
        return f"cubed:{float(self.Q.sum()):.6e}"

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"Q": self.Q}, {"kind": self.kind}

    @classmethod
    def from_state(cls, hook, tensors, meta):
        return cls(hook, tensors["Q"])


def _toy(d: int = 16) -> CubedRotation:
    Q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    return CubedRotation(HOOK, Q)


def test_a_toy_kind_is_a_basis_and_registered():
    basis = _toy()
    assert isinstance(basis, tld.Basis)
    assert BASIS_KINDS["cubed_rotation"] is CubedRotation
    with pytest.raises(ValueError, match="affine basis"):
        require_linear(basis, "the interaction graph's edges")


def test_a_toy_kind_splices_and_its_hook_points_work(tiny_tokens):
    model = tiny_model(seed=0)
    clean = model(tiny_tokens)
    basis = _toy()
    with tld.splice(model, basis):
        logits, cache = model.run_with_cache(tiny_tokens)
        torch.testing.assert_close(logits, clean, rtol=1e-10, atol=1e-10)  # the error term keeps f exactly
        coords = cache[f"{HOOK}.hook_ib"]
        assert coords.shape == (*tiny_tokens.shape, 16)
    with tld.splice(model, basis, error_term=False):  # pure reconstruction: invertible, so f comes back
        torch.testing.assert_close(model(tiny_tokens), clean, rtol=1e-8, atol=1e-8)

    def zero_first(act, hook):
        act = act.clone()
        act[..., 0] = 0.0
        return act

    with tld.splice(model, basis):  # an edit of one coordinate changes the output
        edited = model.run_with_hooks(tiny_tokens, fwd_hooks=[(f"{HOOK}.hook_ib", zero_first)])
    assert not torch.allclose(edited, clean)


def test_any_kind_round_trips_through_a_basis_file(tmp_path, tiny_tokens):
    model = tiny_model(seed=0)
    stats = tld.collect(model, tiny_tokens, [HOOK, "blocks.0.hook_resid_pre"], jacobians=True, progress=False)
    fitted = InteractionBasis.fit(stats)
    mixed = InteractionBasis({HOOK: _toy(), "blocks.0.hook_resid_pre": fitted["blocks.0.hook_resid_pre"]},
                             fitted.meta)
    mixed.save(tmp_path / "basis.safetensors")
    back = InteractionBasis.load(tmp_path / "basis.safetensors")
    assert isinstance(back[HOOK], CubedRotation) and isinstance(back["blocks.0.hook_resid_pre"], LinearBasis)
    assert back["blocks.0.hook_resid_pre"].kind == "interaction"
    torch.testing.assert_close(back[HOOK].Q, _toy().Q)
    f = torch.randn(5, 16, dtype=torch.float64)
    for hook in mixed.hooks:
        torch.testing.assert_close(back[hook].decode(back[hook].encode(f)), mixed[hook].decode(mixed[hook].encode(f)))


def test_built_in_kinds_and_importance_order(tiny_tokens):
    model = tiny_model(seed=0)
    stats = tld.collect(model, tiny_tokens, [HOOK], jacobians=True, progress=False)
    kinds = {k: InteractionBasis.fit_kind(k, stats)[HOOK] for k in ("interaction", "pca", "standard")}
    assert [b.kind for b in kinds.values()] == ["interaction", "pca", "standard"]
    for kind, basis in kinds.items():
        assert isinstance(basis, tld.Basis) and require_linear(basis, kind) is basis
        if kind != "standard":  # fitted kinds come in descending importance
            assert torch.all(basis.importance[:-1] >= basis.importance[1:])
    torch.testing.assert_close(kinds["standard"].importance, stats.covariance(HOOK).diagonal())
