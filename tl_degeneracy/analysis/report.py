"""``report.json``: what an analysis found, typed, and how it is read back.

``AnalysisReport.from_dict(to_dict())`` round-trips; a report.json written by an earlier release of
the same format (``tl_degeneracy.report/2``) loads and writes back unchanged (tested). The
follow-up sections (interaction graph, SGLD) are ``sections``'s.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..degeneracy.account import DegeneracyReport
from ..sync.heads import SynchronizedHeads
from ..sync.neurons import SynchronizedNeurons
from .sections import InteractionsSection, LLCSection

REPORT_FORMAT = "tl_degeneracy.report/2"


@dataclass
class SpectrumSummary:
    d: int
    ib_kept: int
    pca_kept: int
    ib_dirs_99: int
    pca_dirs_99: int
    top_lambda: list[float]
    thresholds: dict[str, float]


@dataclass
class Provenance:
    """Where the numbers came from."""

    dataset: str  # what the user passed (or "embedded default text", "token tensor", ...)
    package_version: str
    run: dict[str, Any]  # the collection's RunRecord: model identity, tokenizer, RunConfig
    analysis: dict[str, Any]  # AnalysisConfig


@dataclass
class AnalysisReport:
    """What ``report.json`` holds; ``from_dict(to_dict())`` round-trips (tested)."""

    model: dict[str, Any]
    n_tokens: int
    seconds: float
    rtol: float
    n_probes: int
    spectra: dict[str, SpectrumSummary]
    degeneracy: DegeneracyReport
    provenance: Provenance
    synchronized_heads: SynchronizedHeads | None = None
    synchronized_neurons: SynchronizedNeurons | None = None
    format: str = REPORT_FORMAT
    notes: list[str] = field(default_factory=list)
    interactions: InteractionsSection | None = None  # analysis.interactions: sparsity, modules, ablation curves
    llc: LLCSection | None = None  # analysis.llc: sampled N_eff(ε) per part beside the K-FAC count at γε

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "model": self.model, "n_tokens": self.n_tokens, "seconds": self.seconds,
            "rtol": self.rtol, "n_probes": self.n_probes,
            "provenance": asdict(self.provenance),
            "spectra": {h: asdict(s) for h, s in self.spectra.items()},
            "degeneracy": self.degeneracy.to_dict(),
            "synchronized_heads": None if self.synchronized_heads is None else self.synchronized_heads.to_dict(),
            "synchronized_neurons": None if self.synchronized_neurons is None else self.synchronized_neurons.to_dict(),
            "notes": self.notes,
            "interactions": None if self.interactions is None else self.interactions.to_dict(),
            "llc": None if self.llc is None else self.llc.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisReport:
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a {REPORT_FORMAT} report (format={data.get('format')!r}); re-run the analysis")
        heads, neurons = data.get("synchronized_heads"), data.get("synchronized_neurons")
        interactions, llc = data.get("interactions"), data.get("llc")
        return cls(
            model=data["model"], n_tokens=data["n_tokens"], seconds=data["seconds"], rtol=data["rtol"],
            n_probes=data["n_probes"], spectra={h: SpectrumSummary(**s) for h, s in data["spectra"].items()},
            degeneracy=DegeneracyReport.from_dict(data["degeneracy"]),
            provenance=Provenance(**data["provenance"]),
            synchronized_heads=None if heads is None else SynchronizedHeads.from_dict(heads),
            synchronized_neurons=None if neurons is None else SynchronizedNeurons.from_dict(neurons),
            format=data["format"], notes=data.get("notes", []),
            interactions=None if interactions is None else InteractionsSection.from_dict(interactions),
            llc=None if llc is None else LLCSection.from_dict(llc),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> AnalysisReport:
        return cls.from_dict(json.loads(Path(path).read_text()))
