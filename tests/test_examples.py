"""Every example in examples/ runs as written, in reduced form: three on the embedded default
model, the mod-add one on the shipped RIB checkpoint (the MiniLM one: tests/test_minilm.py).

Each example runs in its own process, exactly as a user would start it. The three are started
together (single-threaded each, so they share the cores instead of fighting over them) and
each test waits for its own. ``detect_synchronized_heads.py`` is run with ``--model gpt2`` and
the hub made unreachable, so it also checks the offline fallback to the embedded model.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tl_degeneracy.default_model import DEFAULT_MODEL_NAME, default_tl_config

pytestmark = pytest.mark.models

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TIMEOUT = 300
CFG = default_tl_config()
REDUCED = ["--tokens", "2000", "--batch-size", "8", "--context", "64"]


def _env(offline_hub: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["TQDM_DISABLE"] = "1"
    if offline_hub:
        # An endpoint nothing answers on: load_pretrained's reachability check fails at once,
        # as on a machine without network (HF_HUB_OFFLINE=0 so the check is made at all).
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
        env["HF_HUB_OFFLINE"] = "0"
    return env


class Run:
    def __init__(self, script: str, args: list[str], cwd: Path, offline_hub: bool = False):
        self.cmd = [sys.executable, str(EXAMPLES / script), *args]
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=_env(offline_hub), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._out: tuple[str, str] | None = None

    def result(self) -> str:
        """Wait, assert exit code 0, return stdout."""
        if self._out is None:
            try:
                self._out = self.proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._out = self.proc.communicate()
                pytest.fail(f"{' '.join(self.cmd)} did not finish in {TIMEOUT} s\n"
                            f"{self._out[0]}\n{self._out[1][-3000:]}")
        stdout, stderr = self._out
        assert self.proc.returncode == 0, (f"{' '.join(self.cmd)} exited {self.proc.returncode}\n"
                                           f"--- stdout\n{stdout}\n--- stderr\n{stderr[-5000:]}")
        return stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("examples")
    started = {
        "analyze": Run("analyze_gpt2.py", ["--model", "default", *REDUCED, "--out", str(work / "out")], work),
        "swap": Run("swap_residual_to_interaction_basis.py",
                    ["--model", "default", *REDUCED, "--eval-tokens", "512"], work),
        "heads": Run("detect_synchronized_heads.py", ["--model", "gpt2", *REDUCED], work, offline_hub=True),
        "modadd": Run("modadd_interaction_basis.py", ["--n", "200", "--out", str(work / "modadd.md")], work),
        "modadd_ix": Run("modadd_interactions.py", ["--n", "100", "--out", str(work / "modadd_ix.md")], work),
        "modadd_fourier": Run("modadd_fourier.py", ["--n", "200", "--top", "3",
                                                    "--out", str(work / "modadd_fourier.md")], work),
    }
    yield {"work": work, **started}
    for run in started.values():
        run.stop()


def test_analyze_gpt2(runs):
    out = runs["analyze"].result()
    L = CFG["n_layers"]
    assert "== Degeneracy report ==" in out
    assert "thresholds:" in out and "K-FAC eps =" in out
    # nominal vs effective table: one row per layer, the unembedding and the total
    table = dict(re.findall(r"^\s*(\d+|unembed|total)\s+([\d,]+)\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+[\d,]+\*?\s+[\d.]+%$",
                            out, flags=re.M))
    assert set(table) == {*map(str, range(L)), "unembed", "total"}, out
    nominal = {k: int(v.replace(",", "")) for k, v in table.items()}
    assert nominal["total"] == sum(v for k, v in nominal.items() if k != "total")
    assert "== Residual stream: interaction basis vs PCA ==" in out
    for l in range(L):
        assert re.search(rf"^blocks\.{l}\.hook_resid_pre\s+{CFG['d_model']}\s+\d+", out, flags=re.M)

    folder = runs["work"] / "out"
    from tl_degeneracy import DegeneracyReport, Stats
    from tl_degeneracy.sync.heads import SynchronizedHeads
    from tl_degeneracy.sync.neurons import SynchronizedNeurons

    report = DegeneracyReport.from_json((folder / "report.json").read_text())
    assert report.totals.nominal_weights == nominal["total"]
    # the account records the synchronisation thresholds; the blocks themselves are in summary.json
    assert (report.head_threshold, report.neuron_threshold) == (0.05, 1e-3)
    stats = Stats.load(folder / "stats.safetensors")
    assert stats.n_tokens >= 2000 and f"blocks.{L - 1}.hook_resid_post" in stats.jacobian_hooks
    assert stats.run.jacobians["n_probes"] == 4 and stats.run.config["context"] == 64
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n_tokens"] == stats.n_tokens and set(summary["per_layer"]) == set(nominal) - {"total"}
    assert summary["model"] == stats.run.model
    assert summary["totals"]["nominal_weights"] == nominal["total"]
    heads = SynchronizedHeads.from_dict(summary["synchronized_heads"])
    neurons = SynchronizedNeurons.from_dict(summary["synchronized_neurons"])
    assert heads.threshold == 0.05 and neurons.threshold == 1e-3
    assert heads.total_freedoms == report.totals.synchronized_head_freedoms
    assert neurons.total_added_freedoms == report.totals.synchronized_neuron_freedoms


ROW = re.compile(r"^(IB|PCA)\s+(\d+)/(\d+)\*?\s+(\S+)\s+(\S+)\s+(\S+)", flags=re.M)


def test_swap_residual_to_interaction_basis(runs):
    out = runs["swap"].result()
    d, layer = CFG["d_model"], CFG["n_layers"] // 2
    hook = f"blocks.{layer}.hook_resid_pre"
    assert re.search(rf"cache\['{re.escape(hook)}\.hook_ib'\]\.shape = \(2, 64, \d+\)", out), out
    assert f"ablation at {hook}" in out
    rows = {(basis, int(kept)): (float(mse), float(kl), float(dce))
            for basis, kept, dd, mse, kl, dce in ROW.findall(out)}
    kept = sorted({k for _, k in rows}, reverse=True)
    assert kept[0] == d and kept[-1] == 0 and d // 2 in kept and d // 4 in kept, out
    assert all((basis, k) in rows for basis in ("IB", "PCA") for k in kept), out
    for basis in ("IB", "PCA"):
        mse_all, kl_all, _ = rows[(basis, d)]
        mse_none, kl_none, _ = rows[(basis, 0)]
        assert mse_none > 0 and kl_none > 0
        assert mse_all <= 1e-6 * mse_none and abs(kl_all) <= 1e-6 * kl_none, (basis, out)  # k = all: ~0
        assert rows[(basis, d // 4)][0] < mse_none  # keeping a quarter beats keeping nothing
        assert all(math.isfinite(v) for k in kept for v in rows[(basis, k)])
    # Both bases ablate everything at k = 0: the same mean ablation.
    assert rows[("IB", 0)][0] == pytest.approx(rows[("PCA", 0)][0], rel=1e-3)


def test_detect_synchronized_heads_with_gpt2_offline_fallback(runs):
    out = runs["heads"].result()
    assert out.startswith("note: cannot load 'gpt2'") and DEFAULT_MODEL_NAME in out.splitlines()[0], out
    L, H = CFG["n_layers"], CFG["n_heads"]
    assert "threshold: 0.05" in out
    layers = re.findall(r"^\s*(\d+)\s+(none|\{[\d, ]+\}).*heads \d+,\d+: [\d.]+$", out, flags=re.M)
    assert [int(l) for l, _ in layers] == list(range(L)), out
    match = re.search(r"tv distance between heads, layer (\d+)", out)
    assert match and 0 <= int(match.group(1)) < L
    matrix = re.findall(r"^\s+h(\d+)((?:\s+\d\.\d{3}){" + str(H) + r"})$", out, flags=re.M)
    assert [int(h) for h, _ in matrix] == list(range(H)), out
    values = [[float(v) for v in row.split()] for _, row in matrix]
    assert all(values[i][i] == 0 for i in range(H))
    assert all(values[i][j] == values[j][i] and 0 <= values[i][j] <= 1 for i in range(H) for j in range(H))
    assert re.search(r"^synchronized heads add [\d,]+ free parameter directions", out, flags=re.M)


def test_modadd_interaction_basis(runs):
    runs["modadd"].result()
    table = (runs["work"] / "modadd.md").read_text()
    for hook in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"):
        assert hook in table, table



def test_modadd_interactions(runs):
    runs["modadd_ix"].result()
    text = (runs["work"] / "modadd_ix.md").read_text()
    for section in ("## Sparsity", "## Modules", "## Ablation curves"):
        assert section in text, text
    for basis in ("interaction", "pca", "standard"):
        assert f"| {basis} |" in text


def test_modadd_fourier(runs):
    runs["modadd_fourier"].result()
    text = (runs["work"] / "modadd_fourier.md").read_text()
    for hook in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
        for basis in ("interaction", "pca"):
            assert f"## `blocks.0.{hook}`, {basis}" in text, text
    rows = re.findall(r"^\| `hook_resid_\w+` \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text,
                      flags=re.M)
    assert len(rows) == 12, text  # 3 hooks × (interaction, pca, standard, random)
    for _, s1, s2, s5, key in rows:
        assert 0 <= float(s1) <= float(s2) <= float(s5) <= 1.0005 and 0 <= float(key) <= 1.0005
