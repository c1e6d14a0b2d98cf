"""An analysis folder: the names of its files, and reading a finished one back.

``analyze`` writes ``stats.safetensors`` (the float64 sums), ``basis.safetensors`` and
``pca_basis.safetensors`` (the fitted bases), ``report.json`` and ``report.html`` (with ``plots/``);
while collecting, ``checkpoint.safetensors``. The follow-up analyses add ``interactions.safetensors``
(with ``interactions_checkpoint.safetensors`` while streaming edges) and ``llc.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..collection.stats import Stats
from ..generations import HookedModel, describe_model
from .report import AnalysisReport

ANALYSIS_FILE = "analysis.json"  # what was asked: written before anything runs
STATS_FILE = "stats.safetensors"
BASIS_FILE = "basis.safetensors"
PCA_FILE = "pca_basis.safetensors"
REPORT_FILE = "report.json"
HTML_FILE = "report.html"
PLOTS_DIR = "plots"
CHECKPOINT_FILE = "checkpoint.safetensors"
EDGES_FILE = "interactions.safetensors"
EDGES_CHECKPOINT_FILE = "interactions_checkpoint.safetensors"
LLC_FILE = "llc.json"


def load_analysis(out: str | Path, model: HookedModel) -> tuple[AnalysisReport, Stats]:
    """The report and statistics of the analysis folder ``out``, refused unless ``model`` is the
    model it was analysed with (the follow-up analyses, interactions and SGLD, build on both)."""
    out = Path(out)
    report = AnalysisReport.load(out / REPORT_FILE)
    stats = Stats.load(out / STATS_FILE)
    assert stats.run is not None
    if describe_model(model) != stats.run.model:
        raise ValueError(f"the model differs from the one {out} was analysed with (its identity card: config, "
                         "weights checksum, dtype); pass the same model")
    return report, stats


def has_analysis(out: str | Path, needs: tuple[str, ...] = ()) -> bool:
    out = Path(out)
    return (out / REPORT_FILE).is_file() and all((out / n).is_file() for n in needs)


__all__: list[Any] = ["ANALYSIS_FILE", "STATS_FILE", "BASIS_FILE", "PCA_FILE", "REPORT_FILE", "HTML_FILE", "PLOTS_DIR",
                      "CHECKPOINT_FILE", "EDGES_FILE", "EDGES_CHECKPOINT_FILE", "LLC_FILE", "load_analysis",
                      "has_analysis"]
