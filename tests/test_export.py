"""``tl-degeneracy export --format sae-lens``: the written tensors and cfg.json against the formulas
(sae_lens's encode/decode re-implemented from its documented definition; sae_lens itself loads them in
tests/test_sae_lens_roundtrip.py), the command on a real analysis folder, and bad input as one
``error:`` paragraph with exit code 2 and nothing left behind."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_errors import assert_one_error_paragraph

from tl_degeneracy.analysis import analyze
from tl_degeneracy.basis import InteractionBasis, LinearBasis
from tl_degeneracy.basis.sae_lens_export import (
    CFG_FILE,
    WEIGHTS_FILE,
    SAELensSource,
    export_sae_lens,
    sae_lens_config,
    sae_lens_weights,
)
from tl_degeneracy.cli import build_parser, main
from tl_degeneracy.cli import export as export_cli
from tl_degeneracy.testing import tiny_model

HOOK = "blocks.1.hook_resid_pre"
SOURCE = SAELensSource(model_name="gpt2", context_size=128, dataset_path="NeelNanda/pile-10k", prepend_bos=True,
                       extra={"note": "planted"})


def planted_basis(k: int = 5, d: int = 8, seed: int = 0) -> LinearBasis:
    """A random affine basis keeping k < d directions: C [k, d], C⁺ its pseudo-inverse, a far-off mean."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(k, d, generator=g, dtype=torch.float64)
    mu = 10 * torch.randn(d, generator=g, dtype=torch.float64)
    importance = torch.linspace(k, 1, k, dtype=torch.float64)
    empty = torch.zeros(0, dtype=torch.float64)
    return LinearBasis(HOOK, C, torch.linalg.pinv(C), importance, empty, empty, mu)


def sae_encode(w: dict[str, torch.Tensor], x: torch.Tensor, apply_b_dec_to_input: bool = True) -> torch.Tensor:
    """sae_lens's StandardSAE.encode: relu((x − b_dec · apply_b_dec_to_input) W_enc + b_enc)."""
    return torch.relu((x - w["b_dec"] * apply_b_dec_to_input) @ w["W_enc"] + w["b_enc"])


def sae_decode(w: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """sae_lens's StandardSAE.decode: z W_dec + b_dec."""
    return z @ w["W_dec"] + w["b_dec"]


def test_weights_follow_the_formulas():
    basis = planted_basis()
    C, C_pinv, mu = basis.C, basis.C_pinv, basis.mean
    w = sae_lens_weights(basis, torch.float64)
    assert torch.equal(w["W_enc"], torch.cat([C.T, -C.T], 1)) and w["W_enc"].shape == (8, 10)
    assert torch.equal(w["W_dec"], torch.cat([C_pinv.T, -C_pinv.T], 0)) and w["W_dec"].shape == (10, 8)
    assert torch.equal(w["b_enc"], torch.zeros(10, dtype=torch.float64)) and torch.equal(w["b_dec"], mu)


def test_latents_are_relu_of_both_signs_and_decode_is_the_basis_projection(tmp_path):
    """sae_lens's maps on the written files (float64) with the written apply_b_dec_to_input."""
    basis = planted_basis()
    export_sae_lens(basis, tmp_path, SOURCE, dtype=torch.float64)
    w = load_file(str(tmp_path / WEIGHTS_FILE))
    apply_b_dec = json.loads((tmp_path / CFG_FILE).read_text())["apply_b_dec_to_input"]
    x = basis.mean + torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f_hat = basis.encode(x)
    z = sae_encode(w, x, apply_b_dec)
    scale = f_hat.abs().max()
    assert (z[:, :5] - torch.relu(f_hat)).abs().max() <= 1e-12 * scale
    assert (z[:, 5:] - torch.relu(-f_hat)).abs().max() <= 1e-12 * scale
    assert ((z[:, :5] > 0) & (z[:, 5:] > 0)).sum() == 0  # one latent of each pair at most
    projection = basis.mean + (x - basis.mean) @ basis.C.T @ basis.C_pinv.T  # μ + C⁺C(x − μ)
    recon = sae_decode(w, z)
    assert (recon - projection).abs().max() <= 1e-12 * x.abs().max()
    assert (recon - x).abs().max() > 0.1  # k < d: off the span, the projection is not x itself
    on_span = basis.decode(torch.randn(16, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert (sae_decode(w, sae_encode(w, on_span, apply_b_dec)) - on_span).abs().max() <= 1e-12 * on_span.abs().max()


def test_folding_the_mean_into_b_enc_would_be_the_same_map():
    """The other exact choice (apply_b_dec_to_input False, b_enc = [−Cμ, Cμ]) computes the same latents in
    float64: the written one differs only in where μ is subtracted (module docstring: float32 cancellation)."""
    basis = planted_basis()
    w = sae_lens_weights(basis, torch.float64)
    C_mu = basis.C @ basis.mean
    folded = {**w, "b_enc": torch.cat([-C_mu, C_mu])}
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(sae_encode(folded, x, apply_b_dec_to_input=False), sae_encode(w, x), atol=1e-10)


def test_written_files_and_cfg_json(tmp_path):
    basis = planted_basis()
    folder = export_sae_lens(basis, tmp_path / HOOK, SOURCE)
    assert sorted(p.name for p in folder.iterdir()) == [CFG_FILE, WEIGHTS_FILE]
    written = load_file(str(folder / WEIGHTS_FILE))
    expected = sae_lens_weights(basis, torch.float64)
    assert set(written) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, t in written.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, expected[name].float()), name
    cfg = json.loads((folder / CFG_FILE).read_text())
    assert cfg == sae_lens_config(basis, SOURCE)
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                                "normalize_activations", "hook_name", "hook_layer", "model_name", "context_size",
                                "dataset_path", "prepend_bos", "activation_fn_str")} == {
        "architecture": "standard", "d_in": 8, "d_sae": 10, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": HOOK, "hook_layer": 1,
        "model_name": "gpt2", "context_size": 128, "dataset_path": "NeelNanda/pile-10k", "prepend_bos": True,
        "activation_fn_str": "relu"}
    assert "metadata" not in cfg and "sae_lens_version" not in cfg  # the flat layout both 5.x and 6.x read
    ours = cfg["tl_degeneracy"]
    assert ours["basis_kind"] == "linear" and ours["k"] == 5 and ours["d"] == 8 and ours["note"] == "planted"
    assert ours["importance"] == basis.importance.tolist() and ours["fingerprint"] == basis.fingerprint()


def test_float64_export_keeps_float64(tmp_path):
    basis = planted_basis()
    export_sae_lens(basis, tmp_path, SOURCE, dtype=torch.float64)
    assert load_file(str(tmp_path / WEIGHTS_FILE))["W_dec"].dtype == torch.float64
    assert json.loads((tmp_path / CFG_FILE).read_text())["dtype"] == "float64"


def test_a_hook_outside_the_blocks_and_hook_z():
    embed = LinearBasis("hook_embed", *[getattr(planted_basis(), n) for n in
                                        ("C", "C_pinv", "eigenvalues", "activation_eigenvalues",
                                         "interaction_eigenvalues", "mean")])
    cfg = sae_lens_config(embed, SOURCE)
    assert cfg["hook_layer"] == 0 and cfg["reshape_activations"] == "none"
    z = LinearBasis("blocks.2.attn.hook_z", embed.C, embed.C_pinv, embed.eigenvalues, embed.activation_eigenvalues,
                    embed.interaction_eigenvalues, embed.mean)
    cfg = sae_lens_config(z, SOURCE)
    assert cfg["hook_layer"] == 2 and cfg["reshape_activations"] == "hook_z"


class NotAffine:
    """A basis with encode/decode but no C, C⁺ and μ (as a nonlinear kind would be)."""

    hook, kind, k, d = HOOK, "toy", 2, 2


def test_a_basis_that_is_not_affine_or_keeps_nothing_is_refused():
    with pytest.raises(ValueError, match="needs an affine basis"):
        sae_lens_weights(NotAffine())  # type: ignore[arg-type]
    empty = LinearBasis(HOOK, torch.zeros(0, 8, dtype=torch.float64), torch.zeros(8, 0, dtype=torch.float64),
                        torch.zeros(0, dtype=torch.float64), torch.zeros(0), torch.zeros(0),
                        torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="keeps no direction"):
        sae_lens_weights(empty)


@pytest.mark.parametrize("kwargs, error", [
    (dict(model_name=""), ValueError), (dict(context_size=0), ValueError), (dict(extra={"x": object()}), TypeError),
], ids=["empty-model-name", "zero-context", "extra-not-json"])
def test_source_is_validated(kwargs, error):
    with pytest.raises(error):
        SAELensSource(**{"model_name": "gpt2", "context_size": 128, "dataset_path": "d", **kwargs})


# --- the command on a real analysis folder -----------------------------------------------------

@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    tokens = torch.randint(0, 23, (48, 12), generator=torch.Generator().manual_seed(0))
    analyze(tiny_model(seed=0, dtype=torch.float32), tokens, out, max_tokens=None, batch_size=16, n_probes=2,
            stages=("grams", "jacobians"), progress=False, dataset="48 random sequences")
    return out


def test_export_writes_one_sae_folder_per_basis_and_hook(analysis_dir, tmp_path, capsys):
    out = tmp_path / "sae"
    assert main(["export", str(analysis_dir), "--format", "sae-lens", "--basis", "all", "--hooks", "blocks.1.*",
                 "--out", str(out)]) == 0
    assert "wrote 4 sae-lens folder(s)" in capsys.readouterr().out
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*")) == [
        f"{basis}/blocks.1.hook_resid_{where}" for basis in ("interaction", "pca") for where in ("post", "pre")]
    report = json.loads((analysis_dir / "report.json").read_text())
    for name, file in [("interaction", "basis.safetensors"), ("pca", "pca_basis.safetensors")]:
        basis = InteractionBasis.load(analysis_dir / file)[HOOK]
        folder = out / name / HOOK
        written = load_file(str(folder / WEIGHTS_FILE))
        expected = sae_lens_weights(basis, torch.float32)
        assert all(torch.equal(written[n], expected[n]) for n in expected)
        cfg = json.loads((folder / CFG_FILE).read_text())
        assert cfg["model_name"] == report["model"]["cfg"]["model_name"]  # no model named: the config's name
        assert cfg["context_size"] == 12 and cfg["dataset_path"] == "48 random sequences"
        assert cfg["dtype"] == "float32" and cfg["d_sae"] == 2 * basis.k and cfg["hook_name"] == HOOK
        assert cfg["tl_degeneracy"]["basis_kind"] == name and cfg["tl_degeneracy"]["analysis"] == str(analysis_dir)
        assert cfg["tl_degeneracy"]["model"]["weights_sha256"] == report["model"]["weights_sha256"]


def test_export_defaults_to_the_interaction_basis_at_every_hook_in_DIR(analysis_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(analysis_dir, run)
    assert main(["export", str(run), "--format", "sae-lens", "--dtype", "float64"]) == 0
    hooks = InteractionBasis.load(run / "basis.safetensors").hooks
    assert sorted(p.name for p in (run / "sae_lens" / "interaction").iterdir()) == sorted(hooks)
    assert not (run / "sae_lens" / "pca").exists()
    assert load_file(str(run / "sae_lens" / "interaction" / HOOK / WEIGHTS_FILE))["W_enc"].dtype == torch.float64


def test_a_failing_format_removes_the_folders_it_created(analysis_dir, tmp_path, capsys, monkeypatch):
    def broken(export):
        raise ValueError("the format could not be written")

    monkeypatch.setitem(export_cli.FORMATS, "sae-lens", broken)
    assert main(["export", str(analysis_dir), "--format", "sae-lens", "--out", str(tmp_path / "a" / "b")]) == 2
    assert_one_error_paragraph(capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


# --- bad input -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(analysis_dir, tmp_path_factory) -> Path:
    """Analysis folders with something missing or broken, and other bad inputs."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(analysis_dir, root / "run")
    for name, remove in [("pca_only", ["basis.safetensors"]), ("nobasis", ["basis.safetensors",
                                                                           "pca_basis.safetensors"])]:
        shutil.copytree(analysis_dir, root / name)
        for file in remove:
            (root / name / file).unlink()
    shutil.copytree(analysis_dir, root / "broken")
    (root / "broken" / "basis.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(analysis_dir, root / "badreport")
    (root / "badreport" / "report.json").write_text('{"format": "tl_degeneracy.report/2", "model"')
    (root / "unfinished").mkdir()
    (root / "unfinished" / "checkpoint.safetensors").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "afile").write_text("a file, not a folder\n")
    return root


@pytest.fixture
def workspace(folders, monkeypatch):
    monkeypatch.chdir(folders)
    return folders


SAE = ["--format", "sae-lens"]
# (id, argv, a phrase the message must contain)
ROWS = [
    ("dir-missing", ["export", "no-such-run", *SAE], "no such folder"),
    ("dir-is-a-file", ["export", "afile", *SAE], "is a file"),
    ("dir-without-analysis", ["export", "emptydir", *SAE], "no report.json"),
    ("dir-unfinished", ["export", "unfinished", *SAE], "--resume"),
    ("format-missing", ["export", "run"], "--format"),
    ("format-unknown", ["export", "run", "--format", "safetensors"], "invalid choice"),
    ("basis-unknown", ["export", "run", *SAE, "--basis", "random"], "invalid choice"),
    ("no-interaction-basis", ["export", "pca_only", *SAE], "without the 'jacobians' stage"),
    ("no-basis-at-all", ["export", "nobasis", *SAE, "--basis", "all"], "--rebuild"),
    ("basis-file-unreadable", ["export", "broken", *SAE], "cannot read"),
    ("report-unreadable", ["export", "badreport", *SAE], "not valid JSON"),
    ("hook-unknown", ["export", "run", *SAE, "--hooks", "blocks.0.hook_resid_pr"], "cover: blocks.0.hook_resid_pre"),
    ("hook-glob-matches-nothing", ["export", "run", *SAE, "--hooks", "blocks.9.*"], "no basis at"),
    ("hooks-without-names", ["export", "run", *SAE, "--hooks"], "--hooks"),
    ("dtype-unknown", ["export", "run", *SAE, "--dtype", "float8"], "invalid choice"),
    ("out-is-a-file", ["export", "run", *SAE, "--out", "afile"], "is a file"),
    ("out-under-a-file", ["export", "run", *SAE, "--out", "afile/sae"], "is a file"),
    ("out-unwritable-parent", ["export", "run", *SAE, "--out", "/proc/x"], "cannot write to --out /proc/x"),
]


@pytest.mark.parametrize("argv, phrase", [pytest.param(a, p, id=i) for i, a, p in ROWS])
def test_bad_input_is_one_error_paragraph(workspace, capsys, argv, phrase):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_error_paragraph(err)
    assert phrase in err, err
    assert not list(workspace.glob("*/sae_lens")), "a refused export created its output folder"


def test_bad_input_in_a_real_process_imports_no_torch(tmp_path):
    code = ("import sys, contextlib, io\n"
            "from tl_degeneracy.cli import main\n"
            "err = io.StringIO()\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
            "    codes = [main(['export', '--help']), main(['export', 'no-such-run', '--format', 'sae-lens'])]\n"
            "print(codes, 'torch' in sys.modules, err.getvalue().strip())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[0, 2] False error: no-such-run: no such folder"), result.stdout


def test_help_explains_every_option_and_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each option's help on one line
    assert main(["export", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    sub = action.choices["export"]
    for option in sub._actions:
        if isinstance(option, argparse._HelpAction):
            continue
        text = " ".join(sub._get_formatter()._expand_help(option).split())
        assert len(text.split()) >= 5, f"{option.dest}: explain it in a sentence"
        assert "(default:" in text or "required" in text, f"{option.dest}: no default shown"
        assert text in shown
