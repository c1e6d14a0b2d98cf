"""The configuration of a collection run: frozen, validated, and what the checkpoint records.

``JacobianConfig`` says how Jacobian Grams ``M`` are taken (output, behavioural loss, probes
or exact mode); ``RunConfig`` says what one pass over the data accumulates (hooks,
positions, batching, Jacobians, observers). Both validate on construction and describe
themselves with ``to_dict()``: that dictionary is the run's identity in a checkpoint, in
``Stats.run`` and in ``report.json``, so a resumed run is refused whenever any field differs.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Union

import torch
from torch import Tensor

from ..generations import HookedModel
from ..hook_names import LOGITS, HookSpec, resolve_hooks
from ..losses import MSE, BehavioralLoss, as_loss
from ..positions import PositionSpec
from ..validation import int_tuple, integer, one_of, positive_int
from .observers import Observer
from .readout import LinearReadout, find_readout

OutputSpec = Union[str, Callable[[Tensor], Tensor]]
DEFAULT_PROBES = 4


class ProbeSpace(str, Enum):
    """Where logit probes are drawn (docs/theory.md §2, ``readout.py``).

    ``AUTO`` resolves, against the model, to ``RESIDUAL`` when the output is the logits, the
    loss is MSE and the logits are a linear read-out of ``unembed.hook_in``; else ``VOCABULARY``.
    Both give the same ``E[M]`` (and, in exact mode, the same ``M``); the recorded choice is
    part of the run identity because the random draws differ.
    """

    AUTO = "auto"
    VOCABULARY = "vocabulary"
    RESIDUAL = "residual"


class ProbeKind(str, Enum):
    """Distribution of the noise ``ξ`` in a probe ``v = B ξ`` (any with ``E[ξ ξᵀ] = I`` works)."""

    RADEMACHER = "rademacher"  # ±1: the lowest-variance choice for the Gram's diagonal
    GAUSSIAN = "gaussian"


def describe_callable(fn: Callable | None) -> str | None:
    if fn is None:
        return None
    return "callable:" + getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__))


@dataclass(frozen=True)
class JacobianConfig:
    """How the Jacobian Gram ``M = 1/n Σ Jᵀ H J`` is taken (docs/theory.md §2).

    Args:
        n_probes: random probes ``v = B ξ`` per batch (default 4). Must be a positive
            integer; ask for ``exact=True`` to loop over every output component instead.
        exact: one backward pass per output component (the reference the estimator is
            tested against; ``positions × d_vocab`` passes per batch on logits).
        output: ``"logits"``, a hook name (local analysis up to that hook) or a callable on
            the logits returning ``[batch, pos, d]``.
        output_positions: output positions kept (e.g. ``[-1]``); not with a callable output.
        loss: the behavioural loss, ``"mse"`` (paper default), ``"kl"`` or a ``BehavioralLoss``.
        probe: ``"rademacher"`` or ``"gaussian"`` noise.
        seed: probes of batch ``i`` are drawn from a generator seeded by ``(seed, i)``.
        probe_chunk: probes per vmapped backward pass (memory, not results); None sizes it
            from a memory budget (``chunk_budget_bytes``; on CUDA half the free memory).
        probe_space: ``"auto"``, ``"residual"`` or ``"vocabulary"`` (see ``ProbeSpace``).
        output_transform: with ``output`` a hook, a map applied to its ``[batch, pos, d]``
            activation first (``InteractionBasis.fit_local``); ``output_transform_id`` names
            it in the run identity (a hash of the basis), since a function cannot be compared.
    """

    n_probes: int | None = None
    exact: bool = False
    output: OutputSpec = LOGITS
    output_positions: int | Sequence[int] | None = None
    loss: str | BehavioralLoss = field(default_factory=MSE)
    probe: ProbeKind | str = ProbeKind.RADEMACHER
    seed: int = 0
    probe_chunk: int | None = None
    probe_space: ProbeSpace | str = ProbeSpace.AUTO
    chunk_budget_bytes: int = 256 * 2**20
    output_transform: Callable[[Tensor], Tensor] | None = field(default=None, compare=False)
    output_transform_id: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.exact:
            if self.n_probes is not None:
                raise ValueError(f"exact=True loops over every output component; n_probes={self.n_probes!r} "
                                 "would be ignored. Pass either n_probes or exact=True, not both.")
        else:
            n = DEFAULT_PROBES if self.n_probes is None else self.n_probes
            put("n_probes", positive_int(n, "n_probes", "For exact Jacobian Grams pass exact=True."))
        put("loss", as_loss(self.loss))
        put("probe", one_of(self.probe, ProbeKind, "probe"))
        put("output_positions", int_tuple(self.output_positions, "output_positions"))
        if self.probe_chunk is not None:
            put("probe_chunk", positive_int(self.probe_chunk, "probe_chunk"))
        put("chunk_budget_bytes", positive_int(self.chunk_budget_bytes, "chunk_budget_bytes"))
        put("probe_space", one_of(self.probe_space, ProbeSpace, "probe_space"))
        if self.probe_space is ProbeSpace.RESIDUAL and (self.output != LOGITS or self.behavioral_loss.needs_logits):
            raise ValueError("probe_space='residual' needs output='logits' and loss='mse' (a linear read-out of the "
                             "unembedding input); use probe_space='auto' to fall back to vocabulary probes")
        integer(self.seed, "seed")
        if not (isinstance(self.output, str) or callable(self.output)):
            raise TypeError(f"output must be 'logits', a hook name or a callable, got {type(self.output).__name__}")
        if callable(self.output) and self.output_positions is not None:
            raise ValueError("output_positions cannot be applied to a callable output: select the positions "
                             "inside the callable, or use output='logits' with output_positions")
        if self.loss.needs_logits and self.output != LOGITS:  # type: ignore[union-attr]
            raise ValueError(f"loss={self.loss.name!r} needs output='logits' (it uses the softmax of the output)")  # type: ignore[union-attr]
        if self.output_transform is not None and not (isinstance(self.output, str) and self.output != LOGITS):
            raise ValueError("output_transform applies to a hook output only (output='blocks.N.hook_...')")
        if self.output_transform is not None and self.output_transform_id is None:
            put("output_transform_id", describe_callable(self.output_transform))

    @property
    def behavioral_loss(self) -> BehavioralLoss:
        assert isinstance(self.loss, BehavioralLoss)
        return self.loss

    @property
    def output_hook(self) -> str | None:
        """The hook the output is read from, when it is one."""
        return self.output if isinstance(self.output, str) and self.output != LOGITS else None

    def to_dict(self) -> dict[str, Any]:
        """Everything that changes ``M`` (``probe_chunk`` does not)."""
        out = self.output if isinstance(self.output, str) else describe_callable(self.output)
        return {"exact": self.exact, "n_probes": self.n_probes, "output": out,
                "output_positions": None if self.output_positions is None
                else list(self.output_positions),  # type: ignore[arg-type]  # a tuple after __post_init__
                "loss": self.behavioral_loss.name, "probe": ProbeKind(self.probe).value, "seed": self.seed,
                "output_transform": self.output_transform_id, "probe_space": ProbeSpace(self.probe_space).value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JacobianConfig:
        """The recorded form (a callable output comes back as its description string)."""
        return cls(n_probes=data["n_probes"], exact=data["exact"], output=data["output"],
                   output_positions=data["output_positions"], loss=data["loss"], probe=data["probe"],
                   seed=data["seed"], output_transform_id=data.get("output_transform"),
                   probe_space=data.get("probe_space", "vocabulary"))


def describe_positions(positions: PositionSpec) -> str | list[int]:
    """A JSON-able, process-independent description of a position selection."""
    if positions is None:
        return "all"
    if isinstance(positions, Tensor):
        digest = hashlib.sha256(positions.detach().cpu().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return f"mask:{list(positions.shape)}:{int(positions.sum())}:{digest}"
    return [int(positions)] if isinstance(positions, int) else [int(p) for p in positions]


def _normalise_positions(positions: Any, hooks: tuple[str, ...]) -> Any:
    if isinstance(positions, Mapping):
        stray = [h for h in positions if h not in hooks]
        if stray:
            raise ValueError(f"positions names hooks that are not collected: {stray} (hooks: {list(hooks)})")
        return {h: _normalise_positions(positions[h], hooks) for h in hooks if h in positions}
    if isinstance(positions, (list, tuple, int)) and not isinstance(positions, bool):
        return int_tuple(positions, "positions")
    return positions


@dataclass(frozen=True)
class RunConfig:
    """What one pass over the data accumulates. Build it with ``RunConfig.build(model, ...)``.

    Attributes:
        hooks: hook points with activation Grams ``G`` (names as the user wrote them).
        jacobian_hooks: hook points with Jacobian Grams ``M`` (empty without Jacobians): by default the
            ``hooks``; any others get ``M`` only (the degeneracy account needs ``G`` at weight matrices'
            inputs and ``M`` at their outputs, never both).
        positions: datapoints per sequence: None (all), ints (``[-1]``) or a boolean mask; or a
            dict ``{hook: positions}`` choosing them per hook (hooks not in it: all positions;
            observers then see every non-padding position) — one pass serves them all.
        batch_size: sequences per batch (token tensors and text datasets are cut to it).
        context: tokens per sequence when text is tokenized (None: the model's n_ctx, ≤ 1024).
        jacobians: ``JacobianConfig`` or None.
        observers: further collectors (``HeadSync()``, ``NeuronSync()``), resolved to the model.
    """

    hooks: tuple[str, ...]
    jacobian_hooks: tuple[str, ...] = ()
    positions: PositionSpec | Mapping[str, PositionSpec] = None
    batch_size: int = 8
    context: int | None = None
    jacobians: JacobianConfig | None = None
    observers: tuple[Observer, ...] = ()
    # The model's unembedding as a linear read-out when probes are drawn in the residual basis
    # (derived from the model in build(); the recorded identity is jacobians.probe_space).
    readout: LinearReadout | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        model: HookedModel,
        hooks: HookSpec = None,
        *,
        jacobians: bool | JacobianConfig = False,
        jacobian_hooks: HookSpec = None,
        positions: PositionSpec | Mapping[str, PositionSpec] = None,
        batch_size: int = 8,
        context: int | None = None,
        observers: Sequence[Observer] = (),
    ) -> RunConfig:
        """Resolve hook names against ``model`` and validate every option. ``hooks=[]`` with observers: a
        pass that only feeds the observers (no Grams)."""
        observers_only = bool(observers) and isinstance(hooks, (list, tuple)) and not hooks
        names = () if observers_only else tuple(resolve_hooks(model, hooks))
        jac = JacobianConfig() if jacobians is True else (jacobians or None)
        if jac is not None and not isinstance(jac, JacobianConfig):
            raise TypeError(f"jacobians must be True/False or a JacobianConfig, got {type(jacobians).__name__}")
        m_names: tuple[str, ...] = ()
        if jac is not None:
            if jac.output_hook is not None:
                resolve_hooks(model, [jac.output_hook])
            m_names = names if jacobian_hooks is None else tuple(resolve_hooks(model, jacobian_hooks))
        elif jacobian_hooks is not None:
            raise ValueError("jacobian_hooks given without jacobians: pass jacobians=True (or a JacobianConfig)")
        positive_int(batch_size, "batch_size")
        if context is not None:
            positive_int(context, "context")
            n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
            if n_ctx is not None and context > int(n_ctx):
                raise ValueError(f"context={context} is longer than the model's n_ctx={n_ctx}")
        positions = _normalise_positions(positions, tuple(dict.fromkeys((*names, *m_names))))
        readout = None
        if jac is not None and jac.probe_space is not ProbeSpace.VOCABULARY:
            eligible = jac.output == LOGITS and not jac.behavioral_loss.needs_logits
            readout = find_readout(model) if eligible else None
            if readout is None and jac.probe_space is ProbeSpace.RESIDUAL:
                raise ValueError("probe_space='residual': this model's logits are not a linear read-out of "
                                 "unembed.hook_in; use probe_space='auto' or 'vocabulary'")
            jac = replace(jac, probe_space=ProbeSpace.RESIDUAL if readout is not None else ProbeSpace.VOCABULARY)
        resolved = []
        for obs in observers:
            if not isinstance(obs, Observer):
                raise TypeError(f"observers must be Observer objects (e.g. HeadSync(), NeuronSync()), got {obs!r}")
            resolved.append(obs.resolve(model))
        kinds = [o.kind for o in resolved]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each observer kind may be given once, got {kinds}")
        return cls(hooks=names, jacobian_hooks=m_names, positions=positions, batch_size=batch_size,
                   context=context, jacobians=jac, observers=tuple(resolved), readout=readout)

    def positions_of(self, hook: str) -> PositionSpec:
        """The position selection of one hook."""
        if isinstance(self.positions, Mapping):
            return self.positions.get(hook)
        return self.positions

    @property
    def observer_positions(self) -> PositionSpec:
        return None if isinstance(self.positions, Mapping) else self.positions

    def with_(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def gated_hooks(self) -> list[str]:
        """Every hook point the pass reads (switched on first where TransformerLens gates it)."""
        observed = (h for obs in self.observers for h in obs.hooks())
        return list(dict.fromkeys([*self.hooks, *self.jacobian_hooks, *observed]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "hooks": list(self.hooks),
            "jacobian_hooks": list(self.jacobian_hooks),
            "positions": ({h: describe_positions(p) for h, p in self.positions.items()}
                          if isinstance(self.positions, Mapping) else describe_positions(self.positions)),
            "batch_size": self.batch_size,
            "context": self.context,
            "jacobians": None if self.jacobians is None else self.jacobians.to_dict(),
            "observers": [o.to_dict() for o in self.observers],
        }
