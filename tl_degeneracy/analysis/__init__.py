"""The analysis a user runs, and its folder on disk (``tl-degeneracy analyze``, ``report``, follow-ups).

- ``pipeline``: ``AnalysisConfig`` (the run's options and stages) and ``analyze``.
- ``report``: ``AnalysisReport``, what report.json holds; ``sections``: the typed follow-up sections.
- ``files``: the folder's file names and ``load_analysis``.
- ``interactions``, ``llc``: the follow-up analyses (interaction graph, SGLD) of a finished folder.
- ``render``, ``html``, ``plots``: plots and the self-contained report.html, from the files alone.
"""
from .files import load_analysis
from .interactions import interactions_analysis
from .llc import llc_analysis
from .pipeline import ALL_STAGES, AnalysisConfig, Stage, analyze, build_report, collection_config
from .render import render
from .report import REPORT_FORMAT, AnalysisReport, Provenance, SpectrumSummary
from .sections import InteractionsConfig, InteractionsSection, LLCAnalysisConfig, LLCSection

__all__ = [
    "load_analysis", "interactions_analysis", "llc_analysis", "ALL_STAGES", "AnalysisConfig", "Stage", "analyze",
    "build_report", "collection_config", "render", "REPORT_FORMAT", "AnalysisReport", "Provenance",
    "SpectrumSummary", "InteractionsConfig", "InteractionsSection", "LLCAnalysisConfig", "LLCSection",
]
