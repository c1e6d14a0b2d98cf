"""Plots and ``report.html`` of an analysis folder, (re)drawn from the files on disk alone."""
from __future__ import annotations

from pathlib import Path

from ..basis.bases import InteractionBasis
from ..collection.stats import Stats
from ..sync.heads import HEAD_SYNC, head_sync_matrices
from . import plots
from .files import BASIS_FILE, EDGES_FILE, HTML_FILE, PCA_FILE, PLOTS_DIR, REPORT_FILE, STATS_FILE
from .html import write_html
from .interactions import interaction_figures
from .llc import llc_figures
from .report import AnalysisReport


def render(out: str | Path) -> Path:
    """(Re)draw ``plots/`` and ``report.html`` from the files ``analyze`` saved in ``out``."""
    out = Path(out)
    report = AnalysisReport.load(out / REPORT_FILE)
    basis = InteractionBasis.load(out / BASIS_FILE) if (out / BASIS_FILE).is_file() else None
    pca = InteractionBasis.load(out / PCA_FILE) if (out / PCA_FILE).is_file() else None
    stats = Stats.load(out / STATS_FILE, groups=[HEAD_SYNC])  # only what the figures read
    folder = out / PLOTS_DIR
    figures: dict[str, list[Path]] = {"summary": [], "spectra": [], "cumulative": [], "heads": [], "parameters": []}
    summary = plots.cross_layer_summary(report, basis, folder / "summary.png")
    if summary is not None:
        figures["summary"].append(summary)
    shown = basis if basis is not None else pca
    if shown is not None:
        for hook in shown.hooks:
            figures["spectra"].append(plots.spectra(shown[hook], folder / f"spectrum_{hook}.png"))
    if basis is not None and pca is not None:
        figures["cumulative"].append(plots.cumulative(basis.layers, pca.layers, folder / "cumulative.png"))
    heads = report.synchronized_heads
    if heads is not None:
        tvs = {layer: head_sync_matrices(stats, layer).tv for layer in heads.layers}
        vmax = max((float(tv.max()) for tv in tvs.values()), default=1.0)
        for layer, tv in tvs.items():
            figures["heads"].append(plots.head_sync_heatmap(tv, layer, heads.threshold,
                                                            folder / f"heads_layer{layer}.png", vmax=vmax))
    if report.degeneracy is not None and report.degeneracy.per_layer:
        figures["parameters"].append(plots.effective_parameters(report.degeneracy.per_layer,
                                                                folder / "parameters.png"))
    if report.interactions is not None and (out / EDGES_FILE).is_file():
        figures.update(interaction_figures(out, report.interactions))
    if report.llc is not None:
        figures.update(llc_figures(out, report.llc))
    explore = "explore/index.html" if (out / "explore" / "index.html").is_file() else None
    return write_html(report, figures, out / HTML_FILE, explore=explore)
