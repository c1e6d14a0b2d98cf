"""``estimate_neff``: the effective parameter count ``N_eff(ε) = 2 t E_t[L_B]`` by SGLD (docs/llc.md).

For each loss scale ε (``t = 1/ε``) several chains sample ``p_t(θ) ∝ exp(−t L_B(θ) − γ/2 ‖θ − θ*‖²)``
over a parameter subset (the rest held at θ*). Since ``L_B(θ*) = 0`` and
``−d log Z/dt = E_t[L_B]``, ``λ̂(ε) = t · mean(post-burn-in L̂_B draws)`` per chain.

Chains are checked before they are averaged: one that diverged (non-finite or exploding
loss) or whose post-burn-in trace drifts (first-half vs second-half means more than
``drift_z`` standard errors apart, the standard errors from the integrated autocorrelation
time) is flagged and left out; the others are kept. Per-chain estimates, their spread and a
standard error are reported, with the traces. Chains can be checkpointed and resumed
(safetensors + the run's JSON identity) and split over ``torch.distributed`` ranks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..checkpoint import rank_path
from ..collection.options import StreamOptions
from ..collection.stream import rank_and_world
from . import checkpoints
from .boundaries import Boundaries
from .checkpoints import RunState
from .config import Integrator, LLCConfig, ParamSubset, as_subset
from .curvature import DiagonalProbes, measure_curvature
from .pilot import Pilot, PilotState, StepSizeChoice
from .preconditioner import Factor, IdentityFactor
from .sampler import (
    Chain,
    ChainCallback,
    ChainStatus,
    DivergenceGuard,
    ProgressBar,
    chain_seed,
    run_chain,
)
from .targets import FunctionTarget, Target, TransformerTarget, resolve_subset

FORMAT = "tl_degeneracy.llc/1"  # of a result (NeffResult.to_dict); later fields are additions


# -- statistics of one trace -------------------------------------------------------------------

def autocorrelation_time(x: Float[Tensor, " n"] | np.ndarray, c: float = 5.0) -> float:
    """Integrated autocorrelation time ``τ = 1 + 2 Σ ρ_k`` with Sokal's window (smallest M ≥ c τ(M))."""
    a = np.asarray(x, dtype=np.float64)
    n = a.size
    if n < 4 or not np.isfinite(a).all():
        return math.nan
    a = a - a.mean()
    var = float(a @ a) / n
    if var == 0.0:
        return 1.0
    f = np.fft.rfft(a, n=2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n] / (n * var)
    taus = 2.0 * np.cumsum(acf) - 1.0
    window = np.arange(n) >= c * taus
    m = int(np.argmax(window)) if window.any() else n - 1
    return max(1.0, float(taus[m]))


def mean_and_se(x: Float[Tensor, " n"] | np.ndarray, tau: float | None = None) -> tuple[float, float]:
    a = np.asarray(x, dtype=np.float64)
    tau = autocorrelation_time(a) if tau is None else tau
    return float(a.mean()), float(math.sqrt(a.var(ddof=1) * tau / a.size)) if a.size > 1 else math.nan


def drift_statistic(draws: Float[Tensor, " n"] | np.ndarray) -> float:
    """(mean of the second half − mean of the first) / its standard error."""
    a = np.asarray(draws, dtype=np.float64)
    # τ from the linearly detrended trace: a trend would otherwise pass for slow mixing and
    # widen the very standard errors it is tested against.
    steps = np.arange(a.size, dtype=np.float64)
    tau = autocorrelation_time(a - np.polyval(np.polyfit(steps, a, 1), steps))
    h = a.size // 2
    m1, s1 = mean_and_se(a[:h], tau)
    m2, s2 = mean_and_se(a[h:], tau)
    se = math.hypot(s1, s2)
    if se == 0.0:
        return 0.0 if m1 == m2 else math.inf
    return (m2 - m1) / se


# -- results -------------------------------------------------------------------------------------

@dataclass
class ChainEstimate:
    """One chain at one scale. ``n_eff = 2 t · mean(draws)``; ``trace`` holds every step's ``L̂_B``."""

    chain: int
    seed: int
    status: str
    reason: str | None
    n_eff: float
    standard_error: float  # of n_eff, from the chain's own autocorrelation time
    autocorrelation_time: float  # in steps
    drift_z: float | None
    steps_run: int
    trace: list[float] = field(repr=False)

    @property
    def lambda_hat(self) -> float:
        return self.n_eff / 2


@dataclass
class ScaleEstimate:
    """``N_eff`` at one loss scale ε from the chains that passed the checks."""

    eps: float
    t: float
    step_size: float
    step_size_choice: dict[str, Any] | None  # the automatic choice's record; None when given
    n_eff: float  # mean over kept chains (nan if none was kept)
    spread: float  # standard deviation of the kept chains' estimates
    se_between: float  # spread / sqrt(kept)
    se_within: float  # from each chain's autocorrelation time, combined
    standard_error: float  # the larger of the two
    kept: int
    chains: list[ChainEstimate]
    flags: list[str] = field(default_factory=list)
    preconditioner: dict[str, Any] | None = None  # the chains' P (kind, what it covers); None: plain SGLD
    relax_steps: float | None = None  # 1/(η γ λ_max(P)): steps a direction of zero curvature needs to relax

    @property
    def lambda_hat(self) -> float:
        return self.n_eff / 2


@dataclass
class NeffResult:
    """The ``N_eff(ε)`` curve of one parameter subset (``to_dict()`` goes into report.json)."""

    n_params: int  # nominal: the sampled parameters
    parameters: list[dict[str, Any]]
    subset: dict[str, Any]
    config: dict[str, Any]
    target: dict[str, Any]
    scales: list[ScaleEstimate]
    seconds: float
    world_size: int = 1
    format: str = FORMAT
    curvature: dict[str, Any] | None = None  # what the preconditioner was measured from (kind, probes, notes)

    @property
    def eps(self) -> list[float]:
        return [s.eps for s in self.scales]

    @property
    def n_eff(self) -> list[float]:
        return [s.n_eff for s in self.scales]

    def scale(self, eps: float) -> ScaleEstimate:
        for s in self.scales:
            if math.isclose(s.eps, eps, rel_tol=1e-12):
                return s
        raise KeyError(f"no scale eps={eps} in this result (scales: {self.eps})")

    def to_dict(self, traces: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not traces:
            for s in data["scales"]:
                for c in s["chains"]:
                    c.pop("trace")
        return json.loads(json.dumps(data, default=_jsonable).replace("NaN", "null"))

    def to_json(self, traces: bool = True, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(traces), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeffResult:
        data = dict(data)
        if data.get("format") != FORMAT:
            raise ValueError(f"not an N_eff result (format {data.get('format')!r}, expected {FORMAT!r})")
        nan = lambda v: math.nan if v is None else v
        scales = []
        for s in data["scales"]:
            s = {k: nan(v) if k in ("n_eff", "spread", "se_between", "se_within", "standard_error") else v
                 for k, v in s.items()}
            s["chains"] = [ChainEstimate(**{**c, "n_eff": nan(c["n_eff"]), "standard_error": nan(c["standard_error"]),
                                            "autocorrelation_time": nan(c["autocorrelation_time"]),
                                            "trace": [nan(v) for v in c.get("trace", [])]}) for c in s["chains"]]
            scales.append(ScaleEstimate(**s))
        data["scales"] = scales
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeffResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        lines = [f"N_eff(ε) of {self.n_params} parameters ({self.subset_text}); γ = {self.config['gamma']:g}, "
                 f"{self.config['n_chains']} chains × {self.config['n_draws']} draws after {self.config['burn_in']} "
                 f"burn-in steps, {self.config['integrator']}, preconditioner "
                 f"{self.config.get('preconditioner', 'none')}",
                 f"{'eps':>10} {'N_eff':>10} {'± s.e.':>9} {'spread':>9} {'kept':>5} {'step':>10}  flags"]
        for s in self.scales:
            lines.append(f"{s.eps:10.3g} {s.n_eff:10.4g} {s.standard_error:9.3g} {s.spread:9.3g} "
                         f"{s.kept:>2}/{len(s.chains):<2} {s.step_size:10.3g}  {'; '.join(s.flags)}")
        return "\n".join(lines)

    @property
    def subset_text(self) -> str:
        return ", ".join(p["label"] for p in self.parameters)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Tensor):
        return value.tolist()
    return str(value)


def _chain_estimate(chain: Chain, config: LLCConfig) -> ChainEstimate:
    draws = chain.draws.numpy()
    status = chain.status
    drift = None
    n_eff = se = tau = math.nan
    if status is ChainStatus.OK:
        tau = autocorrelation_time(draws)
        mean, s = mean_and_se(draws, tau)
        n_eff, se = 2 * chain.t * mean, 2 * chain.t * s
        drift = drift_statistic(draws)
        if abs(drift) > config.drift_z:
            status = ChainStatus.DRIFTED
            chain.reason = (f"post-burn-in trace drifts: second-half mean differs from the first by {drift:+.1f} "
                            f"standard errors (limit {config.drift_z:g}); use more burn_in, and check the step size "
                            "(too large biases and can diverge, too small does not mix)")
    return ChainEstimate(chain=chain.index, seed=chain.seed, status=status.value, reason=chain.reason,
                         n_eff=n_eff, standard_error=se, autocorrelation_time=tau, drift_z=drift,
                         steps_run=int(chain.step), trace=[float(v) for v in chain.trace])


def _scale_estimate(eps: float, gamma: float, step_size: float, choice: StepSizeChoice | None,
                    factor: Factor | None, chains: list[ChainEstimate]) -> ScaleEstimate:
    kept = [c for c in chains if c.status == ChainStatus.OK.value]
    values = np.array([c.n_eff for c in kept])
    mean = float(values.mean()) if kept else math.nan
    spread = float(values.std(ddof=1)) if len(kept) > 1 else math.nan
    se_between = spread / math.sqrt(len(kept)) if len(kept) > 1 else math.nan
    se_within = math.sqrt(sum(c.standard_error ** 2 for c in kept)) / len(kept) if kept else math.nan
    candidates = [v for v in (se_between, se_within) if math.isfinite(v)]
    flags = [f"chain {c.chain} {c.status}: {c.reason}" for c in chains if c.status != ChainStatus.OK.value]
    if not kept:
        flags.append("no chain passed the checks: no estimate at this scale")
    if choice is not None and choice.cut_short:
        flags.append(f"step size: {choice.cut_short}")
    relax = None
    if factor is not None and math.isfinite(step_size) and step_size > 0:
        relax = 1 / (step_size * gamma * factor.largest())
    return ScaleEstimate(eps=eps, t=1 / eps, step_size=step_size,
                         step_size_choice=None if choice is None else choice.to_dict(), n_eff=mean, spread=spread,
                         se_between=se_between, se_within=se_within,
                         standard_error=max(candidates) if candidates else math.nan, kept=len(kept), chains=chains,
                         flags=flags, preconditioner=None if factor is None else factor.describe(), relax_steps=relax)


DEFAULT_CHECKPOINT_STEPS = 200  # the sampler's checkpoint_every (StreamOptions), in steps
STREAM_FIELDS = {f.name for f in dataclasses.fields(StreamOptions)}
LLC_FIELDS = {f.name for f in dataclasses.fields(LLCConfig)}


class _Checkpointer(ChainCallback):
    """Writes the checkpoint whenever a chain ends (mid-chain saves: ``Boundaries``)."""

    def __init__(self, save: Any):
        self.save = save

    def on_chain_end(self, chain: Chain) -> None:
        self.save()


STATUS_CODES = {s: k for k, s in enumerate(ChainStatus)}


def _gather(chains: dict[tuple[int, int], Chain], mine: list[tuple[int, int]], n_steps: int,
            step_sizes: dict[int, tuple[float, StepSizeChoice | None, Factor | None]], n_scales: int) -> None:
    """Every rank ends with every chain's trace, status and step count (sums of disjoint parts)."""
    import torch.distributed as dist

    keys = list(chains)
    traces = torch.zeros(len(keys), n_steps, dtype=torch.float64)
    info = torch.zeros(len(keys), 3, dtype=torch.float64)  # status code + 1, steps run, ran here
    etas = torch.zeros(n_scales, dtype=torch.float64)
    for k, key in enumerate(keys):
        if key in mine:
            ch = chains[key]
            traces[k] = torch.nan_to_num(ch.trace, nan=0.0)
            info[k] = torch.tensor([STATUS_CODES[ch.status] + 1, ch.step, 1.0], dtype=torch.float64)
    for i, (eta, _, _) in step_sizes.items():
        etas[i] = eta
    dist.all_reduce(traces)
    dist.all_reduce(info)
    dist.all_reduce(etas, op=dist.ReduceOp.MAX)
    statuses = list(ChainStatus)
    for k, key in enumerate(keys):
        if key in mine:
            continue
        ch = chains[key]
        ch.step = int(info[k, 1])
        ch.status = statuses[int(info[k, 0]) - 1]
        ch.trace = traces[k].clone()
        ch.trace[ch.step:] = math.nan
        if ch.status is ChainStatus.DIVERGED:
            ch.reason = f"diverged on another rank after {ch.step} steps (see that rank's log)"
    for i in range(n_scales):
        if i not in step_sizes:
            step_sizes[i] = (float(etas[i]), None, None)


# -- the entry point -------------------------------------------------------------------------------

def build_target(model: torch.nn.Module, data: Any, config: LLCConfig, subset: ParamSubset,
                 max_tokens: int | None = None, context: int | None = None) -> Target:
    """The behavioural loss of ``model`` on ``data`` over ``subset``, with ``z_θ*`` cached."""
    slots = resolve_subset(model, subset)
    if hasattr(model, "hook_dict") and hasattr(model, "cfg"):
        from ..data import iter_batches

        size = config.batch_size or 1 << 30
        batches = []
        tokens = 0
        for batch in iter_batches(data, model, batch_size=size, context=context):
            if max_tokens is not None and tokens >= max_tokens:
                break
            if max_tokens is not None and tokens + batch.n_tokens > max_tokens:
                rows = max(1, (max_tokens - tokens) // max(1, batch.tokens.shape[1]))
                batch = batch.head(rows)
            batches.append(batch)
            tokens += batch.n_tokens
        target: Target = TransformerTarget(model, batches, config, slots)
    else:
        target = FunctionTarget(model, data, config, slots)
    target.prepare(config.behavioral_loss)
    return target


def estimate_neff(
    model: torch.nn.Module,
    data: Any,
    eps: float | Sequence[float] | None = None,
    *,
    params: ParamSubset | str | Sequence[str] | None = None,
    config: LLCConfig | None = None,
    context: int | None = None,
    callbacks: Sequence[ChainCallback] = (),
    options: StreamOptions | None = None,
    statistics: Any = None,
    **keywords: Any,
) -> NeffResult:
    """Sample ``N_eff(ε) = 2 t E_t[L_B]`` at each ε of the sweep (docs/llc.md).

    Args:
        model: a TransformerLens model (``HookedTransformer`` / ``TransformerBridge``), or any
            ``nn.Module`` mapping input rows to outputs (toy models; ``data`` is then the inputs).
        data: token ids, an iterable of batches or a ``datasets`` dataset (as ``collect`` takes);
            it is read once, up to ``max_tokens``, and ``z_θ*`` is cached per minibatch.
            ``context``: tokens per sequence when ``data`` is text.
        eps: loss scale(s) ε (``t = 1/ε``); or give ``config=LLCConfig(eps=...)``.
        params: the parameters that move (``ParamSubset``, a glob or a list of globs); the rest
            stay at θ*. Default: every parameter.
        config: every sampler option (``LLCConfig``); or pass its fields as keywords
            (``gamma=``, ``n_chains=``, ``n_draws=``, ``burn_in=``, ``step_size=``, ``seed=``, ...).
        callbacks: further ``ChainCallback`` objects (they see every step of every chain).
        statistics: a ``Stats`` holding ``G`` and ``K`` of the sampled weight matrices, for the K-FAC
            preconditioner (``analyze --llc`` passes the analysis' own); None: collected on the
            sampling data when ``preconditioner="kfac"``.
        options: how it runs (``StreamOptions``; or its fields as keywords): ``max_tokens`` of
            sampling data; a ``checkpoint`` path written after every chain and every
            ``checkpoint_every`` units of work (steps, Hessian–vector products, probes; default 200) or
            ``checkpoint_seconds``, and on Ctrl-C / SIGTERM between units (per rank under ``torch.distributed``),
            ``resume=True`` continuing it and refusing one written by a different run (naming the
            field); ``progress``; ``distributed``: split chains over ranks (None: when initialised),
            every rank returning the full result.

    Returns:
        ``NeffResult``: per ε the mean over kept chains, their spread, a standard error, the
        per-chain estimates and traces, and the flags of chains left out.
    """
    unknown = sorted(set(keywords) - STREAM_FIELDS - LLC_FIELDS)
    if unknown:
        raise TypeError(f"estimate_neff() got unexpected keyword argument(s) {unknown}; the sampler's options are "
                        f"{sorted(LLC_FIELDS)} (LLCConfig) and the streaming options {sorted(STREAM_FIELDS)} "
                        "(StreamOptions)")
    streaming = {k: keywords.pop(k) for k in list(keywords) if k in STREAM_FIELDS}
    run = StreamOptions.of(options or StreamOptions(checkpoint_every=DEFAULT_CHECKPOINT_STEPS), "estimate_neff()",
                           **streaming)
    if config is None:
        if eps is None:
            raise ValueError("pass eps= (a loss scale or a list of them, e.g. eps=[1e-3, 1e-2]) or config=")
        config = LLCConfig(eps=eps, **keywords)
    elif eps is not None or keywords:
        raise ValueError("pass either config=LLCConfig(...) or eps= and the options as keywords, not both")
    subset = as_subset(params)
    start = time.perf_counter()
    rank, world = rank_and_world(run.distributed)
    target = build_target(model, data, config, subset, max_tokens=run.max_tokens, context=context)
    device = target.slots[0].param.device
    n_params = target.n_params
    limit = config.divergence_factor * (n_params / 2 + 1)
    identity = {"config": config.to_dict(), "subset": subset.to_dict(), "target": target.describe(),
                "parameters": [s.to_dict() for s in target.slots], "world_size": world,
                "statistics": _describe_statistics(statistics)}
    integrator = Integrator(config.integrator)
    chains: dict[tuple[int, int], Chain] = {}
    for i, e in enumerate(config.scales):
        for c in range(config.n_chains):
            chains[(i, c)] = Chain(scale=i, index=c, t=1 / e, gamma=config.gamma, step_size=math.nan,
                                   integrator=integrator, n_steps=config.n_steps, burn_in=config.burn_in,
                                   seed=chain_seed(config.seed, i, c))
    mine = [key for k, key in enumerate(chains) if k % world == rank]
    state = RunState(chains, probes=DiagonalProbes(target, chain_seed(config.seed, -1, -1) % (1 << 31)))
    path = None if run.checkpoint is None else rank_path(run.checkpoint, rank, world)

    def pilot_chain(i: int, record: dict[str, Any]) -> Chain:
        return Chain(scale=i, index=int(record["index"]), t=1 / config.scales[i], gamma=config.gamma,
                     step_size=float(record["step_size"]), integrator=integrator, n_steps=int(record["n_steps"]),
                     burn_in=0, seed=int(record["seed"]))

    if path is not None and run.resume and path.exists():
        checkpoints.load(path, identity, state, pilot_chain, device)

    def save() -> None:
        if path is not None:
            checkpoints.save(path, identity, state, mine)

    kfac_path = None if path is None else path.with_name(path.stem + ".kfac" + path.suffix)
    step_sizes: dict[int, tuple[float, StepSizeChoice | None, Factor | None]] = {}
    remaining = sum(config.n_steps - chains[k].step for k in mine if not chains[k].done)
    bar = ProgressBar(remaining, enabled=run.progress)
    all_callbacks: list[ChainCallback] = [DivergenceGuard(limit), bar, *callbacks, _Checkpointer(save)]
    boundaries = Boundaries(save if path is not None else None, every=run.checkpoint_every,
                            seconds=run.checkpoint_seconds)
    try:
        with boundaries:
            needed = sorted({key[0] for key in mine if not chains[key].done})
            if needed and state.curvature is None:
                assert state.probes is not None
                options = StreamOptions(checkpoint=kfac_path, resume=run.resume, progress=run.progress,
                                        distributed=False)
                state.curvature, state.curvature_seconds = measure_curvature(
                    target, config, state.probes, boundaries, statistics=statistics, collect_options=options,
                    progress=run.progress, seconds_before=state.curvature_seconds)
                save()
                if kfac_path is not None:
                    kfac_path.unlink(missing_ok=True)
            for key in mine:
                chain = chains[key]
                if chain.done:
                    continue
                i = key[0]
                if i not in step_sizes:
                    assert state.curvature is not None
                    if i not in state.pilots:  # the curvature's time counts towards the first pilot's budget
                        state.pilots[i] = PilotState(scale=i, seconds=state.curvature_seconds if not state.pilots
                                                     else 0.0)
                    pilot = Pilot(target, config, state.curvature, state.pilots[i], 1 / config.scales[i],
                                  seed=chain_seed(config.seed, i, -1) % (1 << 31), divergence_limit=limit,
                                  boundaries=boundaries, progress=run.progress)
                    choice, factor = pilot.run()
                    step_sizes[i] = (choice.step_size, choice if config.step_size is None or state.pilots[i].steps
                                     else None, factor)
                    save()
                chain.step_size, _, chosen = step_sizes[i]
                chain.factor = chosen if chosen is not None else IdentityFactor()
                run_chain(target, chain, all_callbacks, boundaries=boundaries)
    except KeyboardInterrupt:
        if boundaries.clean:  # between units: the state is whole, and this checkpoint loses nothing
            save()
        raise
    finally:
        bar.close()
    save()
    if world > 1:
        _gather(chains, mine, config.n_steps, step_sizes, len(config.scales))
    scales = []
    for i, e in enumerate(config.scales):
        eta, how, used = step_sizes.get(i, (math.nan, None, None))
        if i not in step_sizes and i in state.pilots and state.pilots[i].choice is not None:
            how = state.pilots[i].choice  # every chain of this scale was done before a resume
            eta = how.step_size if how is not None else math.nan
        per_chain = [_chain_estimate(chains[(i, c)], config) for c in range(config.n_chains)]
        scales.append(_scale_estimate(e, float(config.gamma), eta, how, used, per_chain))
    curvature = None if state.curvature is None else {k: v for k, v in state.curvature.record().items()
                                                      if k != "slots"}
    result = NeffResult(n_params=n_params, parameters=[s.to_dict() for s in target.slots], subset=subset.to_dict(),
                        config=config.to_dict(), target=target.describe(), scales=scales,
                        seconds=round(time.perf_counter() - start, 3), world_size=world, curvature=curvature)
    all_diverged = [s for s in scales if all(c.status == ChainStatus.DIVERGED.value for c in s.chains)]
    if all_diverged:
        s = all_diverged[0]
        raise EveryChainDiverged(
            f"every chain diverged at eps={s.eps:g} (step size {s.step_size:.3g}; first: {s.chains[0].reason}). "
            "Pass a smaller step_size (or step_size=None to choose it automatically), or a larger gamma "
            f"(was {config.gamma:g}).", result)
    return result


class EveryChainDiverged(ValueError):
    """Every chain at some ε diverged; ``result`` holds the whole run's record (traces, reasons)."""

    def __init__(self, message: str, result: NeffResult):
        super().__init__(message)
        self.result = result


def _describe_statistics(stats: Any) -> Any:
    """The identity of the ``Stats`` a K-FAC preconditioner is built from (None: collected here)."""
    if stats is None:
        return None
    run = getattr(stats, "run", None)
    return {"n_tokens": getattr(stats, "n_tokens", None), "run": None if run is None else run.identity()}


def quadratic_neff(eigenvalues: Float[Tensor, " n"], eps: float, gamma: float) -> float:
    """``Σ_k t h_k / (t h_k + γ)``: N_eff of a quadratic ``L_B`` with Hessian eigenvalues ``h_k`` (docs/llc.md §1)."""
    h = eigenvalues.to(torch.float64).clamp_min(0)
    t = 1.0 / eps
    return float((t * h / (t * h + gamma)).sum())
