"""Small versions of the benchmark scripts: they run, print their figures, and memory stays flat.

The full-size figures (GPT-2-small-shaped model) come from ``python benchmarks/run_all.py``;
here the memory-growth criterion is asserted on a tiny model, and the timing scripts are
checked for what they print (every figure run_all's summary table reads, self-consistent and
finite). Timing targets are not asserted: the machine is shared, so only bounds that a broken
script or a pathologically slow ``collect`` would cross.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULT_PREFIX = "RESULT "
# Far above any honest quick-mode figure (≈ 0.5–1.5 on 2 busy cores), far below a collect that
# does something it should not (e.g. a backward pass per hook, or the model run twice over).
GENEROUS_RATIO_BOUND = 8.0


def _run(script: str, *args: str, timeout: float = 300) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    assert lines, f"{script} printed no result line:\n{proc.stdout}"
    return json.loads(lines[-1][len(RESULT_PREFIX):]), proc.stdout


def _summary_rows(name: str, result: dict) -> list[tuple[str, str, str, str]]:
    """The rows ``benchmarks/run_all.py`` prints for this result (so its table cannot break silently)."""
    spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS / "run_all.py")
    assert spec is not None and spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    return run_all.rows_of(name, result)


def _check_timing(result: dict) -> None:
    for item, t in result["timing"].items():
        assert set(t) >= {"all", "min", "median", "max"}, item
        assert 0 < t["min"] <= t["median"] <= t["max"] and all(math.isfinite(x) for x in t["all"]), (item, t)


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.models
def test_memory_growth_quick_is_flat():
    # tiny model; N = 512 tokens vs 10 N, each in a fresh subprocess (both at once)
    result, out = _run("memory_growth.py", "--quick", "--parallel")
    assert "GROWTH of peak RSS" in out
    assert result["big"]["n_tokens"] == 10 * result["small"]["n_tokens"]
    assert result["small"]["peak_kib"] > 0 and result["big"]["peak_kib"] > 0
    assert result["growth"] < 0.10, out
    assert result["met"] is True
    rows = _summary_rows("memory_growth", result)
    assert rows[0][0].startswith("peak RSS growth") and rows[0][3] == "met"


@pytest.mark.models
def test_collect_overhead_quick_prints_a_ratio():
    result, out = _run("collect_overhead.py", "--quick", "--layers", "2")
    assert "RATIO time_collect / time_plain" in out and "where the time goes" in out
    assert result["benchmark"] == "collect_overhead"
    assert set(result) >= {"ratio", "ratio_vs_blocks_only", "ratio_without_fixed_cost", "ratio_projected_early_stop",
                           "target", "met", "tokens_per_s", "per_batch_s", "fixed_per_call_s", "timing", "config",
                           "env"}
    assert result["config"]["n_layers"] == 2
    assert set(result["tokens_per_s"]) == {"plain", "plain_blocks", "collect"}
    _check_timing(result)
    ratio = result["ratio"]
    assert _finite_positive(ratio) and ratio < GENEROUS_RATIO_BOUND, ratio
    # the figures are what they claim to be: ratio of the medians, verdict against the target
    med = {k: v["median"] for k, v in result["timing"].items()}
    assert ratio == pytest.approx(med["collect"] / med["plain"], rel=1e-9)
    assert result["met"] == (ratio <= result["target"])
    n_tokens = result["config"]["batches"] * result["config"]["batch_size"] * result["config"]["context"]
    assert result["tokens_per_s"]["collect"] == pytest.approx(n_tokens / med["collect"], rel=1e-9)
    assert all(_finite_positive(v) for v in result["per_batch_s"].values()), result["per_batch_s"]
    rows = _summary_rows("collect_overhead", result)
    assert rows[0][:3] == ("time collect / time plain model(tokens)", f"{ratio:.3f}", "<= 1.10")
    assert len(rows) == 5


@pytest.mark.models
def test_jacobian_overhead_quick_prints_a_ratio():
    result, out = _run("jacobian_overhead.py", "--quick")
    assert "where the time goes" in out
    assert set(result) >= {"ratio", "ratio_without_fixed_cost", "ratio_vs_backward_with_weight_grads", "target",
                           "met", "tokens_per_s", "per_batch_s", "timing", "config", "env"}
    assert result["config"]["n_probes"] == 2
    _check_timing(result)
    ratio = result["ratio"]
    # collect = one forward with graph + S backward passes to every hook, the baseline S to one hook
    assert _finite_positive(ratio) and ratio < GENEROUS_RATIO_BOUND, ratio
    med = {k: v["median"] for k, v in result["timing"].items()}
    assert ratio == pytest.approx(med["collect"] / med["grad_resid0"], rel=1e-9)
    assert result["met"] == (ratio <= result["target"])
    rows = _summary_rows("jacobian_overhead", result)
    assert rows[0][1] == f"{ratio:.3f}" and len(rows) == 3
