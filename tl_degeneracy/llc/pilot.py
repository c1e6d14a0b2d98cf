"""The step size of one ε: stiffness in the preconditioner's metric, and a pilot chain (docs/llc.md §2).

With ``P = L Lᵀ`` the sampler is plain SGLD in ``φ = L⁻¹θ``, where ``U`` has the Hessian
``M = Lᵀ(t∇²L_B + γ)L``; a step is stable for ``η·λ_max(M) < 4``, and ``η = step_fraction/λ_max(M)``
is chosen. ``λ_max`` ("the stiffness") is found by power iteration on Hessian–vector products at
θ*, then at the end of a short pilot chain (a singular loss, flat at θ*, is stiffer away from it; a
pilot that diverges divides η by 10 and runs again). RMSprop's ``V`` is the pilot chain's mean
squared gradient of ``U``, so its pilot runs unpreconditioned and the stiffness is measured in the
new metric afterwards.

The pilot is a sequence of units (a Hessian–vector product, a pilot step) with a progress bar; its
whole state is a ``PilotState``, checkpointed and resumed like the chains. It is bounded by
``pilot_seconds``: when the budget runs out, the stage in progress stops and what was measured is used
with a safety factor of 2 (``StepSizeChoice.cut_short`` says which); at least one power iteration at
θ* always runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .boundaries import Boundaries
from .config import Integrator, LLCConfig, Preconditioning
from .curvature import Curvature
from .preconditioner import Factor, IdentityFactor, preconditioner
from .sampler import Chain, ChainCallback, ChainStatus, DivergenceGuard, Slots, run_chain
from .targets import Target

POWER_ITERATIONS = 12  # at most, per measurement
POWER_TOLERANCE = 0.02  # stop when the estimate moved less than this (relative) in one iteration
SAFETY = 2.0  # a power iteration stopped early underestimates λ_max


@dataclass
class StepSizeChoice:
    """How the step size of one ε was chosen (``ScaleEstimate.step_size_choice``)."""

    step_size: float
    stiffness_at_optimum: float  # λ_max(Lᵀ(t∇²L_B + γ)L) at θ*
    stiffness_on_chain: float  # the same at the pilot chain's end (nan: not measured)
    rounds: int
    pilot_steps: int  # pilot-chain steps run
    hessian_vector_products: int
    seconds: float
    cut_short: str | None = None  # what the time budget stopped, and what was used instead

    def to_dict(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "stiffness_at_optimum": self.stiffness_at_optimum,
                "stiffness_on_chain": self.stiffness_on_chain, "rounds": self.rounds, "pilot_steps": self.pilot_steps,
                "hessian_vector_products": self.hessian_vector_products, "seconds": round(self.seconds, 3),
                "cut_short": self.cut_short}


# -- the stiffness ---------------------------------------------------------------------------------

def hessian_vector(target: Target, y: list[Tensor]) -> list[Tensor]:
    """``∇²L_B · y`` on the sampled entries, over the whole data, at the model's current parameters."""
    out = [torch.zeros_like(v) for v in y]
    with target.grads_for_slots() as params:
        full = []
        for slot, p, v in zip(target.slots, params, y):
            z = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            z[slot.index if slot.index is not None else slice(None)] = v.to(p.dtype)
            full.append(z.reshape(p.shape))
        for b in range(target.n_batches):
            loss = target.loss(b) / target.n_batches
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, v) for g, v in zip(grads, full) if g is not None]
            if not pairs:
                continue
            dot = sum((g * v).sum() for g, v in pairs)
            assert isinstance(dot, Tensor)
            if not dot.requires_grad:  # linear in the slots: no curvature
                continue
            parts = torch.autograd.grad(dot, params, allow_unused=True)
            for slot, total, h in zip(target.slots, out, parts):
                if h is not None:
                    flat = h.detach().reshape(-1)
                    total.add_(flat if slot.index is None else flat[slot.index])
    return out


def _norm(vectors: list[Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in vectors))


def power_step(target: Target, factor: Factor, t: float, gamma: float, v: list[Tensor]) -> tuple[list[Tensor], float]:
    """One power iteration on ``M = Lᵀ(t H + γ)L`` (``v`` of unit norm): ``(M v/‖M v‖, ‖M v‖)``."""
    y = factor.lower(v)
    h = hessian_vector(target, y)
    torch._foreach_mul_(h, t)
    torch._foreach_add_(h, y, alpha=gamma)
    r = factor.upper(h)
    value = _norm(r)
    if not math.isfinite(value):
        return v, math.inf
    if value == 0.0:
        return v, 0.0
    torch._foreach_div_(r, value)
    return r, value


def start_vector(target: Target, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(s.numel, generator=gen, dtype=torch.float64).to(s.param) for s in target.slots]
    torch._foreach_div_(v, _norm(v) or 1.0)
    return v


# -- the pilot ---------------------------------------------------------------------------------------

class Stage(str, Enum):
    START = "start"  # stiffness at θ* in the pilot's metric
    CHAIN = "chain"  # the pilot chain
    END = "end"  # stiffness at the chain's end, in the final metric
    RESTART = "restart"  # stiffness at θ* in the final metric (when it differs: RMSprop)
    DONE = "done"


@dataclass
class PilotState:
    """Everything one ε's pilot has measured (checkpointed; see ``PilotState.tensors``)."""

    scale: int
    stage: Stage = Stage.START
    rounds: int = 1
    step_size: float = math.nan
    stiffness: dict[str, float] = field(default_factory=dict)  # per finished stage
    vector: list[Tensor] | None = None  # the power iteration in progress
    iteration: int = 0
    estimate: float = 0.0
    chain: Chain | None = None
    seconds: float = 0.0
    steps: int = 0
    products: int = 0
    cut_short: str | None = None
    choice: StepSizeChoice | None = None

    def record(self) -> dict[str, Any]:
        return {"scale": self.scale, "stage": self.stage.value, "rounds": self.rounds, "step_size": self.step_size,
                "stiffness": self.stiffness, "iteration": self.iteration, "estimate": self.estimate,
                "seconds": self.seconds, "steps": self.steps, "products": self.products, "cut_short": self.cut_short,
                "choice": None if self.choice is None else self.choice.to_dict(),
                "vector": None if self.vector is None else len(self.vector)}

    def tensors(self) -> dict[str, Tensor]:
        return {} if self.vector is None else {f"vector.{j}": v for j, v in enumerate(self.vector)}

    @classmethod
    def restore(cls, record: dict[str, Any], tensors: dict[str, Tensor]) -> PilotState:
        state = cls(scale=int(record["scale"]), stage=Stage(record["stage"]), rounds=int(record["rounds"]),
                    step_size=float(record["step_size"]), stiffness=dict(record["stiffness"]),
                    iteration=int(record["iteration"]), estimate=float(record["estimate"]),
                    seconds=float(record["seconds"]), steps=int(record["steps"]), products=int(record["products"]),
                    cut_short=record["cut_short"])
        if record["vector"] is not None:
            state.vector = [tensors[f"vector.{j}"] for j in range(record["vector"])]
        if record["choice"] is not None:
            state.choice = StepSizeChoice(**record["choice"])
        return state

    def rms(self) -> list[Tensor] | None:
        """RMSprop's ``V``: the pilot chain's mean ``(∇U)²`` (None before any step)."""
        chain = self.chain
        if chain is None or chain.squared_gradients is None or chain.step == 0:
            return None
        return [s / chain.step for s in chain.squared_gradients]


class _Tick(ChainCallback):
    def __init__(self, bar: Any):
        self.bar = bar

    def on_step(self, chain: Chain, step: int, loss: float) -> None:
        self.bar.update(1)


class _Clock(ChainCallback):
    """Stops the pilot chain once the pilot's time budget is spent."""

    def __init__(self, pilot: Pilot):
        self.pilot = pilot

    def on_step(self, chain: Chain, step: int, loss: float) -> None:
        if self.pilot.over_budget():
            chain.stop(ChainStatus.OK, "time budget")


class Pilot:
    """Runs one ε's pilot from ``state`` to ``Stage.DONE`` (see the module docstring)."""

    def __init__(self, target: Target, config: LLCConfig, curvature: Curvature, state: PilotState, t: float,
                 seed: int, divergence_limit: float, boundaries: Boundaries, progress: bool = True):
        self.target, self.config, self.curvature, self.state = target, config, curvature, state
        self.t, self.gamma, self.seed = t, float(config.gamma), seed  # type: ignore[arg-type]
        self.kind = config.preconditioning
        self.fraction = float(config.step_fraction)  # type: ignore[arg-type]
        self.limit = divergence_limit
        self.boundaries = boundaries
        self.budget = config.pilot_seconds
        self.progress = progress
        self.started = time.monotonic()
        self.seconds_before = state.seconds

    # the factors: the pilot chain's (RMSprop: unpreconditioned) and the chains'
    def pilot_factor(self) -> Factor:
        if self.kind is Preconditioning.RMSPROP:
            return IdentityFactor()
        return preconditioner(self.kind, self.curvature, self.target, self.t, self.gamma)

    def final_factor(self) -> Factor:
        return preconditioner(self.kind, self.curvature, self.target, self.t, self.gamma, self.state.rms())

    def elapsed(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def over_budget(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget  # type: ignore[operator]

    def _sync(self) -> None:
        self.state.seconds = self.elapsed()

    def _after_unit(self, bar: Any) -> None:
        bar.update(1)
        self._sync()
        if self.boundaries.due():
            self.boundaries.save()
        self.boundaries.check()

    def _note(self, text: str) -> None:
        st = self.state
        st.cut_short = text if st.cut_short is None else f"{st.cut_short}; {text}"

    def _stiffness(self, factor: Factor, at_chain_end: bool, name: str, bar: Any) -> float:
        """λ_max of this stage, resumable one product at a time. When the budget is spent (after at least
        one product) the estimate so far, times ``SAFETY``, is used and noted."""
        st = self.state
        if name in st.stiffness:
            return st.stiffness[name]
        if st.vector is None:
            seed = self.seed + 7919 * st.rounds + len(name)
            st.vector, st.iteration, st.estimate = start_vector(self.target, seed), 0, 0.0
        slots = Slots(self.target)
        value = st.estimate
        try:
            if at_chain_end:
                assert st.chain is not None
                slots.load(st.chain.position)
            while st.iteration < POWER_ITERATIONS:
                if st.iteration >= 1 and self.over_budget():
                    self._note(f"the time budget (pilot_seconds={self.budget:g}) ran out in the power iteration "
                               f"'{name}' after {st.iteration} products: {SAFETY:g} × its estimate was used")
                    value = SAFETY * st.estimate
                    break
                with self.boundaries.unit():
                    vector, estimate = power_step(self.target, factor, self.t, self.gamma, st.vector)
                    previous = st.estimate
                    st.vector, st.estimate, st.iteration = vector, estimate, st.iteration + 1
                    st.products += 1
                value = estimate
                self._after_unit(bar)
                settled = st.iteration > 1 and abs(estimate - previous) <= POWER_TOLERANCE * estimate
                if not math.isfinite(estimate) or settled:
                    break
        finally:
            slots.restore()
        bar.update(POWER_ITERATIONS - st.iteration)
        st.stiffness[name], st.vector = value, None
        return value

    def _new_chain(self) -> Chain:
        st = self.state
        chain = Chain(scale=st.scale, index=-st.rounds, t=self.t, gamma=self.gamma, step_size=st.step_size,
                      integrator=Integrator(self.config.integrator), n_steps=int(self.config.pilot_steps),  # type: ignore[call-overload]
                      burn_in=0, seed=self.seed + 104729 * st.rounds)
        if self.kind is Preconditioning.RMSPROP:
            chain.squared_gradients = [torch.zeros(s.numel, dtype=torch.float64, device=s.param.device)
                                       for s in self.target.slots]
        return chain

    def run(self) -> tuple[StepSizeChoice, Factor]:
        """The step size and the chains' factor ``L`` of this ε (from ``state`` on: it resumes)."""
        from tqdm.auto import tqdm

        st = self.state
        given = self.config.step_size
        runs_chain = self.config.pilot_steps > 0 and (given is None or self.kind is Preconditioning.RMSPROP)  # type: ignore[operator]
        total = (0 if given is not None else 2 * POWER_ITERATIONS) + (int(self.config.pilot_steps) if runs_chain else 0)  # type: ignore[call-overload]
        bar = tqdm(total=total, desc=f"pilot ε#{st.scale}", disable=not self.progress or st.stage is Stage.DONE,
                   leave=False)
        try:
            while st.stage is not Stage.DONE:
                self._advance(bar, given, runs_chain)
        finally:
            bar.close()
        self._sync()
        st.choice = StepSizeChoice(
            step_size=st.step_size,
            stiffness_at_optimum=st.stiffness.get("at_optimum_final", st.stiffness.get("at_optimum", math.nan)),
            stiffness_on_chain=st.stiffness.get("on_chain", math.nan), rounds=st.rounds, pilot_steps=st.steps,
            hessian_vector_products=st.products, seconds=st.seconds, cut_short=st.cut_short)
        return st.choice, self.final_factor()

    def _advance(self, bar: Any, given: float | None, runs_chain: bool) -> None:
        """One stage (see ``Stage``)."""
        st = self.state
        if st.stage is Stage.START:
            if given is not None:
                st.step_size = float(given)
            else:
                stiff = self._stiffness(self.pilot_factor(), False, "at_optimum", bar)
                st.step_size = self.fraction / stiff if stiff > 0 else 1.0
            st.stage = Stage.CHAIN if runs_chain and st.cut_short is None else Stage.DONE
        elif st.stage is Stage.CHAIN:
            if st.chain is None:
                st.chain = self._new_chain()
            chain = st.chain
            chain.step_size, chain.factor = st.step_size, self.pilot_factor()
            run_chain(self.target, chain, [DivergenceGuard(self.limit), _Tick(bar), _Clock(self)],
                      boundaries=self.boundaries)
            st.steps += chain.step
            if chain.status is ChainStatus.DIVERGED:
                if st.rounds >= 10:
                    raise ValueError(f"could not find a stable step size at t = {self.t:.3g} in {st.rounds} rounds "
                                     f"(last tried {st.step_size:.3g}); pass step_size= explicitly, or a larger gamma")
                st.step_size /= 10
                st.rounds += 1
                st.chain = None  # a diverged chain's V is no preconditioner
                if self.over_budget():
                    self._note(f"the pilot chain diverged and the time budget (pilot_seconds={self.budget:g}) is "
                               "spent: a tenth of its step size was used without another pilot")
                    st.stage = Stage.DONE
                return
            if chain.reason == "time budget":
                self._note(f"the time budget (pilot_seconds={self.budget:g}) ran out in the pilot chain after "
                           f"{chain.step} of {chain.n_steps} steps")
            st.stage = Stage.END if given is None else Stage.DONE
        elif st.stage is Stage.END:
            self._stiffness(self.final_factor(), True, "on_chain", bar)
            st.stage = Stage.RESTART if self.kind is Preconditioning.RMSPROP else Stage.DONE
            if st.stage is Stage.DONE:
                self._propose()
        elif st.stage is Stage.RESTART:
            self._stiffness(self.final_factor(), False, "at_optimum_final", bar)
            st.stage = Stage.DONE
            self._propose()

    def _propose(self) -> None:
        """η from the stiffness measured. A pilot whose chain needs a much smaller step than it ran with
        was a different pilot: it runs again with that step (RMSprop: the new metric's step is taken)."""
        st = self.state
        if self.kind is Preconditioning.RMSPROP:
            worst = max(st.stiffness.get("on_chain", 0.0), st.stiffness.get("at_optimum_final", 0.0))
            st.step_size = self.fraction / worst if worst > 0 else st.step_size
            return
        worst = max(st.stiffness.get("at_optimum", 0.0), st.stiffness.get("on_chain", 0.0))
        proposal = self.fraction / worst if worst > 0 else st.step_size
        if proposal < st.step_size / 2 and st.cut_short is None and st.rounds < 10:
            st.step_size, st.rounds, st.chain, st.stage = proposal, st.rounds + 1, None, Stage.CHAIN
            st.stiffness.pop("on_chain", None)
            return
        st.step_size = min(st.step_size, proposal)
