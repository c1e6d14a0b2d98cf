"""Bad input on the command line: one clear ``error:`` paragraph, exit code 2, no traceback,
nothing left behind; interruptions keep (and point at) the checkpoint."""
from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy import cli
from tl_degeneracy.cli import common as cli_common
from tl_degeneracy.cli import main

OUT = "out/run"  # every analyze row writes here unless it names its own --out; none may create it

_real_load_model = cli_common.load_model


@functools.lru_cache(maxsize=1)
def _embedded_model():
    from tl_degeneracy.default_model import load_default_model

    return load_default_model()


def _cached_load_model(name, dtype, device):
    """The embedded model loaded once for the whole module (rows that reach the model are many)."""
    if name is None and dtype == "float32" and device is None:
        return _embedded_model()
    return _real_load_model(name, dtype, device)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder of bad inputs, the working directory of the test; CUDA reported absent."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\n\t \n")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("Anne Elliot était là.\n".encode("latin-1"))
    (tmp_path / "table.xlsx").write_bytes(b"PK\x03\x04 not a spreadsheet we read")
    (tmp_path / "bad.parquet").write_text("this is not parquet")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "pytorch_model.bin").write_bytes(b"\x00" * 16)
    (tmp_path / "afile").write_text("a file, not a folder\n")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "checkpoint.safetensors").write_bytes(b"")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("some text\n")
    (tmp_path / "mixed" / "b.csv").write_text("text\nmore text\n")
    (tmp_path / "numbers.jsonl").write_text('{"text": 5}\n{"text": "some text"}\n')
    (tmp_path / "nulls.jsonl").write_text('{"text": "some text"}\n{"text": null}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli_common, "load_model", _cached_load_model)
    return tmp_path


def assert_one_error_paragraph(err: str) -> None:
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    body = err.rstrip("\n")
    assert body and "\n\n" not in body, err  # no blank line inside
    assert len(body.splitlines()) == 1, err  # one paragraph, printed as one line


# (id, argv, a phrase the message must contain)
ROWS = [
    # --dataset: checked before the model is loaded
    ("dataset-empty-file", ["analyze", "--dataset", "empty.txt"], "is empty"),
    ("dataset-whitespace-only", ["analyze", "--dataset", "blank.txt"], "is empty"),
    ("dataset-binary-as-txt", ["analyze", "--dataset", "bin.txt"], "NUL byte"),
    ("dataset-not-utf8", ["analyze", "--dataset", "latin1.txt"], "not UTF-8"),
    ("dataset-missing-file", ["analyze", "--dataset", "missing.txt"], "no such file"),
    ("dataset-missing-path", ["analyze", "--dataset", "./missing"], "no such file"),
    ("dataset-unsupported-suffix", ["analyze", "--dataset", "table.xlsx"], ".xlsx"),
    ("dataset-not-parquet", ["analyze", "--dataset", "bad.parquet"], "not a parquet file"),
    ("dataset-empty-folder", ["analyze", "--dataset", "emptydir"], "holds no"),
    ("dataset-mixed-folder", ["analyze", "--dataset", "mixed"], "mixes formats"),
    ("dataset-jsonl-number-as-text", ["analyze", "--dataset", "numbers.jsonl"],
     "numbers.jsonl: the field 'text' holds int"),
    ("dataset-jsonl-null-text", ["analyze", "--dataset", "nulls.jsonl"], "nulls.jsonl: the field 'text' is empty"),
    # counts and ranges: checked while parsing
    ("tokens-zero", ["analyze", "--tokens", "0"], "--tokens"),
    ("tokens-negative", ["analyze", "--tokens", "-5"], "--tokens"),
    ("tokens-not-a-number", ["analyze", "--tokens", "lots"], "--tokens"),
    ("batch-size-zero", ["analyze", "--batch-size", "0"], "--batch-size"),
    ("probes-zero", ["analyze", "--probes", "0"], "--probes"),
    ("probes-negative", ["analyze", "--probes", "-2"], "--probes"),
    ("context-zero", ["analyze", "--context", "0"], "--context"),
    ("rtol-negative", ["analyze", "--rtol", "-1"], "--rtol"),
    ("dtype-unknown", ["analyze", "--dtype", "float8"], "invalid choice"),
    ("hooks-without-names", ["analyze", "--hooks"], "--hooks"),
    ("no-command", [], "required"),
    # checked once the model is loaded, before collecting
    ("context-longer-than-n_ctx", ["analyze", "--context", "300"], "n_ctx=256"),
    ("hook-unknown", ["analyze", "--hooks", "blocks.0.hook_resid_pr"], "tl-degeneracy hooks"),
    ("hook-glob-matches-nothing", ["analyze", "--hooks", "blocks.9.*"], "tl-degeneracy hooks"),
    ("hook-not-per-token", ["analyze", "--hooks", "blocks.0.attn.hook_pattern"], "per-token"),
    # --device
    ("device-cuda-unavailable", ["analyze", "--device", "cuda"], "CUDA is not available"),
    ("device-cuda-index-unavailable", ["analyze", "--device", "cuda:1"], "CUDA is not available"),
    ("device-unknown-to-torch", ["analyze", "--device", "gpu0"], "not a device torch knows"),
    # MODEL
    ("model-empty-folder", ["analyze", "emptydir"], "no config.json"),
    ("model-folder-without-config", ["analyze", "notamodel"], "no config.json"),
    ("model-is-a-file", ["analyze", "afile"], "is a file"),
    ("model-missing-path", ["analyze", "./no-such-model"], "no such folder"),
    # --out
    ("out-is-a-file", ["analyze", "--out", "afile"], "is a file"),
    ("out-under-a-file", ["analyze", "--out", "afile/run"], "is a file"),
    ("out-unwritable-parent", ["analyze", "--out", "/proc/x"], "cannot write to --out /proc/x"),
    # memory: the estimate is printed, a run that cannot fit refused before any data is read
    ("max-memory-too-small", ["analyze", "--max-memory", "0.01"], "more than --max-memory 0.01 GiB"),
    # report / heads / hooks
    ("report-missing-dir", ["report", "no-such-run"], "no such folder"),
    ("report-dir-without-run", ["report", "emptydir"], "no report.json"),
    ("report-on-a-file", ["report", "afile"], "is a file"),
    ("heads-missing-dir", ["heads", "no-such-run"], "no such folder"),
    ("heads-dir-without-run", ["heads", "emptydir"], "no report.json"),
    ("heads-unfinished-run", ["heads", "unfinished"], "--resume"),
    ("heads-threshold-above-1", ["heads", "emptydir", "--threshold", "1.5"], "[0, 1]"),
    ("heads-threshold-negative", ["heads", "emptydir", "--threshold", "-0.1"], "[0, 1]"),
    ("hooks-model-not-a-model", ["hooks", "emptydir"], "no config.json"),
    ("hooks-device-cuda-unavailable", ["hooks", "--device", "cuda"], "CUDA is not available"),
]


@pytest.mark.parametrize("argv, phrase", [pytest.param(a, p, id=i) for i, a, p in ROWS])
def test_bad_input_is_one_error_paragraph(workspace, capsys, argv, phrase):
    if argv[:1] == ["analyze"] and "--out" not in argv:
        argv = [*argv, "--out", OUT]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_error_paragraph(err)
    assert phrase in err, err
    assert not (workspace / "out").exists(), "a refused run created its output folder"
    assert not (workspace / "afile" / "run").exists()


def test_unwritable_out_is_refused_before_anything(workspace, capsys, monkeypatch):
    """A read-only output folder (simulated: as root every folder is writable)."""
    readonly = workspace / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == readonly
                        else real_access(p, mode, **kw))
    monkeypatch.setattr(cli_common, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))
    assert main(["analyze", "--out", "readonly/run/deeper"]) == 2
    err = capsys.readouterr().err
    assert_one_error_paragraph(err)
    assert "not writable" in err and str(readonly) in err
    assert list(readonly.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_out_is_refused(workspace, capsys):
    readonly = workspace / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        assert main(["analyze", "--out", "readonly"]) == 2
        err = capsys.readouterr().err
        assert_one_error_paragraph(err)
        assert "not writable" in err
    finally:
        readonly.chmod(0o755)


def test_error_during_collection_removes_created_folders(workspace, capsys, monkeypatch):
    """A library error raised after analyze created --out: exit 2, and the empty folders go."""
    monkeypatch.setattr(cli_common, "load_text_dataset", lambda spec: [])  # collect: EmptyDataError
    assert main(["analyze", "--tokens", "64", "--context", "32", "--out", OUT]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]  # the progress bar may come first
    assert last.startswith("error: ") and "no batches" in last, err
    assert not (workspace / "out").exists()


def test_ctrl_c_before_collection_does_not_advise_resume(workspace, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_common, "load_model", interrupted)
    assert main(["analyze", "--out", OUT]) == 130
    err = capsys.readouterr().err
    assert "interrupted before anything was collected" in err
    assert "--resume" not in err and "Traceback" not in err
    assert not (workspace / "out").exists()


def test_sigterm_before_collection_exits_143(workspace, capsys, monkeypatch):
    def terminated(*args):
        raise tld.Terminated("signal 15")

    monkeypatch.setattr(cli_common, "load_model", terminated)
    assert main(["analyze", "--out", OUT]) == 143
    err = capsys.readouterr().err
    assert "before anything was collected" in err and "--resume" not in err
    assert not (workspace / "out").exists()


def test_hooks_subcommand_lists_the_embedded_models_hooks(workspace, capsys):
    assert main(["hooks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "blocks.0.hook_resid_pre" in lines and "blocks.3.hook_resid_post" in lines
    assert all(line and " " not in line for line in lines) and len(lines) == len(set(lines))


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tl-degeneracy {tld.__version__}\n"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", ["analyze", "report", "explore", "heads", "hooks"])
def test_help_explains_every_option_and_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each option's help on one line
    assert main([command, "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    sub = _subparsers()[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = " ".join(sub._get_formatter()._expand_help(action).split())
        assert len(text.split()) >= 5, f"{action.dest}: explain it in a sentence"
        assert "(default:" in text or "required" in text, f"{action.dest}: no default shown"
        assert text in shown
    if command == "analyze":
        for default in ["(default: 8192)", "(default: chosen from the model's size", "(default: min(128, n_ctx))",
                        "(default: 4)", "(default: 1e-08)", "(default: float32)", "(default: tl_degeneracy_out)",
                        "--keep-checkpoint"]:
            assert default in shown, default


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ["analyze", "report", "heads", "hooks", "--version"]:
        assert command in out


def test_resume_without_checkpoint_starts_fresh_then_mismatch_is_refused(workspace, capsys):
    """--resume with no checkpoint is a note, not an error; a checkpoint from other options is refused."""
    args = ["analyze", "--tokens", "256", "--batch-size", "2", "--context", "32", "--out", OUT]
    assert main([*args, "--resume", "--keep-checkpoint"]) == 0
    err = capsys.readouterr().err
    assert f"no checkpoint found in {OUT}" in err and "starts fresh" in err
    out = workspace / OUT
    assert (out / "report.json").exists() and (out / "checkpoint.safetensors").exists()  # --keep-checkpoint

    assert main([*args, "--resume", "--probes", "2"]) == 2  # another run's checkpoint
    err = capsys.readouterr().err
    assert_one_error_paragraph(err)
    assert "cannot resume" in err and "n_probes" in err


# --- real processes -----------------------------------------------------------------------

def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tl_degeneracy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.parametrize("argv", [["analyze", "--dataset", "bin.txt", "--out", OUT], ["analyze", "--tokens", "0"],
                                  ["heads", "no-such-run"]], ids=["binary-dataset", "tokens-zero", "heads-no-run"])
def test_bad_input_in_a_real_process(workspace, argv):
    result = _run(argv, workspace)
    assert result.returncode == 2, result.stderr
    assert_one_error_paragraph(result.stderr)
    assert not (workspace / "out").exists()


def test_version_in_a_real_process(tmp_path):
    result = _run(["--version"], tmp_path)
    assert result.returncode == 0 and result.stdout == f"tl-degeneracy {tld.__version__}\n"


@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_and_advises_resume(tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoint.safetensors"
    log = tmp_path / "stderr.log"  # a file, not a pipe: the progress bar must never block on a full pipe
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tl_degeneracy", "analyze", "--tokens", "200000",
                                 "--batch-size", "1", "--context", "64", "--out", str(out)],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            # analyze checkpoints every 10 batches (or 60 s); allow for a slow, busy machine
            deadline = time.monotonic() + 120
            while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert checkpoint.exists(), f"no checkpoint within 120 s: {log.read_text()[-2000:]}"
            assert proc.poll() is None, f"the run ended before it could be interrupted: {log.read_text()[-2000:]}"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = log.read_text()
    assert proc.returncode == 143, err[-2000:]
    assert f"the checkpoint is in {checkpoint}" in err and "--resume" in err
    assert "Traceback" not in err
    progress = tld.Stats.load(checkpoint).progress
    assert progress is not None and progress.batches_seen >= 1
