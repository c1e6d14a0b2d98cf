"""The whole analysis a user runs from the command line: ``analyze``.

``analyze`` = collect what its stages ask for (activation and Jacobian Grams, head and neuron
synchronisation, the account's G and K; on chosen layers) → fit interaction and PCA bases for the
residual stream → the report's sections (spectra, outlier directions, synchronisation, degeneracy
account) → ``report.json`` → plots and a self-contained ``report.html`` (``render``, which also
redraws them later from the files alone). A section that fails is reported in the report with its
error, never fatal: the collection, written first, is never lost. ``rebuild_report`` makes
report.json again from the saved statistics (``tl-degeneracy report DIR``).
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from ..basis.bases import InteractionBasis
from ..collection.config import JacobianConfig, RunConfig
from ..collection.grams import collect
from ..collection.observers import Observer
from ..collection.options import StreamOptions
from ..collection.stats import Stats
from ..degeneracy.account import degeneracy_report
from ..degeneracy.weights import input_hooks, output_hooks
from ..generations import HookedModel
from ..hook_names import act_name, resolve_hooks
from ..linalg import DEFAULT_RTOL
from ..sync.heads import HeadSync, synchronized_heads
from ..sync.neurons import NeuronSync, synchronized_neurons
from ..threads import torch_threads
from ..validation import fraction, nonnegative_float, optional_positive_int, positive_float, positive_int
from .budget import AUTO_BATCH_SIZES, choose_batch_size
from .files import ANALYSIS_FILE, BASIS_FILE, CHECKPOINT_FILE, PCA_FILE, REPORT_FILE, STATS_FILE
from .outliers import OUTLIER_RATIO, ExtremeActivations, find_outliers, without
from .render import render
from .report import AnalysisReport, Provenance, SpectrumSummary

DEFAULT_CONTEXT = 128
DATA_FACTOR = 4  # fewer datapoints than this many times a hook's width: its ranks are limited by the data
T = TypeVar("T")


class Stage(str, Enum):
    """What an analysis collects and computes (``AnalysisConfig.stages``)."""

    GRAMS = "grams"  # activation Grams at the basis hooks: PCA, outlier directions
    JACOBIANS = "jacobians"  # Jacobian Grams there too: the interaction basis
    HEADS = "heads"  # head synchronisation: the HeadSync observer
    NEURONS = "neurons"  # neuron synchronisation: the NeuronSync observer (models with MLPs)
    ACCOUNT = "account"  # G at the weight matrices' inputs and K at their outputs: the degeneracy account


ALL_STAGES = tuple(Stage)


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """``"grams,jacobians"`` → the stages (ValueError naming the valid ones)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in {st.value for st in Stage}]
    if bad or not names:
        raise ValueError(f"unknown stage(s) {bad or [spec]}; choose from {[s.value for s in Stage]} "
                         "(comma-separated, e.g. grams,jacobians)")
    return tuple(Stage(s) for s in dict.fromkeys(names))


def parse_layers(spec: str) -> tuple[int, ...] | None:
    """``"all"`` → None; ``"0-5,12"`` → (0, 1, 2, 3, 4, 5, 12) (ValueError on anything else)."""
    if spec.strip() == "all":
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise ValueError
                out += range(a, b + 1)
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"layers must be 'all' or numbers and ranges like 0-5,12; got {spec!r}") from None
    if any(l < 0 for l in out):
        raise ValueError(f"layers are numbered from 0; got {spec!r}")
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class AnalysisConfig:
    """The options of ``analyze`` (recorded in report.json next to the collection's ``RunConfig``).

    ``hooks``: where interaction bases are fitted (None: the residual stream of the chosen layers);
    ``batch_size`` None chooses one from the model's size (``budget.choose_batch_size``: at most 8, a batch within
    2 GiB on a CPU); ``context`` None means ``min(128, n_ctx)``; thresholds as in ``synchronized_heads`` /
    ``synchronized_neurons``; ``rtol`` is the package's one eigenvalue convention (``linalg``);
    ``stages``: what is collected and computed; ``layers``: the blocks the residual bases, the
    synchronisation and the account cover (None: all); ``outlier_ratio``: a residual coordinate whose
    second moment exceeds this many times the median coordinate's is flagged (``outliers``).
    """

    hooks: tuple[str, ...] | None = None
    max_tokens: int | None = 8192
    batch_size: int | None = None
    context: int | None = None
    n_probes: int = 4
    rtol: float = DEFAULT_RTOL
    head_threshold: float = 0.05
    neuron_threshold: float = 1e-3
    stages: tuple[Stage, ...] = ALL_STAGES
    layers: tuple[int, ...] | None = None
    outlier_ratio: float = OUTLIER_RATIO

    def __post_init__(self) -> None:
        if self.hooks is not None:
            object.__setattr__(self, "hooks", tuple([self.hooks] if isinstance(self.hooks, str) else self.hooks))
        optional_positive_int(self.max_tokens, "max_tokens")
        optional_positive_int(self.batch_size, "batch_size")
        optional_positive_int(self.context, "context")
        positive_int(self.n_probes, "n_probes")
        nonnegative_float(self.rtol, "rtol")
        fraction(self.head_threshold, "head_threshold", "It is a total-variation distance between attention rows.")
        nonnegative_float(self.neuron_threshold, "neuron_threshold")
        positive_float(self.outlier_ratio, "outlier_ratio")
        stages = tuple(Stage(s) for s in self.stages)
        if not stages:
            raise ValueError("stages must name at least one stage: " + ", ".join(s.value for s in Stage))
        if Stage.JACOBIANS in stages and Stage.GRAMS not in stages:
            raise ValueError("the stage 'jacobians' fits the interaction basis, which needs the activation Grams "
                             "too: add the stage 'grams'")
        object.__setattr__(self, "stages", stages)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(l) for l in self.layers})))

    def has(self, stage: Stage) -> bool:
        return stage in self.stages

    def layer_list(self, model: HookedModel) -> list[int]:
        """The chosen layers, checked against the model."""
        n_layers = int(model.cfg.n_layers)
        chosen = list(range(n_layers)) if self.layers is None else list(self.layers)
        bad = [l for l in chosen if l >= n_layers]
        if bad or not chosen:
            raise ValueError(f"layers {bad or chosen} do not exist: the model has layers 0..{n_layers - 1}")
        return chosen

    def observers(self, model: HookedModel) -> list[Observer]:
        """The collectors the stages ask for, beyond the Grams (neurons only where the model has MLPs)."""
        layers = self.layer_list(model)
        chosen: list[Observer] = []
        if self.has(Stage.HEADS):
            chosen.append(HeadSync(layers=layers))
        if self.has(Stage.NEURONS) and not getattr(model.cfg, "attn_only", False):
            chosen.append(NeuronSync(layers=layers))
        if self.has(Stage.GRAMS):
            chosen.append(ExtremeActivations(hook_names=tuple(basis_hooks_of(model, self))))
        return chosen

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hooks"] = None if self.hooks is None else list(self.hooks)
        out["stages"] = [s.value for s in self.stages]
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisConfig:
        data = dict(data)
        for key in ("hooks", "layers", "stages"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def basis_hooks_of(model: HookedModel, config: AnalysisConfig) -> list[str]:
    """Where the analysis fits bases: ``config.hooks``, else the residual stream of the chosen layers
    (each ``hook_resid_pre``, and the final ``hook_resid_post`` with the last layer); none without grams."""
    if not config.has(Stage.GRAMS):
        return []
    if config.hooks:
        return resolve_hooks(model, list(config.hooks))
    layers = config.layer_list(model)
    last = int(model.cfg.n_layers) - 1
    return [act_name("resid_pre", l) for l in layers] + ([act_name("resid_post", last)] if last in layers else [])


def _account_layers(model: HookedModel, config: AnalysisConfig) -> list[int] | None:
    return None if config.layers is None else config.layer_list(model)


def collection_config(model: HookedModel, config: AnalysisConfig) -> RunConfig:
    """The ``RunConfig`` an analysis collects with (also what its checkpoint must match): ``G`` where bases
    are fitted and at the account's matrix inputs, ``M`` where interaction bases are fitted and at the
    matrices' outputs (``K``, docs/theory.md §3) — never a Gram nobody reads."""
    basis = basis_hooks_of(model, config)
    layers = _account_layers(model, config)
    account = config.has(Stage.ACCOUNT)
    g_hooks = list(dict.fromkeys(basis + (input_hooks(model, layers) if account else [])))
    m_hooks = list(dict.fromkeys((basis if config.has(Stage.JACOBIANS) else [])
                                 + (output_hooks(model, layers) if account else [])))
    n_ctx = int(model.cfg.n_ctx)
    context = config.context if config.context is not None else min(DEFAULT_CONTEXT, n_ctx)
    run = RunConfig.build(model, g_hooks, jacobians=JacobianConfig(n_probes=config.n_probes) if m_hooks else False,
                          jacobian_hooks=m_hooks or None, batch_size=config.batch_size or AUTO_BATCH_SIZES[0],
                          context=context, observers=config.observers(model))
    return run if config.batch_size is not None else choose_batch_size(model, run)


def _section(errors: dict[str, str], name: str, compute: Callable[[], T]) -> T | None:
    """``compute()``, or None with the error recorded under ``name`` (a failing section is not fatal)."""
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001  (any failure of one section is reported in it)
        errors[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return None


def _spectra(stats: Stats, basis: InteractionBasis | None, pca: InteractionBasis,
             outliers: dict[str, Any], config: AnalysisConfig) -> dict[str, SpectrumSummary]:
    from ..basis.interaction import fit_layer

    out = {}
    for h in pca.hooks:
        ib = basis[h] if basis is not None and h in basis.layers else None
        n, d = stats.n_datapoints(h), pca[h].d
        summary = SpectrumSummary(
            d=d, ib_kept=None if ib is None else ib.k, pca_kept=pca[h].k,
            ib_dirs_99=None if ib is None else ib.n_directions_for(0.99), pca_dirs_99=pca[h].n_directions_for(0.99),
            top_lambda=[] if ib is None else ib.eigenvalues[:8].tolist(),
            thresholds=(ib or pca[h]).thresholds, n_datapoints=n, data_limited=n < DATA_FACTOR * d)
        flagged = [c.coordinate for c in outliers[h].coordinates] if h in outliers else []
        if flagged:  # the same summary with the massive-activation coordinates left out
            cov = without(stats.covariance(h), flagged)
            mean = stats.mean(h)[[i for i in range(d) if i not in set(flagged)]]
            p = fit_layer(h, cov, None, mean, rtol=config.rtol, scaling="pca")
            summary.without_outliers = {"coordinates": flagged, "pca_kept": p.k,
                                        "pca_dirs_99": p.n_directions_for(0.99)}
            if ib is not None:
                b = fit_layer(h, cov, without(stats.jacobian_gram(h), flagged), mean, rtol=config.rtol)
                summary.without_outliers.update(ib_kept=b.k, ib_dirs_99=b.n_directions_for(0.99),
                                                top_lambda=b.eigenvalues[:8].tolist())
        out[h] = summary
    return out


def build_report(model: HookedModel, stats: Stats, basis: InteractionBasis | None, pca: InteractionBasis, *,
                 seconds: float, config: AnalysisConfig, dataset: str = "") -> AnalysisReport:
    """report.json's content. Each section is computed on its own; one that fails is None in the report
    and its error is in ``report.errors`` under the section's name."""
    errors: dict[str, str] = {}
    groups = stats.groups()
    tokenizer = getattr(model, "tokenizer", None)
    decode = None if tokenizer is None else (lambda t: tokenizer.decode([t]))
    outliers = _section(errors, "outliers", lambda: {h: find_outliers(stats, h, config.outlier_ratio, decode)
                                                     for h in pca.hooks}) or {}
    spectra = _section(errors, "spectra", lambda: _spectra(stats, basis, pca, outliers, config)) or {}
    # Computed once here; the degeneracy account uses these same objects and keeps no copy.
    heads = _section(errors, "synchronized_heads", lambda: synchronized_heads(
        stats, threshold=config.head_threshold, model=model)) if HeadSync.kind in groups else None
    neurons = _section(errors, "synchronized_neurons", lambda: synchronized_neurons(
        stats, threshold=config.neuron_threshold, model=model)) if NeuronSync.kind in groups else None
    account = _section(errors, "degeneracy", lambda: degeneracy_report(
        model, stats, rtol=config.rtol, heads=heads, neurons=neurons,
        layers=_account_layers(model, config))) if config.has(Stage.ACCOUNT) else None
    assert stats.run is not None
    report = AnalysisReport(
        model=stats.run.model, n_tokens=stats.n_tokens, seconds=round(seconds, 1), rtol=config.rtol,
        n_probes=config.n_probes, spectra=spectra, degeneracy=account,
        provenance=Provenance(dataset=dataset, package_version=stats.run.package_version, run=stats.run.to_dict(),
                              analysis=config.to_dict()),
        synchronized_heads=heads, synchronized_neurons=neurons,
        outliers={h: o for h, o in outliers.items() if o.coordinates}, errors=errors)
    limited = [h for h, s in spectra.items() if s.data_limited]
    if limited:
        report.notes.append(
            f"warning: {len(limited)} hook(s) have fewer than {DATA_FACTOR}× as many datapoints as coordinates "
            f"({', '.join(limited[:4])}{', …' if len(limited) > 4 else ''}): their ranks, kept directions and free "
            "directions are limited by the data, not only by the model; collect more tokens (--tokens).")
    return report


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def fit_bases(stats: Stats, hooks: list[str], config: AnalysisConfig, progress: bool = False
              ) -> tuple[InteractionBasis | None, InteractionBasis]:
    """The interaction basis (with the jacobians stage) and PCA at ``hooks``, on the host."""
    _log(progress and bool(hooks), f"fitting bases at {len(hooks)} hook(s)")
    basis = (InteractionBasis.fit(stats, hooks=hooks, rtol=config.rtol)
             if config.has(Stage.JACOBIANS) and hooks else None)
    return basis, InteractionBasis.fit(stats, hooks=hooks, scaling="pca", rtol=config.rtol)


def analyze(model: HookedModel, data: Any, out: str | Path, *, config: AnalysisConfig | None = None,
            resume: bool = False, progress: bool = True, keep_checkpoint: bool = False, dataset: str = "",
            checkpoint_every: int = 10, checkpoint_seconds: float = 60.0, threads: int | None = None,
            model_spec: str | None = None, **options: Any) -> AnalysisReport:
    """Run everything and write ``stats.safetensors``, ``basis.safetensors``, ``pca_basis.safetensors``,
    ``report.json``, ``plots/*.png`` and ``report.html`` to ``out`` (and ``analysis.json`` beside the
    statistics: what was asked, so that ``rebuild_report`` can redo the report from them).

    ``options`` build an ``AnalysisConfig`` (``max_tokens``, ``batch_size``, ``context``, ``n_probes``,
    ``rtol``, ``hooks``, ``stages``, ``layers``, thresholds) when ``config`` is not given. While
    collecting, ``out/checkpoint.safetensors`` is written periodically, on Ctrl-C and on SIGTERM;
    ``resume=True`` continues it. It is deleted after success unless ``keep_checkpoint``. ``dataset``
    describes the data for the report's provenance, ``model_spec`` the model (its name or folder);
    ``threads``: torch threads for the fits (None: as set).
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
    _log(progress, f"writing {out / STATS_FILE}")
    write_request(out, config, dataset, model_spec)
    stats.save(out / STATS_FILE)
    report = finish(model, stats, out, config, seconds=time.time() - start, dataset=dataset, progress=progress,
                    threads=threads, basis_hooks=basis_hooks)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)  # as large as stats.safetensors, and now redundant
    return report


def finish(model: HookedModel, stats: Stats, out: Path, config: AnalysisConfig, *, seconds: float, dataset: str,
           progress: bool, threads: int | None, basis_hooks: list[str]) -> AnalysisReport:
    """Fits, report.json and rendering of collected statistics (``analyze``'s second half)."""
    # A few d×d eigenproblems per hook: the fits and the report run on the host wherever the model is
    # (a basis is moved to the model's device when it is spliced in).
    stats.to("cpu")
    with torch_threads(threads):
        basis, pca = fit_bases(stats, basis_hooks, config, progress)
        if basis is not None:
            basis.save(out / BASIS_FILE)
        else:
            (out / BASIS_FILE).unlink(missing_ok=True)
        pca.save(out / PCA_FILE)
        _log(progress, "the report: spectra, outliers, synchronisation, account")
        report = build_report(model, stats, basis, pca, seconds=seconds, config=config, dataset=dataset)
    report.save(out / REPORT_FILE)
    _log(progress, f"rendering {out / 'report.html'}")
    render(out)
    return report


def write_request(out: Path, config: AnalysisConfig, dataset: str, model_spec: str | None) -> None:
    """``analysis.json``: the analysis asked for (config, data, model), written before anything runs."""
    record = {"format": "tl_degeneracy.analysis/1", "config": config.to_dict(), "dataset": dataset,
              "model": model_spec, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = out / ANALYSIS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def read_request(out: str | Path) -> dict[str, Any]:
    """What ``write_request`` wrote (ValueError when it is missing or unreadable)."""
    path = Path(out) / ANALYSIS_FILE
    try:
        record = json.loads(path.read_text())
        record["config"] = AnalysisConfig.from_dict(record["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    return record


def rebuild_report(out: str | Path, model: HookedModel, progress: bool = True, threads: int | None = None
                   ) -> AnalysisReport:
    """report.json (and the bases, plots, report.html) again from ``stats.safetensors`` and ``analysis.json``,
    as the analysis would have written them (``model``: the one it ran on, checked against the statistics)."""
    from ..generations import describe_model

    out = Path(out)
    request = read_request(out)
    config: AnalysisConfig = request["config"]
    stats = Stats.load(out / STATS_FILE)
    if stats.run is None or describe_model(model) != stats.run.model:
        raise ValueError(f"the model differs from the one {out} was analysed with (its identity card: config, "
                         "weights checksum, dtype); pass the same model")
    hooks = [h for h in basis_hooks_of(model, config) if h in stats.hooks]
    return finish(model, stats, out, config, seconds=0.0, dataset=request.get("dataset") or "", progress=progress,
                  threads=threads, basis_hooks=hooks)
