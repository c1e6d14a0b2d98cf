"""What one ``N_eff(ε)`` estimate samples: frozen, validated, and its identity in a checkpoint.

``LLCConfig`` holds the sampler's settings (scales ε, localisation γ, step size, chains,
draws, burn-in, integrator, seed, minibatching, diagnostics); ``ParamSubset`` says which
parameters move (the rest stay at θ*). Both validate on construction, with one
``ValueError`` naming the option to change, and describe themselves with ``to_dict()``:
the identity a checkpoint records, so that resuming a different run is refused, naming the
field (docs/llc.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..hook_names import LOGITS
from ..losses import MSE, BehavioralLoss, as_loss
from ..validation import (
    int_at_least,
    int_tuple,
    integer,
    nonnegative_int,
    one_of,
    optional_positive_int,
    positive_float,
    positive_floats,
    positive_int,
)


class Integrator(str, Enum):
    """The Langevin discretisation (docs/llc.md §2). ``U(θ) = t·L_B(θ) + γ/2 ‖θ − θ*‖²``.

    ``EULER``: devinterp's SGLD, ``θ' = θ − (η/2)∇U(θ) + √η ξ``. Its stationary law is biased
    by O(η): on a quadratic with curvature ``a`` the variance is ``1/(a(1 − ηa/4))``.
    ``LEIMKUHLER_MATTHEWS``: the same drift with the noise of two steps averaged,
    ``θ' = θ − (η/2)∇U(θ) + √η (ξ + ξ')/2``; one gradient per step as well, exact on
    quadratics for every stable η and O(η²) otherwise, so larger steps can be taken.
    """

    EULER = "euler"
    LEIMKUHLER_MATTHEWS = "leimkuhler_matthews"


class Preconditioning(str, Enum):
    """The sampler's constant preconditioner ``P`` (docs/llc.md §2; built in ``llc/preconditioner.py``).

    Each aims at ``P ≈ (t Ĥ + γ)⁻¹`` with ``Ĥ`` an estimate of the Hessian of ``L_B`` at θ*, so that every
    direction relaxes in about the same number of steps. ``NONE``: plain SGLD. ``DIAG``: the
    Gauss–Newton diagonal (output probes). ``KFAC``: ``G ⊗ K`` blocks on the weight matrices the subset
    holds whole (the degeneracy account's Grams), the diagonal elsewhere. ``RMSPROP``: ``1/(√V + √γ)``
    with ``V`` the mean squared gradient of ``U`` over the pilot chain, then frozen. ``EKFAC``: the K-FAC
    blocks refined: value matrices factored at their attention-mixed input and ``hook_z``, and each
    block's eigenvalues replaced by the Gauss–Newton diagonal in its eigenbasis (EK-FAC). Any constant
    positive-definite ``P`` samples the same posterior; they differ in how fast it mixes.
    """

    NONE = "none"
    DIAG = "diag"
    KFAC = "kfac"
    EKFAC = "ekfac"
    RMSPROP = "rmsprop"


@dataclass(frozen=True)
class LLCConfig:
    """Settings of the SGLD estimate of ``N_eff(ε) = 2 t E_t[L_B]`` (docs/llc.md).

    Args:
        eps: loss scale(s) ε; each is sampled at inverse temperature ``t = 1/ε``.
        gamma: localisation γ of ``p_t(θ) ∝ exp(−t L_B(θ) − γ/2 ‖θ − θ*‖²)``: directions whose
            curvature is below ``γ ε`` count little (N_eff's soft cut-off).
        step_size: SGLD step η (in the preconditioner's metric: ``θ' = θ − (η/2) P∇U + √η L ξ``), or
            None to choose it per ε from the stiffness seen at θ* and along a pilot chain
            (``η = step_fraction / λ_max(Lᵀ(t∇²L_B + γ)L)``; plain SGLD: ``step_fraction / (t h_max + γ)``).
        step_fraction: ``η·λ_max`` targeted by the automatic choice (stability needs < 4).
        preconditioner: ``"ekfac"`` (default), ``"kfac"``, ``"diag"``, ``"rmsprop"`` or ``"none"``
            (``Preconditioning``; docs/llc.md §2 compares them).
        pilot_steps: steps of the pilot chain run per ε before the chains (RMSprop's ``V`` is its mean
            squared gradient; the stiffness at its end guards against losses stiffer away from θ*).
        pilot_seconds: wall-clock budget of each ε's pilot (the curvature estimate counts towards the
            first); when it runs out, what was measured so far is used with a safety factor of 2 and the
            record says so. None: no limit. Not part of the run's identity.
        curvature_probes: output probes for the Gauss–Newton diagonal (and K-FAC's ``K`` when the
            Grams are collected here).
        n_chains, n_draws, burn_in: chains per ε; recorded draws per chain; steps discarded first.
        integrator: ``"leimkuhler_matthews"`` (default) or ``"euler"`` (devinterp's SGLD).
        seed: chain ``c`` at scale index ``i`` draws from a generator seeded by ``(seed, i, c)``.
        batch_size: sequences (rows) per minibatch; None: the whole data set every step.
        loss: ``"mse"`` (``½‖z − z*‖²`` per datapoint, docs/theory.md §1) or ``"kl"`` (logits only).
        output: ``"logits"`` or a hook name (local analysis up to that hook).
        output_positions: output positions kept (e.g. ``[-1]``); None keeps every position.
        drift_z: a chain whose post-burn-in halves differ by more than this many standard
            errors is flagged as drifting and left out.
        divergence_factor: a chain is stopped as diverged when ``t·L_B`` exceeds this factor
            times ``N/2 + 1`` (``N/2``: the largest learning coefficient of N parameters) or
            is not finite.
    """

    eps: float | Sequence[float]
    gamma: float = 100.0
    step_size: float | None = None
    step_fraction: float = 0.5
    preconditioner: Preconditioning | str = Preconditioning.EKFAC
    pilot_steps: int = 60
    pilot_seconds: float | None = 300.0
    curvature_probes: int = 8
    n_chains: int = 4
    n_draws: int = 400
    burn_in: int = 100
    integrator: Integrator | str = Integrator.LEIMKUHLER_MATTHEWS
    seed: int = 0
    batch_size: int | None = None
    loss: str | BehavioralLoss = field(default_factory=MSE)
    output: str = LOGITS
    output_positions: int | Sequence[int] | None = None
    drift_z: float = 4.0
    divergence_factor: float = 100.0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("eps", positive_floats(self.eps, "eps (each loss scale ε)", "ε is the loss scale: the sampler runs at "
                                   "inverse temperature t = 1/ε; pass e.g. eps=1e-3."))
        put("gamma", positive_float(self.gamma, "gamma", "γ localises the sampler at θ*; pass e.g. gamma=100."))
        if self.step_size is not None:
            put("step_size", positive_float(self.step_size, "step_size", "Pass a positive SGLD step η, or "
                                            "step_size=None to choose it automatically."))
        put("step_fraction", positive_float(self.step_fraction, "step_fraction",
                                            "The automatic step aims at η·a_max = step_fraction; values in (0, 2] "
                                            "are stable."))
        if self.step_fraction >= 4:  # type: ignore[operator]
            raise ValueError(f"step_fraction={self.step_fraction} is unstable: Langevin steps need η·a_max < 4; "
                             "pass a value in (0, 2].")
        put("preconditioner", one_of(self.preconditioner, Preconditioning, "preconditioner"))
        put("pilot_steps", int_at_least(self.pilot_steps, 0, "pilot_steps"))
        if self.pilot_seconds is not None:
            put("pilot_seconds", positive_float(self.pilot_seconds, "pilot_seconds", "It is the wall-clock budget of "
                                                "each ε's step-size pilot; pass None for no limit."))
        put("curvature_probes", positive_int(self.curvature_probes, "curvature_probes"))
        put("n_chains", positive_int(self.n_chains, "n_chains"))
        put("n_draws", int_at_least(self.n_draws, 4, "n_draws"))
        put("burn_in", int_at_least(self.burn_in, 0, "burn_in"))
        put("integrator", one_of(self.integrator, Integrator, "integrator"))
        integer(self.seed, "seed")
        put("batch_size", optional_positive_int(self.batch_size, "batch_size"))
        put("loss", as_loss(self.loss))
        if not isinstance(self.output, str) or not self.output:
            raise ValueError(f"output must be 'logits' or a hook name, got {self.output!r}")
        if self.behavioral_loss.needs_logits and self.output != LOGITS:
            raise ValueError(f"loss={self.behavioral_loss.name!r} needs output='logits' (it uses the softmax)")
        put("output_positions", int_tuple(self.output_positions, "output_positions"))
        put("drift_z", positive_float(self.drift_z, "drift_z", "It is the drift test's threshold in standard errors."))
        put("divergence_factor", positive_float(self.divergence_factor, "divergence_factor",
                                                "A chain whose t·L_B exceeds it times N/2 + 1 is stopped as diverged."))

    @property
    def behavioral_loss(self) -> BehavioralLoss:
        assert isinstance(self.loss, BehavioralLoss)
        return self.loss

    @property
    def scales(self) -> tuple[float, ...]:
        assert isinstance(self.eps, tuple)
        return self.eps

    @property
    def n_steps(self) -> int:
        return self.burn_in + self.n_draws  # type: ignore[operator]

    @property
    def preconditioning(self) -> Preconditioning:
        return Preconditioning(self.preconditioner)

    def to_dict(self) -> dict[str, Any]:
        """Everything that changes the draws (``pilot_seconds`` is a wall-clock budget: a resumed run may
        have another; where it cut a pilot short, the step-size record says so)."""
        return {"eps": list(self.scales), "gamma": self.gamma, "step_size": self.step_size,
                "step_fraction": self.step_fraction, "preconditioner": Preconditioning(self.preconditioner).value,
                "pilot_steps": self.pilot_steps, "curvature_probes": self.curvature_probes,
                "n_chains": self.n_chains, "n_draws": self.n_draws,
                "burn_in": self.burn_in, "integrator": Integrator(self.integrator).value, "seed": self.seed,
                "batch_size": self.batch_size, "loss": self.behavioral_loss.name, "output": self.output,
                "output_positions": None if self.output_positions is None
                else list(self.output_positions),  # type: ignore[arg-type]
                "drift_z": self.drift_z, "divergence_factor": self.divergence_factor}


@dataclass(frozen=True)
class ParamSubset:
    """Which parameters the chains move; every other parameter stays at θ*.

    Names are TransformerLens's (``blocks.1.attn.W_Q``, ``unembed.W_U``, ``blocks.0.mlp.b_out``)
    on both generations (a ``TransformerBridge``'s own parameters are mapped to them), or a
    plain module's ``named_parameters()`` names.

    Args:
        names: glob patterns (``"blocks.1.attn.W_*"``); None: every parameter (or ``layer``'s).
        layer: only parameters of ``blocks.{layer}``.
        head: only this head's slice of the matched attention tensors (``W_Q/W_K/W_V/W_O``,
            ``b_Q/b_K/b_V``: their leading head axis); other matched tensors are refused.
    """

    names: str | Sequence[str] | None = None
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        names = self.names
        if names is not None:
            items = [names] if isinstance(names, str) else list(names)
            if not items or any(not isinstance(n, str) or not n for n in items):
                raise ValueError(f"names must be a glob pattern or a non-empty list of them, got {names!r}")
            object.__setattr__(self, "names", tuple(items))
        for what in ("layer", "head"):
            if getattr(self, what) is not None:
                nonnegative_int(getattr(self, what), what)

    @property
    def patterns(self) -> tuple[str, ...]:
        return ("*",) if self.names is None else tuple(self.names)

    def selects(self, name: str) -> bool:
        """Whether the parameter ``name`` (TransformerLens naming) is in the subset."""
        import fnmatch

        if self.layer is not None and not name.startswith(f"blocks.{self.layer}."):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def describe(self) -> str:
        text = ",".join(self.names) if self.names is not None else "all parameters"
        if self.layer is not None:
            text += f" in layer {self.layer}"
        if self.head is not None:
            text += f", head {self.head}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"names": None if self.names is None else list(self.names), "layer": self.layer, "head": self.head}


def as_subset(spec: ParamSubset | str | Sequence[str] | None) -> ParamSubset:
    """``ParamSubset`` from a subset, a glob or a list of globs (None: every parameter)."""
    if isinstance(spec, ParamSubset):
        return spec
    return ParamSubset(names=spec)
