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

from ..checkpoint import atomic_save_safetensors, check_resumable, rank_path, read_safetensors_metadata
from ..collection.options import StreamOptions
from ..collection.stream import rank_and_world
from .config import Integrator, LLCConfig, ParamSubset, as_subset
from .sampler import (
    Chain,
    ChainCallback,
    ChainStatus,
    DivergenceGuard,
    ProgressBar,
    StepSizeChoice,
    chain_seed,
    choose_step_size,
    run_chain,
)
from .targets import FunctionTarget, Target, TransformerTarget, resolve_subset

FORMAT = "tl_degeneracy.llc/1"
META_KEY = "tl_degeneracy.llc"


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
                 f"burn-in steps, {self.config['integrator']}",
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


def _scale_estimate(eps: float, step_size: float, choice: StepSizeChoice | None, chains: list[ChainEstimate]
                    ) -> ScaleEstimate:
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
    return ScaleEstimate(eps=eps, t=1 / eps, step_size=step_size,
                         step_size_choice=None if choice is None else choice.to_dict(), n_eff=mean, spread=spread,
                         se_between=se_between, se_within=se_within,
                         standard_error=max(candidates) if candidates else math.nan, kept=len(kept), chains=chains,
                         flags=flags)


DEFAULT_CHECKPOINT_STEPS = 200  # the sampler's checkpoint_every (StreamOptions), in steps
STREAM_FIELDS = {f.name for f in dataclasses.fields(StreamOptions)}
LLC_FIELDS = {f.name for f in dataclasses.fields(LLCConfig)}


# -- checkpoints ---------------------------------------------------------------------------------

def _save_checkpoint(path: Path, identity: dict[str, Any], chains: dict[tuple[int, int], Chain],
                     step_sizes: dict[int, tuple[float, StepSizeChoice | None]]) -> None:
    tensors: dict[str, Tensor] = {}
    records = []
    for (i, c), ch in chains.items():
        key = f"{i}.{c}"
        tensors[f"trace.{key}"] = ch.trace
        record = {"scale": i, "chain": c, "step": ch.step, "status": ch.status.value, "reason": ch.reason}
        if not ch.done and ch.step > 0:
            assert ch.position is not None and ch.noise_gen is not None and ch.batch_gen is not None
            for j, x in enumerate(ch.position):
                tensors[f"position.{key}.{j}"] = x
            for j, x in enumerate(ch.noise or []):
                tensors[f"noise.{key}.{j}"] = x
            tensors[f"noise_gen.{key}"] = ch.noise_gen.get_state()
            tensors[f"batch_gen.{key}"] = ch.batch_gen.get_state()
            record["slots"] = len(ch.position)
            record["has_noise"] = ch.noise is not None
        records.append(record)
    steps = {str(i): {"step_size": eta, "choice": None if choice is None else choice.to_dict()}
             for i, (eta, choice) in step_sizes.items()}
    meta = {"format": FORMAT, "identity": identity, "chains": records, "step_sizes": steps}
    atomic_save_safetensors(tensors, {META_KEY: json.dumps(meta)}, path)


def _load_checkpoint(path: Path, identity: dict[str, Any], chains: dict[tuple[int, int], Chain],
                     step_sizes: dict[int, tuple[float, StepSizeChoice | None]]) -> None:
    from safetensors.torch import load_file

    meta = read_safetensors_metadata(path, META_KEY)
    check_resumable(meta["identity"], identity, path)
    tensors = load_file(str(path))
    for i, entry in meta["step_sizes"].items():
        choice = None if entry["choice"] is None else StepSizeChoice(**entry["choice"])
        step_sizes[int(i)] = (float(entry["step_size"]), choice)
    for record in meta["chains"]:
        i, c = record["scale"], record["chain"]
        if (i, c) not in chains:
            continue
        ch = chains[(i, c)]
        key = f"{i}.{c}"
        ch.trace = tensors[f"trace.{key}"].to(torch.float64).clone()
        ch.step = int(record["step"])
        ch.status = ChainStatus(record["status"])
        ch.reason = record["reason"]
        if "slots" in record:
            ch.position = [tensors[f"position.{key}.{j}"] for j in range(record["slots"])]
            ch.noise = [tensors[f"noise.{key}.{j}"] for j in range(record["slots"])] if record["has_noise"] else None
            ch.noise_gen = torch.Generator(device=ch.position[0].device if ch.position else "cpu")
            ch.noise_gen.set_state(tensors[f"noise_gen.{key}"])
            ch.batch_gen = torch.Generator()
            ch.batch_gen.set_state(tensors[f"batch_gen.{key}"])


class _Checkpointer(ChainCallback):
    """Writes the checkpoint whenever a chain ends (mid-chain saves: ``estimate_neff``'s loop)."""

    def __init__(self, save: Any):
        self.save = save

    def on_chain_end(self, chain: Chain) -> None:
        self.save()



STATUS_CODES = {s: k for k, s in enumerate(ChainStatus)}


def _gather(chains: dict[tuple[int, int], Chain], mine: list[tuple[int, int]], n_steps: int,
            step_sizes: dict[int, tuple[float, StepSizeChoice | None]], n_scales: int) -> None:
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
    for i, (eta, _) in step_sizes.items():
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
            step_sizes[i] = (float(etas[i]), None)


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
        options: how it runs (``StreamOptions``; or its fields as keywords): ``max_tokens`` of
            sampling data; a ``checkpoint`` path written after every chain and every
            ``checkpoint_every`` steps (default 200; per rank under ``torch.distributed``),
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
    n_params = target.n_params
    limit = config.divergence_factor * (n_params / 2 + 1)
    identity = {"config": config.to_dict(), "subset": subset.to_dict(), "target": target.describe(),
                "parameters": [s.to_dict() for s in target.slots], "world_size": world}
    integrator = Integrator(config.integrator)
    chains: dict[tuple[int, int], Chain] = {}
    for i, e in enumerate(config.scales):
        for c in range(config.n_chains):
            chains[(i, c)] = Chain(scale=i, index=c, t=1 / e, gamma=config.gamma, step_size=math.nan,
                                   integrator=integrator, n_steps=config.n_steps, burn_in=config.burn_in,
                                   seed=chain_seed(config.seed, i, c))
    mine = [key for k, key in enumerate(chains) if k % world == rank]
    step_sizes: dict[int, tuple[float, StepSizeChoice | None]] = {}
    path = None if run.checkpoint is None else rank_path(run.checkpoint, rank, world)
    if path is not None and run.resume and path.exists():
        _load_checkpoint(path, identity, chains, step_sizes)

    def save() -> None:
        if path is not None:
            _save_checkpoint(path, identity, {k: chains[k] for k in mine}, step_sizes)

    remaining = sum(config.n_steps - chains[k].step for k in mine if not chains[k].done)
    bar = ProgressBar(remaining, enabled=run.progress)
    guard = DivergenceGuard(limit)
    saver = _Checkpointer(save)
    all_callbacks: list[ChainCallback] = [guard, bar, *callbacks, saver]
    try:
        for key in mine:
            chain = chains[key]
            if chain.done:
                continue
            i = key[0]
            if i not in step_sizes:
                t = 1 / config.scales[i]
                if config.step_size is not None:
                    step_sizes[i] = (float(config.step_size), None)
                else:
                    choice = choose_step_size(target, t, config.gamma, config.step_fraction, integrator,
                                              seed=chain_seed(config.seed, i, -1) % (1 << 31), divergence_limit=limit)
                    step_sizes[i] = (choice.step_size, choice)
            chain.step_size = step_sizes[i][0]
            while not chain.done:
                until = (chain.step // run.checkpoint_every + 1) * run.checkpoint_every if path else None
                run_chain(target, chain, all_callbacks, until=until)
                if not chain.done:
                    save()
    finally:  # interrupted: the last checkpoint (a step boundary) stands; a mid-step state is never saved
        bar.close()
    save()
    if world > 1:
        _gather(chains, mine, config.n_steps, step_sizes, len(config.scales))
    scales = []
    for i, e in enumerate(config.scales):
        eta, how = step_sizes.get(i, (math.nan, None))
        per_chain = [_chain_estimate(chains[(i, c)], config) for c in range(config.n_chains)]
        scales.append(_scale_estimate(e, eta, how, per_chain))
    all_diverged = [s for s in scales if all(c.status == ChainStatus.DIVERGED.value for c in s.chains)]
    if all_diverged:
        s = all_diverged[0]
        raise ValueError(f"every chain diverged at eps={s.eps:g} (step size {s.step_size:.3g}; first: "
                         f"{s.chains[0].reason}). Pass a smaller step_size (or step_size=None to choose it "
                         f"automatically), or a larger gamma (was {config.gamma:g}).")
    return NeffResult(n_params=n_params, parameters=[s.to_dict() for s in target.slots], subset=subset.to_dict(),
                      config=config.to_dict(), target=target.describe(), scales=scales,
                      seconds=round(time.perf_counter() - start, 3), world_size=world)


def quadratic_neff(eigenvalues: Float[Tensor, " n"], eps: float, gamma: float) -> float:
    """``Σ_k t h_k / (t h_k + γ)``: N_eff of a quadratic ``L_B`` with Hessian eigenvalues ``h_k`` (docs/llc.md §1)."""
    h = eigenvalues.to(torch.float64).clamp_min(0)
    t = 1.0 / eps
    return float((t * h / (t * h + gamma)).sum())
