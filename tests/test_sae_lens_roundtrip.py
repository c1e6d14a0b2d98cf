"""sae_lens reads what ``tl-degeneracy export --format sae-lens`` writes, and the SAE it loads is the basis.

An analysis of the embedded model (512 tokens), exported; then with sae_lens 6.x's own classes
(``SAE.load_from_disk``, ``HookedSAETransformer`` holding the model's weights):

- the metadata is the analysis's (model, hook, context, dataset, BOS);
- spliced with the error term, the model's logits are unchanged;
- the latents ``{hook}.hook_sae_acts_post`` are ``relu(f̂)`` and ``relu(−f̂)`` of our basis's ``f̂ = C (f − μ)``;
- without the error term, the reconstruction is ``μ + C⁺ C (f − μ)``, for the whole basis and for its
  top 16 directions (where it is far from ``f`` itself).

Exact checks run in float64 (a float64 export in a float64 copy of the model, to 1e-9 relative);
the default float32 export is checked against float32 rounding bounds. Needs sae_lens, which needs
TransformerLens < 4: it runs in the TL 3.9 environment (``.venv-tl3``) and is skipped elsewhere.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tl_degeneracy.generations import installed_generation

pytestmark = pytest.mark.models
sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (it needs TransformerLens < 4)")
if installed_generation() != 3:
    pytest.skip("HookedSAETransformer is a TL 3 HookedTransformer", allow_module_level=True)

from sae_lens import SAE, HookedSAETransformer  # noqa: E402

from tl_degeneracy.analysis import analyze  # noqa: E402
from tl_degeneracy.basis import InteractionBasis, LinearBasis  # noqa: E402
from tl_degeneracy.basis.sae_lens_export import SAELensSource, export_sae_lens  # noqa: E402
from tl_degeneracy.cli import main  # noqa: E402
from tl_degeneracy.default_model import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    default_text_dataset,
    default_texts,
    load_default_model,
)

HOOKS = ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_post"]
BASIS_FILES = {"interaction": "basis.safetensors", "pca": "pca_basis.safetensors"}
CONTEXT = 64
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture(scope="module")
def run(model, tmp_path_factory) -> Path:
    """An analysis of the embedded model, exported in float32 (the default) and in float64."""
    out = tmp_path_factory.mktemp("sae_lens") / "run"
    analyze(model, default_text_dataset(), out, max_tokens=512, context=CONTEXT, stages=("grams", "jacobians"),
            progress=False, dataset="embedded default text")
    for extra in ([], ["--dtype", "float64", "--out", str(out / "sae64")]):
        assert main(["export", str(out), "--format", "sae-lens", "--basis", "all", "--hooks", *HOOKS, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def tokens(model) -> torch.Tensor:
    """Two 64-token rows of the embedded text, BOS first as in the analysis."""
    texts = default_texts()
    return torch.cat([model.to_tokens(texts[i])[:, :CONTEXT] for i in (2, 7)])


def with_weights(model, dtype: torch.dtype) -> HookedSAETransformer:
    """A HookedSAETransformer holding ``model``'s weights (in ``dtype``)."""
    cfg = copy.deepcopy(model.cfg)
    cfg.dtype = dtype
    hst = HookedSAETransformer(cfg, tokenizer=model.tokenizer)
    hst.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return hst.eval()


def attach(hst: HookedSAETransformer, sae, use_error_term: bool) -> None:
    hst.reset_saes()
    hst.add_sae(sae, use_error_term=use_error_term)
    assert sae.cfg.metadata.hook_name in hst.acts_to_saes  # add_sae only warns when it skips


def basis_of(run: Path, kind: str, hook: str) -> LinearBasis:
    return InteractionBasis.load(run / BASIS_FILES[kind])[hook]


def relu_pair(f_hat: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.relu(f_hat), torch.relu(-f_hat)], dim=-1)


@pytest.mark.parametrize("kind", list(BASIS_FILES))
@pytest.mark.parametrize("hook", HOOKS)
def test_sae_lens_loads_the_export_with_the_analysis_metadata(run, kind, hook):
    sae = SAE.load_from_disk(run / "sae_lens" / kind / hook)
    basis = basis_of(run, kind, hook)
    assert type(sae).__name__ == "StandardSAE" and sae.cfg.d_in == basis.d and sae.cfg.d_sae == 2 * basis.k
    assert sae.W_enc.dtype == torch.float32 and sae.cfg.apply_b_dec_to_input
    meta = sae.cfg.metadata
    assert (meta.model_name, meta.hook_name, meta.context_size, meta.dataset_path, meta.prepend_bos) == (
        DEFAULT_MODEL_NAME, hook, CONTEXT, "embedded default text", True)


@pytest.mark.parametrize("kind", list(BASIS_FILES))
@pytest.mark.parametrize("hook", HOOKS)
def test_float64_sae_is_the_basis(model, run, tokens, kind, hook):
    hst = with_weights(model, torch.float64)
    ref, clean = hst.run_with_cache(tokens)
    assert (ref.float() - model(tokens)).abs().max() <= 1e-4 * ref.abs().max()  # same weights, same function
    x = clean[hook]
    basis = basis_of(run, kind, hook)
    f_hat = basis.encode(x)
    sae = SAE.load_from_disk(run / "sae64" / kind / hook)
    assert sae.W_enc.dtype == torch.float64

    attach(hst, sae, use_error_term=True)
    logits, cache = hst.run_with_cache(tokens)
    assert torch.equal(cache[f"{hook}.hook_sae_input"], x)
    assert (logits - ref).abs().max() <= 1e-10 * ref.abs().max()
    acts = cache[f"{hook}.hook_sae_acts_post"]
    assert (acts - relu_pair(f_hat)).abs().max() <= 1e-9 * f_hat.abs().max()

    attach(hst, sae, use_error_term=False)
    _, cache = hst.run_with_cache(tokens)
    projection = basis.decode(f_hat)  # μ + C⁺ C (x − μ)
    recon = cache[f"{hook}.hook_sae_recons"]
    assert (recon - projection).abs().max() <= 1e-9 * x.abs().max()
    assert torch.equal(cache[f"{hook}.hook_sae_output"], recon)


def test_without_the_error_term_a_truncated_basis_reconstructs_its_projection(model, run, tokens, tmp_path):
    """The top 16 interaction directions: the reconstruction is μ + C₁₆⁺ C₁₆ (x − μ), far from x."""
    hook = HOOKS[0]
    full = basis_of(run, "interaction", hook)
    top = LinearBasis(hook, full.C[:16], full.C_pinv[:, :16], full.eigenvalues[:16], full.activation_eigenvalues,
                      full.interaction_eigenvalues, full.mean)
    export_sae_lens(top, tmp_path, SAELensSource(DEFAULT_MODEL_NAME, CONTEXT, "embedded default text"),
                    dtype=torch.float64)
    hst = with_weights(model, torch.float64)
    _, clean = hst.run_with_cache(tokens)
    x = clean[hook]
    attach(hst, SAE.load_from_disk(tmp_path), use_error_term=False)
    _, cache = hst.run_with_cache(tokens)
    recon = cache[f"{hook}.hook_sae_recons"]
    projection = top.decode(top.encode(x))
    assert (recon - projection).abs().max() <= 1e-9 * x.abs().max()
    assert (recon - x).norm() > 0.05 * (x - top.mean).norm()  # 16 of 128 directions: not the identity
    assert (cache[f"{hook}.hook_sae_acts_post"] - relu_pair(top.encode(x))).abs().max() <= 1e-9 * x.abs().max()


@pytest.mark.parametrize("kind", list(BASIS_FILES))
def test_float32_export_in_the_float32_model(model, run, tokens, kind):
    """The default export, as a user runs it: logits unchanged with the error term, latents = relu(±f̂)
    within float32 rounding of (x − μ) Cᵀ (bound: (d + 2) ε Σ_j |C_ij| (|x_j| + |μ_j|), per latent)."""
    hook = HOOKS[0]
    hst = with_weights(model, torch.float32)
    ref, clean = hst.run_with_cache(tokens)
    x = clean[hook]
    basis = basis_of(run, kind, hook)
    attach(hst, SAE.load_from_disk(run / "sae_lens" / kind / hook), use_error_term=True)
    logits, cache = hst.run_with_cache(tokens)
    assert (logits - ref).abs().max() <= 1e-5 * ref.abs().max()
    x64, C, mu = x.double(), basis.C, basis.mean
    f_hat = basis.encode(x64)
    bound = (basis.d + 2) * EPS32 * ((x64.abs() + mu.abs()) @ C.abs().T)
    error = (cache[f"{hook}.hook_sae_acts_post"].double() - relu_pair(f_hat)).abs()
    assert (error <= torch.cat([bound, bound], dim=-1) + 1e-30).all()
    assert error.max() < 1e-3 * f_hat.abs().max()
