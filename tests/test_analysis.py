"""The analysis a user runs: report JSON round-trip, HTML with rendered plots, CLI resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.analysis import AnalysisReport, analyze, render
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    tokens = torch.randint(0, 23, (48, 12), generator=torch.Generator().manual_seed(0))
    analyze(tiny_model(seed=0, dtype=torch.float32), tokens, out, max_tokens=None, batch_size=16, context=None,
            n_probes=2, progress=False, dataset="48 random sequences")
    return out


def test_report_json_round_trips(analysis_dir):
    data = json.loads((analysis_dir / "report.json").read_text())
    report = AnalysisReport.from_dict(data)
    assert report.to_dict() == data
    assert set(report.spectra) == {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"}
    assert report.format == "tl_degeneracy.report/2" == data["format"]
    assert report.degeneracy.totals.nominal_weights > report.degeneracy.totals.kfac_rank > 0
    assert report.degeneracy.per_layer["0"].nominal > 0
    assert report.degeneracy.head_threshold == 0.05 and report.degeneracy.neuron_threshold == 1e-3
    assert report.synchronized_heads is not None and report.synchronized_neurons is not None
    # provenance: what the data was, which package, the collection's RunRecord and the AnalysisConfig
    prov = report.provenance
    assert prov.dataset == "48 random sequences" and prov.package_version
    assert prov.run["model"]["weights_sha256"] == report.model["weights_sha256"]
    assert prov.run["config"]["jacobians"]["n_probes"] == 2 and prov.run["config"]["batch_size"] == 16
    assert prov.run["config"]["context"] == 12  # None: min(128, n_ctx)
    assert prov.analysis["n_probes"] == 2 and prov.analysis["max_tokens"] is None
    # the checkpoint is deleted after success (keep_checkpoint=False)
    assert not (analysis_dir / "checkpoint.safetensors").exists()
    assert {p.name for p in analysis_dir.iterdir()} >= {"stats.safetensors", "basis.safetensors", "report.json",
                                                        "pca_basis.safetensors", "report.html"}
    assert all("activation" in s.thresholds for s in report.spectra.values())  # every count has its threshold
    with pytest.raises(ValueError, match="report"):
        AnalysisReport.from_dict({**data, "format": "something else"})


def test_render_writes_html_with_plots(analysis_dir):
    html = render(analysis_dir).read_text()
    assert html.count("data:image/png;base64,") >= 3 + 1 + 2 + 1  # spectra, cumulative, heads, parameters
    for name in ("Degeneracy account", "Synchronized attention heads", "interaction basis vs PCA"):
        assert name in html
    from tl_degeneracy.cli import main

    assert main(["heads", str(analysis_dir)]) == 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(analysis_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report_render.py"), str(analysis_dir),
                             "--screenshot", str(tmp_path / "shot.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_cli_resume_after_kill_equals_uninterrupted(tmp_path):
    # the embedded default model ships with the package: its absence is a failure, not a skip
    assert (ROOT / "tl_degeneracy" / "default_model" / "model.safetensors").exists()
    args = ["--tokens", "2560", "--batch-size", "2", "--context", "64", "--probes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tl_degeneracy", "analyze", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = killed / "checkpoint.safetensors"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and tld.Stats.load(ckpt).progress.batches_seen >= 10:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "stats.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "tl_degeneracy", "analyze", *args, "--out", str(killed),
                              "--resume"], capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not ckpt.exists()  # deleted once the analysis succeeded
    whole = tmp_path / "whole"
    straight = subprocess.run([sys.executable, "-m", "tl_degeneracy", "analyze", *args, "--out", str(whole)],
                              capture_output=True, text=True, env=env, timeout=900)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = tld.Stats.load(killed / "stats.safetensors"), tld.Stats.load(whole / "stats.safetensors")
    assert a.n_tokens == b.n_tokens == 2560
    for key, acc in a.accumulators.items():
        for field, tensor in acc.tensors.items():
            other = b.accumulators[key].tensors[field]
            assert torch.allclose(tensor.double(), other.double(), rtol=1e-12, atol=0), (key, field)
