"""The whole analysis a user runs from the command line: ``analyze``.

``analyze`` = collect (activations, Jacobians, the observers its stages ask for) → fit interaction
and PCA bases for the residual stream → degeneracy account → ``report.json`` → plots and a
self-contained ``report.html`` (``render``, which also redraws them later from the files alone).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..basis.bases import InteractionBasis
from ..collection.config import JacobianConfig, RunConfig
from ..collection.grams import collect
from ..collection.observers import Observer
from ..collection.options import StreamOptions
from ..collection.stats import Stats
from ..degeneracy.account import degeneracy_report
from ..degeneracy.weights import degeneracy_hooks, weight_matrices
from ..generations import HookedModel
from ..hook_names import LOGITS, residual_hooks, resolve_hooks
from ..linalg import DEFAULT_RTOL
from ..sync.heads import HeadSync, synchronized_heads
from ..sync.neurons import NeuronSync, synchronized_neurons
from ..validation import fraction, nonnegative_float, optional_positive_int, positive_int
from .files import BASIS_FILE, CHECKPOINT_FILE, PCA_FILE, REPORT_FILE, STATS_FILE
from .render import render
from .report import AnalysisReport, Provenance, SpectrumSummary

DEFAULT_CONTEXT = 128


class Stage(str, Enum):
    """What an analysis collects and computes (``AnalysisConfig.stages``)."""

    HEADS = "heads"  # head synchronisation: the HeadSync observer
    NEURONS = "neurons"  # neuron synchronisation: the NeuronSync observer (models with MLPs)


ALL_STAGES = tuple(Stage)


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
    stages: tuple[Stage, ...] = ALL_STAGES

    def __post_init__(self) -> None:
        if self.hooks is not None:
            object.__setattr__(self, "hooks", tuple([self.hooks] if isinstance(self.hooks, str) else self.hooks))
        optional_positive_int(self.max_tokens, "max_tokens")
        positive_int(self.batch_size, "batch_size")
        optional_positive_int(self.context, "context")
        positive_int(self.n_probes, "n_probes")
        nonnegative_float(self.rtol, "rtol")
        fraction(self.head_threshold, "head_threshold", "It is a total-variation distance between attention rows.")
        nonnegative_float(self.neuron_threshold, "neuron_threshold")
        object.__setattr__(self, "stages", tuple(Stage(s) for s in self.stages))

    def observers(self, model: HookedModel) -> list[Observer]:
        """The collectors the stages ask for, beyond the Grams (neurons only where the model has MLPs)."""
        chosen: list[Observer] = []
        if Stage.HEADS in self.stages:
            chosen.append(HeadSync())
        if Stage.NEURONS in self.stages and not getattr(model.cfg, "attn_only", False):
            chosen.append(NeuronSync())
        return chosen

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hooks"] = None if self.hooks is None else list(self.hooks)
        out["stages"] = [s.value for s in self.stages]
        return out


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
    return RunConfig.build(model, all_hooks, jacobians=JacobianConfig(n_probes=config.n_probes),
                           jacobian_hooks=m_hooks, batch_size=config.batch_size, context=context,
                           observers=config.observers(model))


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
    checkpoint = out / CHECKPOINT_FILE
    start = time.time()
    stats = collect(model, data, config=run_config, options=StreamOptions(
        max_tokens=config.max_tokens, checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds, progress=progress))
    stats.save(out / STATS_FILE)
    # A few d×d eigenproblems per hook: the fits and the report run on the host wherever the model is
    # (a basis is moved to the model's device when it is spliced in).
    stats.to("cpu")
    basis = InteractionBasis.fit(stats, hooks=basis_hooks, rtol=config.rtol)
    basis.save(out / BASIS_FILE)
    pca = InteractionBasis.fit(stats, hooks=basis_hooks, scaling="pca", rtol=config.rtol)
    pca.save(out / PCA_FILE)
    report = build_report(model, stats, basis, pca, seconds=time.time() - start, config=config, dataset=dataset)
    report.save(out / REPORT_FILE)
    render(out)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)  # as large as stats.safetensors, and now redundant
    return report
