"""The one K-FAC count ``#{g_i·k_j > c}`` (degeneracy/kfac.py): exact against the dense outer product,
and the same numbers wherever it is used — the account, the SGLD section and ``llc --kfac``.

At the logits ``K`` is the behavioural loss's output Hessian: the identity for MSE, one zero (the logit
shift) and ``d_vocab − 1`` ones for KL. Before the count had one home, ``llc --kfac`` used the identity
whatever ``--loss`` said, so its KL count of ``W_U`` was ``d_vocab/(d_vocab − 1)`` times too large.
"""
from __future__ import annotations

import re

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.cli import main
from tl_degeneracy.degeneracy import KfacSpectra, covering, kfac_count, weight_matrices
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models


@pytest.mark.parametrize("seed", range(5))
def test_chunked_count_equals_the_dense_outer_product(seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(37, generator=gen, dtype=torch.float64) ** 4
    k = torch.cat([torch.zeros(3, dtype=torch.float64), torch.rand(101, generator=gen, dtype=torch.float64)])
    import tl_degeneracy.degeneracy.kfac as kfac

    monkeypatch.setattr(kfac, "_CHUNK", 250)  # several row blocks
    for cutoff in (0.0, 1e-3, 0.05, float(torch.outer(g, k).median())):
        assert kfac_count(g, k, cutoff) == int((torch.outer(g, k) > cutoff).sum())


def _unembed_counts(loss: str, tokens: torch.Tensor, cutoff: float) -> tuple[int, int]:
    model = tiny_model(seed=0)
    hooks = tld.degeneracy_hooks(model)
    stats = tld.collect(model, tokens, hooks, jacobians=tld.JacobianConfig(n_probes=2, loss=loss), progress=False)
    spectra = KfacSpectra(model, stats)
    unembed = [m for m in spectra.matrices if m.weight.name == "W_U"][0]
    assert unembed.g is not None and unembed.k is not None
    count, nominal = spectra.count(cutoff, covering(["unembed.W_U"]))
    assert count == unembed.count(cutoff) and nominal == unembed.weight.d_in * unembed.weight.d_out
    return count, int((unembed.g > cutoff).sum())  # W_U's G eigenvalues above the cut-off (k = 1)


def test_kl_logit_hessian_drops_the_shift_direction(tiny_tokens):
    kl, g_above = _unembed_counts("kl", tiny_tokens, 1e-3)
    mse, g_above_mse = _unembed_counts("mse", tiny_tokens, 1e-3)
    V = 23
    assert g_above == g_above_mse > 0  # G does not depend on the loss
    assert mse == V * g_above and kl == (V - 1) * g_above


def test_account_uses_the_same_count(tiny_tokens):
    model = tiny_model(seed=0)
    stats = tld.collect(model, tiny_tokens, tld.degeneracy_hooks(model), jacobians=tld.JacobianConfig(
        n_probes=2, loss="kl"), observers=[tld.HeadSync(), tld.NeuronSync()], progress=False)
    report = tld.degeneracy_report(model, stats)
    spectra = KfacSpectra(model, stats)
    for entry, account in zip(spectra.matrices, report.matrices):
        assert (entry.weight.label, entry.count(report.eps)) == (account.label, account.kfac_rank)
    assert [m.weight for m in spectra.matrices] == weight_matrices(model)


def _llc_argv(tmp_path, loss: str) -> list[str]:
    return ["llc", "--params", "unembed.W_U", "--eps", "1e-3", "--loss", loss, "--kfac", "--chains", "1",
            "--draws", "4", "--burn-in", "0", "--step-size", "1e-9", "--tokens", "64", "--context", "32",
            "--no-progress", "--out", str(tmp_path / loss)]


def test_llc_command_kfac_count_follows_the_loss(tmp_path, capsys):
    """``llc --kfac`` with ``--loss kl`` counts W_U with the KL logit Hessian (fails on 0.2.0, which used K = I)."""
    counts = {}
    for loss in ("mse", "kl"):
        assert main(_llc_argv(tmp_path, loss)) == 0
        out = capsys.readouterr().out
        counts[loss] = int(re.search(r"K-FAC #\{g·k > γε\}: ε=0\.001: (\d+)", out).group(1).replace(",", ""))
    V = 2048  # the embedded model's vocabulary; γε = 0.1
    assert counts["mse"] > 0 and counts["mse"] % V == 0
    assert counts["kl"] == counts["mse"] // V * (V - 1)
