"""Small versions of the benchmark scripts: they run, print their figures, and memory stays flat.

The full-size figures (GPT-2-small-shaped model) come from ``python benchmarks/run_all.py``;
here only the memory-growth criterion is asserted, on a tiny model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULT_PREFIX = "RESULT "


def _run(script: str, *args: str, timeout: float = 300) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    assert lines, f"{script} printed no result line:\n{proc.stdout}"
    return json.loads(lines[-1][len(RESULT_PREFIX):]), proc.stdout


@pytest.mark.models
def test_memory_growth_quick_is_flat():
    # tiny model; N = 512 tokens vs 10 N, each in a fresh subprocess (both at once)
    result, out = _run("memory_growth.py", "--quick", "--parallel")
    assert "GROWTH of peak RSS" in out
    assert result["big"]["n_tokens"] == 10 * result["small"]["n_tokens"]
    assert result["small"]["peak_kib"] > 0 and result["big"]["peak_kib"] > 0
    assert result["growth"] < 0.10, out


@pytest.mark.models
def test_collect_overhead_quick_prints_a_ratio():
    result, out = _run("collect_overhead.py", "--quick", "--layers", "2")
    assert "RATIO time_collect / time_plain" in out
    assert result["config"]["n_layers"] == 2
    assert result["ratio"] > 0 and result["tokens_per_s"]["collect"] > 0  # no target asserted: timing is noisy
