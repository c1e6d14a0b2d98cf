"""``analyze --llc``: the sampled N_eff(ε) in report.json, llc.json and report.html (docs/llc.md)."""
from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from tl_degeneracy.analysis import AnalysisReport, render
from tl_degeneracy.analysis.files import LLC_FILE
from tl_degeneracy.analysis.llc import table_rows
from tl_degeneracy.analysis.sections import LLCAnalysisConfig
from tl_degeneracy.cli import main
from tl_degeneracy.llc import NeffResult


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llc") / "run"
    code = main(["analyze", "--tokens", "256", "--context", "32", "--batch-size", "4", "--llc", "1e-2", "1e-3",
                 "--llc-chains", "2", "--llc-draws", "4", "--llc-burn-in", "2", "--llc-tokens", "32",
                 "--llc-step-size", "1e-9", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.models
def test_report_json_holds_the_llc_section_and_round_trips(run_dir):
    report = AnalysisReport.load(run_dir / "report.json")
    assert report.llc is not None
    again = AnalysisReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.to_dict() == report.to_dict() and again.llc is not None
    assert again.llc.to_dict() == report.llc.to_dict()
    section = report.llc
    assert section.config.eps == (1e-3, 1e-2) and section.config.layer_eps == 1e-2
    assert section.to_dict()["config"]["eps"] == [1e-3, 1e-2] and section.to_dict()["config"]["layer_eps"] == 1e-2
    assert list(section.parts) == ["model", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    whole = section.parts["model"]
    # every weight matrix; not W_E, LN, biases (TL 3's HookedTransformer also has unembed.b_U: 2048 more)
    assert whole.nominal in (1350400, 1352448) and whole.kfac_nominal == 1048576
    assert len(whole.kfac) == 2 and whole.kfac[0] >= whole.kfac[1] > 0  # more counted at the smaller ε
    layer = section.parts["blocks.1"]
    assert layer.nominal == 198272 and layer.kfac_nominal == 196608 and len(layer.kfac) == 1
    result = whole.result  # report.json: no traces
    assert result.n_params == whole.nominal and all(not c.trace for s in result.scales for c in s.chains)
    saved = json.loads((run_dir / LLC_FILE).read_text())  # llc.json: the same results with their traces
    traced = NeffResult.from_dict(saved["model"])
    assert [len(c.trace) for c in traced.scales[0].chains] == [6, 6]
    assert traced.n_eff == pytest.approx(result.n_eff, nan_ok=True)
    assert len(table_rows(section)) == 2 + 4


@pytest.mark.models
def test_render_shows_the_section_and_non_blank_plots(run_dir):
    (run_dir / "report.html").unlink()
    render(run_dir)
    text = (run_dir / "report.html").read_text()
    assert "Effective parameter count (SGLD)" in text and "K-FAC #{g·k &gt; γε}" in text
    assert "which is a bound" not in text and "r_H ≤ N_eff(0)" in text  # the note of docs/llc.md §4
    for name in ("llc_curve", "llc_layers", "llc_traces"):
        image = mpimg.imread(run_dir / "plots" / f"{name}.png")
        assert image.std() > 0.01, name
        assert f'alt="{name}"' in text


@pytest.mark.parametrize("argv, phrase", [
    (["--llc", "0"], "--llc"), (["--llc", "-1e-3"], "--llc"), (["--llc", "nan"], "--llc"), (["--llc"], "--llc"),
    (["--llc", "1e-3", "--llc-draws", "0"], "--llc-draws"), (["--llc", "1e-3", "--llc-gamma", "0"], "--llc-gamma"),
    (["--llc", "1e-3", "--llc-step-size", "-1"], "--llc-step-size"),
])
def test_bad_llc_values_exit_2_with_one_paragraph(tmp_path, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--out", "run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_config_checks_and_defaults():
    config = LLCAnalysisConfig(eps=(1e-2, 1e-4, 1e-3))
    assert config.eps == (1e-4, 1e-3, 1e-2) and config.layer_eps == 1e-3
    assert (config.n_chains, config.n_draws, config.burn_in, config.max_tokens) == (2, 200, 200, 128)
    with pytest.raises(ValueError, match="gamma"):
        LLCAnalysisConfig(eps=(1e-3,), gamma=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        LLCAnalysisConfig(eps=(1e-3,), max_tokens=0)


@pytest.mark.models
@pytest.mark.slow  # ~20 s on a quiet 2-core CPU (96 s measured under load)
def test_per_matrix_example_runs_in_reduced_form(tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "llc_per_matrix.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--tokens", "64", "--context", "32", "--draws", "4",
                                      "--burn-in", "2", "--step-size", "1e-7", "--out", str(tmp_path / "t.md")])
    runpy.run_path(str(script), run_name="__main__")
    table = (tmp_path / "t.md").read_text()
    assert table.count("| `blocks.") == 3 and "K-FAC #{g·k > γε}" in table
