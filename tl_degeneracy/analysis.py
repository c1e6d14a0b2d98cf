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

from .collect import collect
from .config import JacobianConfig, RunConfig
from .degeneracy_report import LOGITS, DegeneracyReport, degeneracy_hooks, degeneracy_report, weight_matrices
from .generations import HookedModel
from .head_sync import HeadSync, SynchronizedHeads, synchronized_heads
from .hook_names import residual_hooks, resolve_hooks
from .interaction_basis import InteractionBasis
from .linalg import DEFAULT_RTOL
from .neuron_sync import NeuronSync, SynchronizedNeurons, synchronized_neurons
from .stats import Stats

REPORT_FORMAT = "tl_degeneracy.report/2"
CHECKPOINT_NAME = "checkpoint.safetensors"
DEFAULT_CONTEXT = 128


@dataclass(frozen=True)
class AnalysisConfig:
    """The options of ``analyze`` (recorded in report.json next to the collection's ``RunConfig``).

    ``hooks``: where interaction bases are fitted (None: the residual stream, ``residual_hooks``);
    ``context`` None means ``min(128, n_ctx)``; thresholds as in ``synchronized_heads`` /
    ``synchronized_neurons``; ``rtol`` is the package's one eigenvalue convention (``linalg``).
    """

    hooks: tuple[str, ...] | None = None
    max_tokens: int | None = 8192
    batch_size: int = 8
    context: int | None = None
    n_probes: int = 4
    rtol: float = DEFAULT_RTOL
    head_threshold: float = 0.05
    neuron_threshold: float = 1e-3

    def __post_init__(self) -> None:
        if self.hooks is not None:
            object.__setattr__(self, "hooks", tuple([self.hooks] if isinstance(self.hooks, str) else self.hooks))
        if not self.rtol >= 0:
            raise ValueError(f"rtol must be >= 0, got {self.rtol}")
        if not 0 <= self.head_threshold <= 1:
            raise ValueError(f"head_threshold is a total-variation distance in [0, 1], got {self.head_threshold}")
        if not self.neuron_threshold >= 0:
            raise ValueError(f"neuron_threshold must be >= 0, got {self.neuron_threshold}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hooks"] = None if self.hooks is None else list(self.hooks)
        return out


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
    interactions: dict[str, Any] | None = None  # interactions.run: edges' sparsity, modules, ablation curves
    llc: dict[str, Any] | None = None  # llc.run: sampled N_eff(ε) per part beside the K-FAC count at γε

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
            "interactions": self.interactions,
            "llc": self.llc,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisReport:
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a {REPORT_FORMAT} report (format={data.get('format')!r}); re-run the analysis")
        heads, neurons = data.get("synchronized_heads"), data.get("synchronized_neurons")
        return cls(
            model=data["model"], n_tokens=data["n_tokens"], seconds=data["seconds"], rtol=data["rtol"],
            n_probes=data["n_probes"], spectra={h: SpectrumSummary(**s) for h, s in data["spectra"].items()},
            degeneracy=DegeneracyReport.from_dict(data["degeneracy"]),
            provenance=Provenance(**data["provenance"]),
            synchronized_heads=None if heads is None else SynchronizedHeads.from_dict(heads),
            synchronized_neurons=None if neurons is None else SynchronizedNeurons.from_dict(neurons),
            format=data["format"], notes=data.get("notes", []), interactions=data.get("interactions"),
            llc=data.get("llc"),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> AnalysisReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_report(model, stats: Stats, basis: InteractionBasis, pca: InteractionBasis, *, seconds: float,
                 config: AnalysisConfig, dataset: str = "") -> AnalysisReport:
    spectra = {
        h: SpectrumSummary(d=basis[h].d, ib_kept=basis[h].k, pca_kept=pca[h].k,
                           ib_dirs_99=basis[h].n_directions_for(0.99), pca_dirs_99=pca[h].n_directions_for(0.99),
                           top_lambda=basis[h].eigenvalues[:8].tolist(), thresholds=basis[h].thresholds)
        for h in basis.hooks
    }
    groups = stats.groups()
    # Computed once here; the degeneracy account uses these same objects and keeps no copy.
    heads = synchronized_heads(stats, threshold=config.head_threshold, model=model) if HeadSync.kind in groups else None
    neurons = (synchronized_neurons(stats, threshold=config.neuron_threshold, model=model)
               if NeuronSync.kind in groups else None)
    assert stats.run is not None
    return AnalysisReport(
        model=stats.run.model, n_tokens=stats.n_tokens, seconds=round(seconds, 1), rtol=config.rtol,
        n_probes=config.n_probes, spectra=spectra,
        degeneracy=degeneracy_report(model, stats, rtol=config.rtol, heads=heads, neurons=neurons),
        provenance=Provenance(dataset=dataset, package_version=stats.run.package_version, run=stats.run.to_dict(),
                              analysis=config.to_dict()),
        synchronized_heads=heads, synchronized_neurons=neurons,
    )


def basis_hooks_of(model: HookedModel, config: AnalysisConfig) -> list[str]:
    """Where the analysis fits interaction bases."""
    return resolve_hooks(model, list(config.hooks)) if config.hooks else residual_hooks(model)


def collection_config(model: HookedModel, config: AnalysisConfig) -> RunConfig:
    """The ``RunConfig`` an analysis collects with (also what its checkpoint must match)."""
    basis_hooks = basis_hooks_of(model, config)
    all_hooks = list(dict.fromkeys(basis_hooks + degeneracy_hooks(model)))
    # M is needed only where a basis is fitted and at weight matrices' outputs (K, docs/theory.md §3).
    m_hooks = list(dict.fromkeys(basis_hooks + [w.output_hook for w in weight_matrices(model)
                                                if w.output_hook != LOGITS]))
    n_ctx = int(model.cfg.n_ctx)
    context = config.context if config.context is not None else min(DEFAULT_CONTEXT, n_ctx)
    observers: list = [HeadSync()]
    if not getattr(model.cfg, "attn_only", False):
        observers.append(NeuronSync())
    return RunConfig.build(model, all_hooks, jacobians=JacobianConfig(n_probes=config.n_probes),
                           jacobian_hooks=m_hooks, batch_size=config.batch_size, context=context,
                           observers=observers)


def analyze(model: HookedModel, data: Any, out: str | Path, *, config: AnalysisConfig | None = None,
            resume: bool = False, progress: bool = True, keep_checkpoint: bool = False, dataset: str = "",
            checkpoint_every: int = 10, checkpoint_seconds: float = 60.0, **options: Any) -> AnalysisReport:
    """Run everything and write ``stats.safetensors``, ``basis.safetensors``, ``report.json``,
    ``plots/*.png`` and ``report.html`` to ``out``.

    ``options`` build an ``AnalysisConfig`` (``max_tokens``, ``batch_size``, ``context``,
    ``n_probes``, ``rtol``, ``hooks``, thresholds) when ``config`` is not given. While
    collecting, ``out/checkpoint.safetensors`` is written periodically, on Ctrl-C and on
    SIGTERM; ``resume=True`` continues it. It is deleted after success unless ``keep_checkpoint``.
    ``dataset`` describes the data for the report's provenance.
    """
    if config is None:
        config = AnalysisConfig(**options)
    elif options:
        raise TypeError("pass either config= or its options, not both")
    out = Path(out)
    run_config = collection_config(model, config)
    basis_hooks = basis_hooks_of(model, config)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT_NAME
    start = time.time()
    stats = collect(model, data, config=run_config, max_tokens=config.max_tokens, checkpoint=checkpoint,
                    resume=resume, checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                    progress=progress)
    stats.save(out / "stats.safetensors")
    # A few d×d eigenproblems per hook: the fits and the report run on the host wherever the model is
    # (a basis is moved to the model's device when it is spliced in).
    stats.to("cpu")
    basis = InteractionBasis.fit(stats, hooks=basis_hooks, rtol=config.rtol)
    basis.save(out / "basis.safetensors")
    pca = InteractionBasis.fit(stats, hooks=basis_hooks, scaling="pca", rtol=config.rtol)
    pca.save(out / "pca_basis.safetensors")
    report = build_report(model, stats, basis, pca, seconds=time.time() - start, config=config, dataset=dataset)
    report.save(out / "report.json")
    render(out)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)  # as large as stats.safetensors, and now redundant
    return report
def load_analysis(out: str | Path, model: HookedModel) -> tuple[AnalysisReport, Stats]:
    """The report and statistics of the analysis folder ``out``, refused unless ``model`` is the
    model it was analysed with (the follow-up analyses, interactions and SGLD, build on both)."""
    from .generations import describe_model

    out = Path(out)
    report = AnalysisReport.load(out / "report.json")
    stats = Stats.load(out / "stats.safetensors")
    assert stats.run is not None
    if describe_model(model) != stats.run.model:
        raise ValueError(f"the model differs from the one {out} was analysed with (its identity card: config, "
                         "weights checksum, dtype); pass the same model")
    return report, stats


def render(out: str | Path) -> Path:
    """(Re)draw ``plots/`` and ``report.html`` from the files ``analyze`` saved in ``out``."""
    from . import plots
    from .head_sync import head_sync_matrices
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
            tv = head_sync_matrices(stats, layer).tv
            figures["heads"].append(plots.head_sync_heatmap(tv, layer, report.synchronized_heads.threshold,
                                                            out / "plots" / f"heads_layer{layer}.png"))
    if report.degeneracy.per_layer:
        figures["parameters"].append(plots.effective_parameters(report.degeneracy.per_layer,
                                                                out / "plots" / "parameters.png"))
    if report.interactions is not None:
        from .interactions.run import EDGES_FILE, interaction_figures

        if (out / EDGES_FILE).is_file():
            figures.update(interaction_figures(out, report.interactions))
    if report.llc is not None:
        from .llc.run import llc_figures

        figures.update(llc_figures(out, report.llc))
    return write_html(report, figures, out / "report.html")
