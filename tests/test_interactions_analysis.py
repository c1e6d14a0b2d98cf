"""The interaction graph of an analysis folder: report section, files, plots, CLI, resume after SIGKILL."""
from __future__ import annotations

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
from tl_degeneracy.analysis.files import EDGES_FILE
from tl_degeneracy.analysis.interactions import interactions_analysis
from tl_degeneracy.analysis.sections import InteractionsConfig
from tl_degeneracy.cli import main
from tl_degeneracy.interactions import collect_edges, node_bases
from tl_degeneracy.interactions.graph import load_graphs
from tl_degeneracy.testing import tiny_model

# Tests on the tiny analysis run under both TL generations (`models`); the CLI run on the embedded model
# and the SIGKILL resume exercise no generation-specific code beyond those and run under TL 4.x only.
ROOT = Path(__file__).resolve().parents[1]
NODES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def interactions_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("interactions")
    tokens = torch.randint(0, 23, (64, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_model(seed=0, dtype=torch.float32)
    analyze(model, tokens[:48], out, max_tokens=None, batch_size=16, context=None, n_probes=2, progress=False,
            dataset="64 random sequences")
    config = InteractionsConfig(max_tokens=96, batch_size=4, eps_rtol_grid=(1e-2, 1e-4), ablation_tokens=96)
    section = interactions_analysis(model, tokens, out, config, progress=False)
    return out, model, tokens, section


@pytest.mark.models
def test_report_section_and_edge_file(interactions_dir):
    out, model, tokens, section = interactions_dir
    report = AnalysisReport.load(out / "report.json")
    assert report.interactions is not None
    assert report.interactions.to_dict() == json.loads(json.dumps(section.to_dict()))
    assert AnalysisReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
    assert section.nodes == NODES and section.edge_tokens == 96
    assert section.edge_run is not None and section.edge_run.config["mode"] == "exact"
    assert {(r.basis, r.source) for r in section.sparsity} == {
        (b, s) for b in ("interaction", "pca", "standard") for s in NODES[:2]}
    for rows in section.modules.values():
        assert [r.eps_rtol for r in rows] == [1e-2, 1e-4]
        assert all(r.eps > 0 and r.random.n == 200 and r.modules is not None for r in rows)
    curves = section.ablation.curves
    assert {(c.hook, c.basis) for c in curves} == {
        (h, b) for h in NODES for b in ("interaction", "pca", "standard", "random")}
    # the ablation text is held out: rows after the 48 sequences the statistics saw
    assert section.ablation.text.startswith("held out") and section.ablation.tokens == 96
    # interactions.safetensors holds the same edges a direct call computes
    graphs = load_graphs(out / EDGES_FILE)
    bases = {"interaction": tld.InteractionBasis.load(out / "basis.safetensors"),
             "pca": tld.InteractionBasis.load(out / "pca_basis.safetensors")}
    direct = collect_edges(model, tokens, bases, NODES, exact=True, batch_size=4, max_tokens=96, progress=False)
    for name in bases:
        for a, b in zip(graphs[name].edges, direct[name].edges):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert not (out / "interactions_checkpoint.safetensors").exists()


@pytest.mark.models
def test_render_draws_the_interaction_plots(interactions_dir):
    out = interactions_dir[0]
    html = render(out).read_text()
    assert "Interaction graph" in html and "Ablation curves" in html and "Modules" in html
    for name in ("graph_interaction.png", "graph_pca.png", "graph_standard.png", "lorenz.png", "ablation.png"):
        assert (out / "plots" / name).stat().st_size > 5_000
    assert html.count("data:image/png;base64,") >= 7 + 5


@pytest.mark.models
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_interaction_report_renders_in_headless_chromium(interactions_dir, tmp_path):
    out = interactions_dir[0]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report_render.py"), str(out),
                             "--screenshot", str(tmp_path / "shot.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.models
def test_another_model_is_refused(interactions_dir):
    out, _, tokens, _ = interactions_dir
    with pytest.raises(ValueError, match="model differs"):
        interactions_analysis(tiny_model(seed=1, dtype=torch.float32), tokens, out, progress=False)


@pytest.mark.models
@pytest.mark.parametrize("argv, message", [
    (["interactions", "/nonexistent/run"], "no such folder"),
    (["interactions", "{out}", "--eps-rtol", "0"], "positive"),
    (["interactions", "{out}", "--edge-probes", "0"], "positive integer"),
    (["analyze", "--interactions", "--edge-tokens", "-3"], "positive integer"),
    (["interactions", "{out}", "--edge-top-k", "0"], "positive integer"),
    (["interactions", "{out}", "--edge-mass", "0"], "positive"),
    (["interactions", "{out}", "--edge-mass", "1.5"], "[0, 1]"),
    (["interactions", "{out}", "--edge-rest", "some"], "invalid choice"),
    (["interactions", "{out}", "--edge-rest-probes", "0"], "positive integer"),
    (["interactions", "{out}", "--edge-bases", "ica"], "invalid choice"),
    (["interactions", "{out}", "--edge-memory", "0"], "positive"),
    (["analyze", "--interactions", "--edge-mass", "2"], "[0, 1]"),
])
def test_cli_bad_interaction_input_exits_2(interactions_dir, capsys, argv, message):
    argv = [a.replace("{out}", str(interactions_dir[0])) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_analyze_with_interactions_end_to_end(tmp_path, capsys):
    """The embedded model and text, small: analyze --interactions writes everything and the report shows it."""
    out = tmp_path / "run"
    code = main(["analyze", "--tokens", "256", "--context", "32", "--interactions", "--edge-tokens", "64",
                 "--edge-probes", "1", "--ablation-tokens", "64", "--eps-rtol", "1e-3", "--out", str(out)])
    assert code == 0
    report = AnalysisReport.load(out / "report.json")
    assert report.interactions is not None and report.interactions.edge_run.config["n_probes"] == 1
    assert (out / EDGES_FILE).exists() and (out / "plots" / "lorenz.png").exists()
    capsys.readouterr()
    # what a budgeted exact pass would cost, without running it
    assert main(["interactions", str(out), "--edge-tokens", "64", "--edge-top-k", "8", "--edge-bases", "interaction",
                 "pca", "--estimate-only"]) == 0
    printed = capsys.readouterr().out
    assert "edge pass: 4 layer pairs x 2 bases (interaction, pca)" in printed and "projected" in printed
    assert "32-32 per pair" in printed  # per basis: 8 kept directions and 8 probes for the rest
    assert AnalysisReport.load(out / "report.json").interactions.config.top_k is None  # nothing was run


@pytest.mark.models
def test_budgeted_graph_in_two_bases_with_its_estimate(interactions_dir, tmp_path):
    """top-4 directions per node in the interaction basis and PCA: the estimate is announced first, the
    section, file and plots carry the rest vertices, and the edges are those of a direct budgeted call."""
    src, model, tokens, _ = interactions_dir
    out = tmp_path / "run"
    shutil.copytree(src, out)
    config = InteractionsConfig(max_tokens=48, batch_size=4, eps_rtol_grid=(1e-2,), ablation_tokens=48,
                                bases=("interaction", "pca"), top_k=4, rest_probes=2)
    said: list[str] = []
    section = interactions_analysis(model, tokens, out, config, progress=False, announce=said.append)
    assert len(said) == 1 and "forward-mode passes" in said[0] and "projected" in said[0]
    assert "2 layer pairs x 2 bases" in said[0] and "2 of 2 pairs run their block alone" in said[0]
    graphs = load_graphs(out / EDGES_FILE)
    assert set(graphs) == {"interaction", "pca"}
    direct = collect_edges(model, tokens, {name: tld.InteractionBasis.load(out / f) for name, f in
                                           (("interaction", "basis.safetensors"), ("pca", "pca_basis.safetensors"))},
                           NODES, exact=True, batch_size=4, max_tokens=48, budget=config.budget(), progress=False)
    for name, graph in graphs.items():
        assert graph.rest == direct[name].rest and all(r > 0 for r in graph.rest)
        assert [len(d) for d in graph.directions] == [4, 4, 4]
        for a, b in zip(graph.edges, direct[name].edges):
            assert a.shape == (5, 5)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for row in section.sparsity:
        assert (row.k_in, row.k_out, row.n_edges) == (4, 4, 16) and row.rest_in > 0 and 0 < row.rest_share < 1
    assert {c.basis for c in section.ablation.curves} == {"interaction", "pca", "random"}
    report = AnalysisReport.load(out / "report.json")
    assert report.interactions.config == config and report.interactions.sparsity[0].rest_share == \
        section.sparsity[0].rest_share
    render(out)
    assert (out / "plots" / "graph_pca.png").stat().st_size > 5_000


def test_cli_options_make_the_interactions_config():
    import argparse

    from tl_degeneracy.cli.interactions import add_parser, interactions_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["interactions", "DIR", "--edge-top-k", "8", "--edge-mass", "0.99", "--edge-rest", "exact",
                              "--edge-rest-probes", "3", "--edge-bases", "pca", "interaction", "--edge-memory", "2.5"])
    config = interactions_config(args)
    assert (config.top_k, config.mass, config.rest, config.rest_probes) == (8, 0.99, "exact", 3)
    assert config.bases == ("pca", "interaction") and config.memory_gib == 2.5
    budget = config.budget()
    assert budget is not None and (budget.top_k, budget.mass, budget.rest.value) == (8, 0.99, "exact")
    defaults = interactions_config(parser.parse_args(["interactions", "DIR"]))
    assert defaults.budget() is None and defaults.bases == ("interaction", "pca", "standard")
    assert InteractionsConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in defaults.to_dict().items() if k not in ("bases", "top_k", "mass", "rest", "rest_probes",
                                                                   "memory_gib")}
    assert InteractionsConfig.from_dict(old) == defaults  # a report from before budgets still loads


SCRIPT = """
import sys, torch
import tl_degeneracy as tld
from tl_degeneracy.interactions import collect_edges
from tl_degeneracy.testing import tiny_model
torch.set_num_threads(1)
model = tiny_model(seed=0)
tokens = torch.randint(0, 23, ({n}, 12), generator=torch.Generator().manual_seed(1))
bases = {{"interaction": tld.InteractionBasis.load(sys.argv[1])}}
graphs = collect_edges(model, tokens, bases, {nodes!r}, exact=True, batch_size=2, checkpoint=sys.argv[2],
                       resume=True, checkpoint_every=1, progress=False)
torch.save(graphs["interaction"].edges, sys.argv[3])
"""


def test_edge_pass_resumed_after_sigkill_equals_uninterrupted(tmp_path):
    model = tiny_model(seed=0)
    tokens = torch.randint(0, 23, (32, 12), generator=torch.Generator().manual_seed(0))
    stats = tld.collect(model, tokens, NODES, jacobians=True, progress=False)
    basis_path = tmp_path / "basis.safetensors"
    node_bases(stats, NODES, kinds=("interaction",))["interaction"].save(basis_path)
    n = 120
    script = tmp_path / "edges.py"
    script.write_text(SCRIPT.format(n=n, nodes=NODES))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt, result = tmp_path / "edges_ckpt.safetensors", tmp_path / "edges.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(basis_path), str(ckpt), str(result)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    if tld.Stats.load(ckpt).progress.batches_seen >= 5:
                        break
                except Exception:  # caught between writes: the rename is atomic, so only a race on exists()
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the edge pass finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    seen = tld.Stats.load(ckpt).progress.batches_seen
    assert 5 <= seen < n // 2 and not result.exists()
    resumed = subprocess.run([sys.executable, str(script), str(basis_path), str(ckpt), str(result)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    edges_resumed = torch.load(result)
    straight = subprocess.run([sys.executable, str(script), str(basis_path), str(tmp_path / "fresh.safetensors"),
                               str(result)], env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    for a, b in zip(edges_resumed, torch.load(result)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
