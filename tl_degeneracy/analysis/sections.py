"""The follow-up sections of ``report.json``, typed: the interaction graph and the SGLD effective count.

Each section is what one follow-up analysis (``analysis.interactions``, ``analysis.llc``) adds to a
finished analysis folder, with its options (``InteractionsConfig``, ``LLCAnalysisConfig``). The
report, the HTML page and the command line read these attributes; ``to_dict`` writes exactly the
JSON earlier releases wrote (a report.json of 0.2.0 loads and writes back unchanged, tested).
"""
from __future__ import annotations

from .interactions_section import (
    AblationSection,
    InteractionsConfig,
    InteractionsSection,
    ModuleRow,
    RandomCutsSummary,
    SparsityRow,
)
from .llc_section import LLCAnalysisConfig, LLCPart, LLCSection

__all__ = ["AblationSection", "InteractionsConfig", "InteractionsSection", "ModuleRow", "RandomCutsSummary",
           "SparsityRow", "LLCAnalysisConfig", "LLCPart", "LLCSection"]
