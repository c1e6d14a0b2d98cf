"""SGLD chains on ``p_t(θ) ∝ exp(−U(θ))``, ``U = t·L_B(θ) + γ/2 ‖θ − θ*‖²`` (docs/llc.md §2).

One step (η the step size, ξ, ξ' standard normal, ``∇U = t ∇L̂_B + γ (θ − θ*)`` on a
minibatch drawn uniformly, ``P = L Lᵀ`` the chain's constant preconditioner, ``llc/preconditioner.py``):

    EULER:                 θ' = θ − (η/2) P∇U(θ) + √η L ξ              (devinterp's SGLD when P = I)
    LEIMKUHLER_MATTHEWS:   θ' = θ − (η/2) P∇U(θ) + √η L (ξ + ξ')/2     (ξ' is the next step's ξ)

that is, plain SGLD in the coordinates ``φ = L⁻¹θ`` (docs/llc.md §2).

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

import torch
from torch import Tensor

from .boundaries import Boundaries
from .config import Integrator
from .preconditioner import Factor, IdentityFactor
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
    noise: list[Tensor] | None = None  # ξ of the coming step (Leimkuhler–Matthews), in φ
    fresh: list[Tensor] | None = field(default=None, repr=False)  # scratch for the next draw
    noise_gen: torch.Generator | None = None
    batch_gen: torch.Generator | None = None
    factor: Factor = field(default_factory=IdentityFactor, repr=False)  # L of P = L Lᵀ (not saved: rebuilt)
    squared_gradients: list[Tensor] | None = None  # Σ (∇U)² over the steps, when kept (RMSprop's pilot)

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
    """One Langevin update of every slot, in place (see the module docstring)."""
    lm = chain.integrator is Integrator.LEIMKUHLER_MATTHEWS
    if chain.fresh is None:  # noise buffers, refilled in place every step (no allocation)
        chain.fresh = [torch.empty_like(c) for c in slots.centers]
    if lm and chain.noise is None:
        chain.noise = [torch.empty_like(c).normal_(generator=noise_gen) for c in slots.centers]
    fresh = [buf.normal_(generator=noise_gen) for buf in chain.fresh]
    with torch.no_grad():
        if isinstance(chain.factor, IdentityFactor) and chain.squared_gradients is None:
            _plain_update(slots, grads, chain, fresh)
        else:
            _preconditioned_update(slots, grads, chain, fresh)
    if lm:  # this step's ξ' is the next step's ξ: swap the buffers
        chain.noise, chain.fresh = fresh, chain.noise


def _plain_update(slots: Slots, grads: list[Tensor], chain: Chain, fresh: list[Tensor]) -> None:
    """``P = I``, written as ``θ' = lerp(θ, θ*, ηγ/2) − (ηt/2) g + noise``: whole parameters are updated
    with ``torch._foreach_*`` kernels, no temporaries: three passes for Euler, four for
    Leimkuhler–Matthews (an SGD step is one such pass), plus one Gaussian draw per parameter."""
    eta, t, gamma = chain.step_size, chain.t, chain.gamma
    root = math.sqrt(eta)
    lm = chain.integrator is Integrator.LEIMKUHLER_MATTHEWS
    whole = [i for i, s in enumerate(slots.target.slots) if s.index is None and s.param.is_contiguous()]
    parts = [i for i in range(len(slots.centers)) if i not in set(whole)]
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


def _preconditioned_update(slots: Slots, grads: list[Tensor], chain: Chain, fresh: list[Tensor]) -> None:
    """``θ' = θ + L(−(η/2) Lᵀ∇U + √η ξ̄)``: one ``Lᵀ`` and one ``L`` per step (ξ̄ = ξ, or (ξ + ξ')/2)."""
    eta, t, gamma = chain.step_size, chain.t, chain.gamma
    xs = [s.read() for s in slots.target.slots]
    drift = [(g.reshape(-1) if s.index is None else g.reshape(-1)[s.index]) for s, g in zip(slots.target.slots, grads)]
    drift = list(torch._foreach_mul(drift, t))
    torch._foreach_add_(drift, torch._foreach_sub(xs, slots.centers), alpha=gamma)  # ∇U = t g + γ (θ − θ*)
    if chain.squared_gradients is not None:
        for total, d in zip(chain.squared_gradients, drift):
            total.add_(d.to(total.dtype).square())
    step = chain.factor.upper(drift)
    torch._foreach_mul_(step, -eta / 2)
    if chain.integrator is Integrator.LEIMKUHLER_MATTHEWS:
        assert chain.noise is not None
        torch._foreach_add_(step, chain.noise, alpha=math.sqrt(eta) / 2)
        torch._foreach_add_(step, fresh, alpha=math.sqrt(eta) / 2)
    else:
        torch._foreach_add_(step, fresh, alpha=math.sqrt(eta))
    for slot, x, dx in zip(slots.target.slots, xs, chain.factor.lower(step)):
        if slot.index is None and slot.param.is_contiguous():
            x.add_(dx)  # x is a view of the parameter
        else:
            slot.write(x + dx)


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


def run_chain(target: Target, chain: Chain, callbacks: list[ChainCallback], *, until: int | None = None,
              boundaries: Boundaries | None = None) -> None:
    """Advance ``chain`` to ``until`` steps (default: the end), then write θ* back into the model.

    The chain's position, next noise and generators are kept on ``chain``, so a later call
    (or a restored checkpoint) continues exactly where this one stopped. With ``boundaries``, each
    step is a unit: a checkpoint is written when due, and Ctrl-C / SIGTERM stop the chain between
    steps with its position kept (``llc/boundaries.py``).
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
                if boundaries is None:
                    sgld_step(target, params, slots, chain, callbacks)
                    continue
                with boundaries.unit():
                    sgld_step(target, params, slots, chain, callbacks)
                if boundaries.due() and not chain.done:
                    chain.position = slots.current(chain.position)
                    boundaries.save()
                boundaries.check()
        chain.position = slots.current(chain.position)
        if chain.step >= chain.n_steps and not chain.done:
            chain.status = ChainStatus.OK
    except KeyboardInterrupt:
        if boundaries is not None and boundaries.clean:  # between steps: keep where the chain is
            chain.position = slots.current(chain.position)
        raise
    finally:
        slots.restore()
    if chain.done:
        for cb in callbacks:
            cb.on_chain_end(chain)
