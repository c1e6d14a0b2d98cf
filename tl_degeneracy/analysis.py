"""The whole analysis a user runs from the command line, and its report on disk.

``analyze`` = collect (activations, Jacobians, head and neuron sync) → fit interaction and
PCA bases for the residual stream → degeneracy account → ``report.json`` → plots and a
self-contained ``report.html``. ``render`` rebuilds plots and HTML from the saved files.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .collect import collect
from .degeneracy_report import LOGITS, DegeneracyReport, degeneracy_hooks, degeneracy_report, weight_matrices
from .head_sync import SynchronizedHeads, synchronized_heads
from .hook_names import resolve_hooks
from .interaction_basis import InteractionBasis
from .neuron_sync import SynchronizedNeurons, synchronized_neurons
from .stats import Stats

REPORT_FORMAT = "tl_degeneracy.report/1"


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
class AnalysisReport:
    """What ``report.json`` holds; ``from_dict(to_dict())`` round-trips (tested)."""

    model: dict[str, Any]
    n_tokens: int
    seconds: float
    rtol: float
    n_probes: int
    spectra: dict[str, SpectrumSummary]
    degeneracy: DegeneracyReport
    synchronized_heads: SynchronizedHeads | None = None
    synchronized_neurons: SynchronizedNeurons | None = None
    format: str = REPORT_FORMAT
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "model": self.model, "n_tokens": self.n_tokens, "seconds": self.seconds,
            "rtol": self.rtol, "n_probes": self.n_probes,
            "spectra": {h: asdict(s) for h, s in self.spectra.items()},
            "degeneracy": self.degeneracy.to_dict(),
            "synchronized_heads": None if self.synchronized_heads is None else self.synchronized_heads.to_dict(),
            "synchronized_neurons": None if self.synchronized_neurons is None else self.synchronized_neurons.to_dict(),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalysisReport":
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a {REPORT_FORMAT} report (format={data.get('format')!r})")
        heads, neurons = data.get("synchronized_heads"), data.get("synchronized_neurons")
        return cls(
            model=data["model"], n_tokens=data["n_tokens"], seconds=data["seconds"], rtol=data["rtol"],
            n_probes=data["n_probes"], spectra={h: SpectrumSummary(**s) for h, s in data["spectra"].items()},
            degeneracy=DegeneracyReport.from_dict(data["degeneracy"]),
            synchronized_heads=None if heads is None else SynchronizedHeads.from_dict(heads),
            synchronized_neurons=None if neurons is None else SynchronizedNeurons.from_dict(neurons),
            format=data["format"], notes=data.get("notes", []),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "AnalysisReport":
        return cls.from_dict(json.loads(Path(path).read_text()))


def residual_hooks(model: torch.nn.Module) -> list[str]:
    n_layers = model.cfg.n_layers
    return resolve_hooks(model, [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
                         + [f"blocks.{n_layers - 1}.hook_resid_post"])


def build_report(model, stats: Stats, basis: InteractionBasis, pca: InteractionBasis, *, seconds: float,
                 rtol: float, head_threshold: float = 0.05, neuron_threshold: float = 1e-3) -> AnalysisReport:
    spectra = {
        h: SpectrumSummary(d=basis[h].d, ib_kept=basis[h].k, pca_kept=pca[h].k,
                           ib_dirs_99=basis[h].n_directions_for(0.99), pca_dirs_99=pca[h].n_directions_for(0.99),
                           top_lambda=basis[h].eigenvalues[:8].tolist(), thresholds=basis[h].thresholds)
        for h in basis.hooks
    }
    has = {g for g, _ in stats.accumulators}
    heads = synchronized_heads(stats, threshold=head_threshold, model=model) if "head_sync" in has else None
    neurons = synchronized_neurons(stats, threshold=neuron_threshold, model=model) if "neuron_sync" in has else None
    jac = stats.meta.get("jacobians") or {}
    return AnalysisReport(
        model=stats.meta["model"], n_tokens=stats.n_tokens, seconds=round(seconds, 1), rtol=rtol,
        n_probes=jac.get("n_probes") or 0, spectra=spectra, degeneracy=degeneracy_report(model, stats, rtol=rtol),
        synchronized_heads=heads, synchronized_neurons=neurons,
    )


def analyze(model: torch.nn.Module, data: Any, out: str | Path, *, hooks: list[str] | None = None,
            max_tokens: int | None = 8192, batch_size: int = 8, context: int | None = 128, n_probes: int = 4,
            rtol: float = 1e-8, resume: bool = False, progress: bool = True) -> AnalysisReport:
    """Run everything and write ``stats.safetensors``, ``basis.safetensors``, ``report.json``,
    ``plots/*.png`` and ``report.html`` to ``out``; a checkpoint allows ``resume``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    basis_hooks = resolve_hooks(model, hooks) if hooks else residual_hooks(model)
    all_hooks = list(dict.fromkeys(basis_hooks + degeneracy_hooks(model)))
    # M is needed only where a basis is fitted and at weight matrices' outputs (K, MATH.md §3).
    m_hooks = list(dict.fromkeys(basis_hooks + [w.output_hook for w in weight_matrices(model) if w.output_hook != LOGITS]))
    start = time.time()
    stats = collect(model, data, all_hooks, batch_size=batch_size, context=context, max_tokens=max_tokens,
                    jacobians=True, jacobian_hooks=m_hooks, n_probes=n_probes, checkpoint=out / "checkpoint.safetensors", resume=resume,
                    checkpoint_every=10, head_sync=True, neuron_sync=True, progress=progress)
    stats.save(out / "stats.safetensors")
    basis = InteractionBasis.fit(stats, hooks=basis_hooks, rtol=rtol)
    basis.save(out / "basis.safetensors")
    pca = InteractionBasis.fit(stats, hooks=basis_hooks, scaling="pca", rtol=rtol)
    pca.save(out / "pca_basis.safetensors")
    report = build_report(model, stats, basis, pca, seconds=time.time() - start, rtol=rtol)
    report.save(out / "report.json")
    render(out)
    return report


def render(out: str | Path) -> Path:
    """(Re)draw ``plots/`` and ``report.html`` from the files ``analyze`` saved in ``out``."""
    from . import plots
    from .report_html import write_html

    out = Path(out)
    report = AnalysisReport.load(out / "report.json")
    basis = InteractionBasis.load(out / "basis.safetensors")
    pca = InteractionBasis.load(out / "pca_basis.safetensors")
    stats = Stats.load(out / "stats.safetensors")
    figures: dict[str, list[Path]] = {"spectra": [], "cumulative": [], "heads": [], "parameters": []}
    for hook in basis.hooks:
        figures["spectra"].append(plots.spectra(basis[hook], out / "plots" / f"spectrum_{hook}.png"))
    figures["cumulative"].append(plots.cumulative(basis.layers, pca.layers, out / "plots" / "cumulative.png"))
    if report.synchronized_heads is not None:
        for layer in report.synchronized_heads.layers:
            tv = stats.head_sync(layer)["tv"]
            figures["heads"].append(plots.head_sync_heatmap(tv, layer, report.synchronized_heads.threshold,
                                                            out / "plots" / f"heads_layer{layer}.png"))
    if report.degeneracy.per_layer:
        figures["parameters"].append(plots.effective_parameters(report.degeneracy.per_layer,
                                                                out / "plots" / "parameters.png"))
    return write_html(report, figures, out / "report.html")
