"""SGLD chains on ``p_t(θ) ∝ exp(−U(θ))``, ``U = t·L_B(θ) + γ/2 ‖θ − θ*‖²`` (docs/llc.md §2).

One step (η the step size, ξ, ξ' standard normal, ``∇U = t ∇L̂_B + γ (θ − θ*)`` on a
minibatch drawn uniformly):

    EULER:                 θ' = θ − (η/2) ∇U(θ) + √η ξ              (devinterp's SGLD)
    LEIMKUHLER_MATTHEWS:   θ' = θ − (η/2) ∇U(θ) + √η (ξ + ξ')/2     (ξ' is the next step's ξ)

The chain's state lives in the model's own parameters while it runs (no copy of the model),
and θ* is written back when it stops. What happens around the steps — the loss trace,
divergence, progress bars, checkpoints — is done by ``ChainCallback`` objects, as in
devinterp; the sampler knows none of them by name.
"""
from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .config import Integrator
from .targets import Target


class ChainStatus(str, Enum):
    OK = "ok"
    DIVERGED = "diverged"  # non-finite or exploding loss: stopped, left out
    DRIFTED = "drifted"  # post-burn-in trace not stationary: left out
    PENDING = "pending"  # not finished (checkpointed mid-chain)


def chain_seed(seed: int, scale: int, chain: int) -> int:
    """A 63-bit seed for chain ``chain`` at scale index ``scale`` (independent streams)."""
    import hashlib

    digest = hashlib.sha256(f"tl_degeneracy.llc:{seed}:{scale}:{chain}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Chain:
    """One chain's settings, state and record. ``trace[k]`` is ``L̂_B(θ_k)`` (before step k's update)."""

    scale: int
    index: int
    t: float
    gamma: float
    step_size: float
    integrator: Integrator
    n_steps: int
    burn_in: int
    seed: int
    step: int = 0
    status: ChainStatus = ChainStatus.PENDING
    reason: str | None = None
    trace: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    position: list[Tensor] | None = None  # the slots' entries between runs (None: at θ*)
    noise: list[Tensor] | None = None  # ξ of the coming step (Leimkuhler–Matthews)
    fresh: list[Tensor] | None = field(default=None, repr=False)  # scratch for the next draw
    noise_gen: torch.Generator | None = None
    batch_gen: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.trace.numel() == 0:
            self.trace = torch.full((self.n_steps,), math.nan, dtype=torch.float64)

    @property
    def done(self) -> bool:
        return self.status is not ChainStatus.PENDING

    def stop(self, status: ChainStatus, reason: str) -> None:
        self.status, self.reason = status, reason

    def generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        if self.noise_gen is None or self.batch_gen is None:
            self.noise_gen = torch.Generator(device=device).manual_seed(self.seed)
            self.batch_gen = torch.Generator().manual_seed(self.seed ^ 0x5DEECE66D)
        return self.noise_gen, self.batch_gen

    @property
    def draws(self) -> Tensor:
        """The post-burn-in part of the trace (NaN where the chain was stopped)."""
        return self.trace[self.burn_in:]


class ChainCallback(ABC):  # noqa: B024  (every hook is optional)
    """Observes chains. Override what you need; ``chain.stop(...)`` ends a chain early."""

    def on_chain_start(self, chain: Chain) -> None:  # noqa: B027
        pass

    def on_step(self, chain: Chain, step: int, loss: float) -> None:  # noqa: B027
        pass

    def on_chain_end(self, chain: Chain) -> None:  # noqa: B027
        pass


class DivergenceGuard(ChainCallback):
    """Stops a chain whose loss is not finite or whose ``t·L_B`` exceeds ``limit``."""

    def __init__(self, limit: float):
        self.limit = limit

    def on_step(self, chain: Chain, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            chain.stop(ChainStatus.DIVERGED, f"non-finite loss (NaN or Inf) at step {step}")
        elif chain.t * loss > self.limit:
            chain.stop(ChainStatus.DIVERGED, f"t·L_B = {chain.t * loss:.3g} exceeded {self.limit:.3g} at step {step} "
                                             "(the loss exploded)")


class ProgressBar(ChainCallback):
    """One tqdm bar over every step this process runs."""

    def __init__(self, total: int, desc: str = "SGLD", enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)
        self.total = total

    def on_step(self, chain: Chain, step: int, loss: float) -> None:
        self.bar.update(1)
        if step % 50 == 0:
            self.bar.set_postfix_str(f"ε#{chain.scale} chain {chain.index} t·L={chain.t * loss:.3g}", refresh=False)

    def on_chain_end(self, chain: Chain) -> None:
        left = chain.n_steps - chain.step
        if left > 0:  # stopped early: the bar still ends at its total
            self.bar.update(left)

    def close(self) -> None:
        self.bar.close()


# -- the step ------------------------------------------------------------------------------------

class Slots:
    """θ* of every slot and the write-back of a chain's position."""

    def __init__(self, target: Target):
        self.target = target
        self.centers = target.centers  # θ*, copied once when the target was prepared

    def restore(self) -> None:
        for slot, center in zip(self.target.slots, self.centers):
            slot.write(center)

    def load(self, position: list[Tensor] | None) -> None:
        if position is None:
            self.restore()
        else:
            for slot, values in zip(self.target.slots, position):
                slot.write(values)

    def current(self, into: list[Tensor] | None = None) -> list[Tensor]:
        """The slots' entries now (copied into ``into`` when given: no new allocation)."""
        if into is None or len(into) != len(self.target.slots):
            return [s.read().detach().clone() for s in self.target.slots]
        for buf, slot in zip(into, self.target.slots):
            buf.copy_(slot.read())
        return into


def _gradient(target: Target, params: list[torch.nn.Parameter], batch: int) -> tuple[Tensor, list[Tensor]]:
    loss = target.loss(batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _update(slots: Slots, grads: list[Tensor], chain: Chain, noise_gen: torch.Generator) -> None:
    """One Langevin update of every slot, in place (see the module docstring).

    Written as ``θ' = lerp(θ, θ*, ηγ/2) − (ηt/2) g + noise``: whole parameters are updated with
    ``torch._foreach_*`` kernels, no temporaries: three passes for Euler, four for
    Leimkuhler–Matthews (an SGD step is one such pass), plus one Gaussian draw per parameter.
    """
    eta, t, gamma = chain.step_size, chain.t, chain.gamma
    root = math.sqrt(eta)
    lm = chain.integrator is Integrator.LEIMKUHLER_MATTHEWS
    if chain.fresh is None:  # noise buffers, refilled in place every step (no allocation)
        chain.fresh = [torch.empty_like(c) for c in slots.centers]
    if lm and chain.noise is None:
        chain.noise = [torch.empty_like(c).normal_(generator=noise_gen) for c in slots.centers]
    fresh = [buf.normal_(generator=noise_gen) for buf in chain.fresh]
    whole = [i for i, s in enumerate(slots.target.slots) if s.index is None and s.param.is_contiguous()]
    parts = [i for i in range(len(slots.centers)) if i not in set(whole)]
    with torch.no_grad():
        if whole:
            xs = [slots.target.slots[i].param.view(-1) for i in whole]
            # (1 − ηγ/2) θ + (ηγ/2) θ* in one pass over the parameters (was a mul and an add)
            torch._foreach_lerp_(xs, [slots.centers[i] for i in whole], eta * gamma / 2)
            torch._foreach_add_(xs, [grads[i].reshape(-1) for i in whole], alpha=-eta * t / 2)
            if lm:
                assert chain.noise is not None
                torch._foreach_add_(xs, [chain.noise[i] for i in whole], alpha=root / 2)
                torch._foreach_add_(xs, [fresh[i] for i in whole], alpha=root / 2)
            else:
                torch._foreach_add_(xs, [fresh[i] for i in whole], alpha=root)
        for i in parts:
            slot, center = slots.target.slots[i], slots.centers[i]
            g = grads[i].reshape(-1) if slot.index is None else grads[i].reshape(-1)[slot.index]
            x = slot.read()
            new = x - (eta / 2) * ((x - center) * gamma + t * g)
            if lm:
                assert chain.noise is not None
                new += (root / 2) * (chain.noise[i] + fresh[i])
            else:
                new += root * fresh[i]
            slot.write(new)
    if lm:  # this step's ξ' is the next step's ξ: swap the buffers
        chain.noise, chain.fresh = fresh, chain.noise


def sgld_step(target: Target, params: list[torch.nn.Parameter], slots: Slots, chain: Chain,
              callbacks: list[ChainCallback]) -> None:
    """One step of ``chain`` (its position already in the model): draw a minibatch, record
    ``L̂_B(θ)``, let the callbacks see it, update θ. The body of ``run_chain``'s loop."""
    noise_gen, batch_gen = chain.generators(slots.centers[0].device if slots.centers else torch.device("cpu"))
    batch = 0 if target.n_batches == 1 else int(torch.randint(target.n_batches, (1,), generator=batch_gen))
    loss, grads = _gradient(target, params, batch)
    value = float(loss)
    chain.trace[chain.step] = value
    step = chain.step
    for cb in callbacks:
        cb.on_step(chain, step, value)
    if chain.done:
        return
    _update(slots, grads, chain, noise_gen)
    chain.step += 1


def run_chain(target: Target, chain: Chain, callbacks: list[ChainCallback], *, until: int | None = None) -> None:
    """Advance ``chain`` to ``until`` steps (default: the end), then write θ* back into the model.

    The chain's position, next noise and generators are kept on ``chain``, so a later call
    (or a restored checkpoint) continues exactly where this one stopped.
    """
    slots = Slots(target)
    stop_at = chain.n_steps if until is None else min(until, chain.n_steps)
    if chain.step == 0:
        for cb in callbacks:
            cb.on_chain_start(chain)
    try:
        slots.load(chain.position)
        with target.grads_for_slots() as params:
            while chain.step < stop_at and not chain.done:
                sgld_step(target, params, slots, chain, callbacks)
        chain.position = slots.current(chain.position)
        if chain.step >= chain.n_steps and not chain.done:
            chain.status = ChainStatus.OK
    finally:
        slots.restore()
    if chain.done:
        for cb in callbacks:
            cb.on_chain_end(chain)


# -- automatic step size ---------------------------------------------------------------------------

def top_curvature(target: Target, iterations: int = 12, seed: int = 0) -> float:
    """|largest eigenvalue| of the Hessian of ``L_B`` (slots only) at the model's current
    parameters, by power iteration on Hessian–vector products over the whole data."""
    gen = torch.Generator().manual_seed(seed)
    with target.grads_for_slots() as params:
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]
        masks = []
        for slot, p in zip(target.slots, params):
            m = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            m[slot.index if slot.index is not None else slice(None)] = 1
            masks.append(m.reshape(p.shape))
        v = [x * m for x, m in zip(v, masks)]
        value = 0.0
        for _ in range(iterations):
            norm = math.sqrt(sum(float(x.double().square().sum()) for x in v)) or 1.0
            v = [x / norm for x in v]
            hv = [torch.zeros_like(p) for p in params]
            for b in range(target.n_batches):
                loss = target.loss(b) / target.n_batches
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                pairs = [(g, x) for g, x in zip(grads, v) if g is not None]
                if not pairs:
                    return 0.0
                dot = sum((g * x).sum() for g, x in pairs)
                assert isinstance(dot, Tensor)
                if not dot.requires_grad:  # linear in the slots: no curvature
                    return 0.0
                parts = torch.autograd.grad(dot, params, allow_unused=True)
                hv = [h + (torch.zeros_like(p) if g is None else g.detach()) for h, g, p in zip(hv, parts, params)]
            hv = [h * m for h, m in zip(hv, masks)]
            value = math.sqrt(sum(float(h.double().square().sum()) for h in hv))
            if not math.isfinite(value) or value == 0.0:
                return 0.0 if value == 0.0 else math.inf
            v = hv
    return value


@dataclass
class StepSizeChoice:
    step_size: float
    curvature_at_optimum: float
    curvature_on_chain: float
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "curvature_at_optimum": self.curvature_at_optimum,
                "curvature_on_chain": self.curvature_on_chain, "rounds": self.rounds}


def choose_step_size(target: Target, t: float, gamma: float, fraction: float, integrator: Integrator, seed: int,
                     divergence_limit: float, pilot_steps: int = 60, max_rounds: int = 10) -> StepSizeChoice:
    """``η = fraction / (t·h + γ)`` with ``h`` the largest Hessian eigenvalue of ``L_B`` seen at θ*
    and at the end of a pilot chain; a pilot that diverges divides η by 10 and runs again.

    On a quadratic ``L_B`` this puts the stiffest direction at ``η a_max = fraction`` (stable
    below 4; the Leimkuhler–Matthews scheme is then exact); singular losses, flat at θ*,
    are stiffer away from it, which the pilot chain sees.
    """
    h0 = top_curvature(target, seed=seed)
    eta = fraction / (t * h0 + gamma)
    h1 = 0.0
    for rounds in range(1, max_rounds + 1):
        pilot = Chain(scale=-1, index=rounds, t=t, gamma=gamma, step_size=eta, integrator=integrator,
                      n_steps=pilot_steps, burn_in=0, seed=seed + rounds)
        run_chain(target, pilot, [DivergenceGuard(divergence_limit)])
        if pilot.status is ChainStatus.DIVERGED:
            eta /= 10
            continue
        slots = Slots(target)
        try:
            slots.load(pilot.position)
            h1 = top_curvature(target, seed=seed + rounds)
        finally:
            slots.restore()
        proposal = fraction / (t * max(h0, h1) + gamma)
        if proposal >= eta / 2:
            return StepSizeChoice(min(eta, proposal), h0, h1, rounds)
        eta = proposal
    raise ValueError(f"could not find a stable step size at t = {t:.3g} in {max_rounds} rounds (last tried "
                     f"{eta:.3g}); pass step_size= explicitly, or a larger gamma")
