"""``report.json``: what an analysis found, typed, and how it is read back.

``AnalysisReport.from_dict(to_dict())`` round-trips; a report.json written by an earlier release of
the same format (``tl_degeneracy.report/2``) loads and writes back unchanged (tested). The
follow-up sections (interaction graph, SGLD) are ``sections``'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..degeneracy.account import DegeneracyReport
from ..sync.heads import SynchronizedHeads
from ..sync.neurons import SynchronizedNeurons
from .outliers import HookOutliers
from .sections import InteractionsSection, LLCSection

REPORT_FORMAT = "tl_degeneracy.report/2"


@dataclass
class SpectrumSummary:
    """One basis hook: kept directions and how many carry 99% (interaction basis: of ΣΛ; PCA: of the
    variance); None for the interaction basis without the jacobians stage. ``data_limited``: fewer than
    ``DATA_FACTOR``× as many datapoints as coordinates. ``without_outliers``: the same figures with the
    flagged massive-activation coordinates left out (``outliers``)."""

    d: int
    ib_kept: int | None
    pca_kept: int | None
    ib_dirs_99: int | None
    pca_dirs_99: int | None
    top_lambda: list[float]
    thresholds: dict[str, float]
    n_datapoints: int | None = None
    data_limited: bool | None = None
    without_outliers: dict[str, Any] | None = None


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
    degeneracy: DegeneracyReport | None  # None without the account stage (or when it failed: ``errors``)
    provenance: Provenance
    synchronized_heads: SynchronizedHeads | None = None
    synchronized_neurons: SynchronizedNeurons | None = None
    format: str = REPORT_FORMAT
    notes: list[str] = field(default_factory=list)
    interactions: InteractionsSection | None = None  # analysis.interactions: sparsity, modules, ablation curves
    llc: LLCSection | None = None  # analysis.llc: sampled N_eff(ε) per part beside the K-FAC count at γε
    outliers: dict[str, HookOutliers] = field(default_factory=dict)  # hooks with massive-activation coordinates
    errors: dict[str, str] = field(default_factory=dict)  # section → why it could not be computed

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "model": self.model, "n_tokens": self.n_tokens, "seconds": self.seconds,
            "rtol": self.rtol, "n_probes": self.n_probes,
            "provenance": asdict(self.provenance),
            "spectra": {h: asdict(s) for h, s in self.spectra.items()},
            "degeneracy": None if self.degeneracy is None else self.degeneracy.to_dict(),
            "synchronized_heads": None if self.synchronized_heads is None else self.synchronized_heads.to_dict(),
            "synchronized_neurons": None if self.synchronized_neurons is None else self.synchronized_neurons.to_dict(),
            "notes": self.notes,
            "interactions": None if self.interactions is None else self.interactions.to_dict(),
            "llc": None if self.llc is None else self.llc.to_dict(),
            "outliers": {h: o.to_dict() for h, o in self.outliers.items()},
            "errors": self.errors,
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
            degeneracy=None if data.get("degeneracy") is None else DegeneracyReport.from_dict(data["degeneracy"]),
            provenance=Provenance(**data["provenance"]),
            synchronized_heads=None if heads is None else SynchronizedHeads.from_dict(heads),
            synchronized_neurons=None if neurons is None else SynchronizedNeurons.from_dict(neurons),
            format=data["format"], notes=data.get("notes", []),
            interactions=None if interactions is None else InteractionsSection.from_dict(interactions),
            llc=None if llc is None else LLCSection.from_dict(llc),
            outliers={h: HookOutliers.from_dict(o) for h, o in data.get("outliers", {}).items()},
            errors=dict(data.get("errors", {})),
        )

    def save(self, path: str | Path) -> None:
        """Atomically (a temporary file renamed): a crash never leaves half a report."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> AnalysisReport:
        """Read report.json; a file that is not (whole) JSON is a ValueError that says how to rebuild it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}; "
                             f"{path.stat().st_size} bytes): it may have been cut short. The statistics it was made "
                             f"from are kept: rebuild it with `tl-degeneracy report {path.parent}`") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not text: rebuild it with `tl-degeneracy report {path.parent}`") from None
        return cls.from_dict(data)
