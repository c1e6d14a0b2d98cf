"""Runs that protect the user's work: a finished analysis is never replaced silently, two runs never share
an output folder, a lost or damaged report.json is rebuilt from the statistics, a run that cannot fit in
memory is refused before any data is read, and Ctrl-C at start-up prints no traceback."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from test_cli_errors import assert_one_error_paragraph, workspace  # noqa: F401  (a fixture)

from tl_degeneracy.checkpoint import FolderLock
from tl_degeneracy.cli import common as cli_common
from tl_degeneracy.cli import main

SMALL = ["--tokens", "64", "--context", "32", "--batch-size", "2"]


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_finished_run_is_refused_without_overwrite(workspace, capsys):  # noqa: F811
    out = workspace / "run"
    assert main(["analyze", *SMALL, "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["analyze", "--tokens", "32", "--context", "32", "--out", str(out)]) == 2  # even a smaller run
    err = capsys.readouterr().err
    assert_one_error_paragraph(err)
    assert "holds a finished analysis" in err and "--overwrite" in err
    assert _files(out) == before  # nothing touched
    assert main(["analyze", "--tokens", "32", "--context", "32", "--out", str(out), "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_tokens"] == 32


def test_second_run_on_one_folder_is_refused(workspace, capsys, monkeypatch):  # noqa: F811
    out = workspace / "busy"
    out.mkdir()
    monkeypatch.setattr(cli_common, "load_model", lambda *a: pytest.fail("the model was loaded by the second run"))
    with FolderLock(out):  # the first run, still going
        assert main(["analyze", *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert_one_error_paragraph(err)
    assert "in use by another tl-degeneracy run" in err
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []


def test_refused_for_memory_before_any_data_is_read(workspace, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cli_common, "load_text_dataset", lambda spec: pytest.fail("data read before the check"))
    assert main(["analyze", *SMALL, "--max-memory", "0.01", "--out", "out/run"]) == 2
    captured = capsys.readouterr()
    assert "memory estimate:" in captured.out and "GiB of float64 sums" in captured.out
    assert_one_error_paragraph(captured.err)
    assert "--max-memory 0.01 GiB" in captured.err and "--stages" in captured.err
    assert not (workspace / "out").exists()


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_report_rebuilds_a_lost_report_json(workspace, capsys, damage):  # noqa: F811
    out = workspace / "run"
    assert main(["analyze", *SMALL, "--out", str(out)]) == 0
    original = json.loads((out / "report.json").read_text())
    if damage == "deleted":
        (out / "report.json").unlink()
    else:
        text = (out / "report.json").read_text()
        (out / "report.json").write_text(text[: len(text) // 3])
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "rebuil" in err.lower()
    rebuilt = json.loads((out / "report.json").read_text())
    assert rebuilt["n_tokens"] == original["n_tokens"]
    assert set(rebuilt["spectra"]) == set(original["spectra"])
    for hook, spectrum in original["spectra"].items():  # the same statistics give the same numbers
        again = rebuilt["spectra"][hook]
        for key in ("ib_kept", "pca_kept", "ib_dirs_99", "pca_dirs_99", "n_datapoints"):
            assert again[key] == spectrum[key], (hook, key)
        assert again["top_lambda"] == pytest.approx(spectrum["top_lambda"], rel=1e-9, abs=1e-12)
    assert rebuilt["degeneracy"] == original["degeneracy"]
    assert rebuilt["synchronized_heads"] == original["synchronized_heads"]


def test_ctrl_c_at_start_up_prints_no_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tl_degeneracy", "analyze", "--out", str(tmp_path / "run")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # importing torch, loading the model
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130 from our handler; or, when the signal lands while the interpreter is already shutting down after
    # it, death by SIGINT itself, which a shell also reports as 130 (128 + 2): either way no traceback
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert "Traceback" not in err and "interrupted" in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
