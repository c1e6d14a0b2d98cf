"""tl_degeneracy: degeneracy in the loss landscape of TransformerLens models.

Collect float64 activation and Jacobian Gram matrices at hook points (``collect`` →
``Stats``), fit interaction bases and splice them into live models, find synchronized
heads and neurons, count the model's degeneracies, build the interaction graph
(``tl_degeneracy.interactions``) and sample the effective parameter count
(``tl_degeneracy.llc``) (Bushnaq et al. 2024, arXiv 2405.10927; the mathematics in docs/theory.md).

The names below are imported on first use (PEP 562), so ``import tl_degeneracy`` and the command
line's ``--help`` do not pay for torch and TransformerLens until something is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name → the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["AdditiveAccumulator", "GramAccumulator"], "collection.accumulators"),
    **dict.fromkeys(["NonFiniteError"], "collection.batch_pass"),
    **dict.fromkeys(["JacobianConfig", "ProbeKind", "RunConfig"], "collection.config"),
    **dict.fromkeys(["collect"], "collection.grams"),
    **dict.fromkeys(["Observer"], "collection.observers"),
    **dict.fromkeys(["StreamOptions"], "collection.options"),
    **dict.fromkeys(["Progress", "RunRecord", "Stats"], "collection.stats"),
    **dict.fromkeys(["Terminated"], "interrupts"),
    **dict.fromkeys(["CheckpointMismatchError"], "checkpoint"),
    **dict.fromkeys(["EmptyDataError"], "data"),
    **dict.fromkeys(["KL", "MSE", "BehavioralLoss"], "losses"),
    **dict.fromkeys(["UnknownHookError", "act_name", "residual_hooks", "resolve_hooks"], "hook_names"),
    **dict.fromkeys(["InteractionBasis"], "basis.bases"),
    **dict.fromkeys(["LayerBasis", "LinearBasis"], "basis.linear"),
    **dict.fromkeys(["Basis", "register_basis_kind"], "basis.protocol"),
    **dict.fromkeys(["SpliceHandle", "splice", "splice_into", "unsplice"], "basis.splice"),
    **dict.fromkeys(["HeadSync", "HeadSyncAccumulator", "head_sync_matrices", "synchronized_heads"], "sync.heads"),
    **dict.fromkeys(["NeuronSync", "NeuronSyncAccumulator", "neuron_sync_matrices", "synchronized_neurons"],
                    "sync.neurons"),
    **dict.fromkeys(["DegeneracyReport", "degeneracy_report"], "degeneracy.account"),
    **dict.fromkeys(["degeneracy_hooks", "input_hooks", "output_hooks"], "degeneracy.weights"),
    **dict.fromkeys(["InteractionGraph"], "interactions.graph"),
    **dict.fromkeys(["collect_edges"], "interactions.edges"),
    **dict.fromkeys(["LLCConfig", "ParamSubset"], "llc.config"),
    **dict.fromkeys(["NeffResult", "estimate_neff"], "llc.estimate"),
}
_ALIASES = {"LayerBasis": "LinearBasis"}  # the name of releases before basis kinds
_SUBPACKAGES = {"collection", "basis", "sync", "degeneracy", "interactions", "llc", "analysis", "cli", "testing",
                "default_model", "linalg", "losses", "hook_names", "generations", "loading", "data", "positions",
                "validation", "forward", "checkpoint", "interrupts", "plotting"}

__all__ = [
    "AdditiveAccumulator", "Basis", "BehavioralLoss", "CheckpointMismatchError", "DegeneracyReport", "EmptyDataError",
    "GramAccumulator", "HeadSync", "HeadSyncAccumulator", "InteractionBasis", "InteractionGraph", "JacobianConfig",
    "KL", "LLCConfig", "LayerBasis", "LinearBasis", "MSE", "NeffResult", "NeuronSync", "NeuronSyncAccumulator",
    "NonFiniteError", "Observer", "ParamSubset", "ProbeKind", "Progress", "RunConfig", "RunRecord", "SpliceHandle",
    "Stats", "StreamOptions", "Terminated", "UnknownHookError", "act_name", "collect", "collect_edges",
    "degeneracy_hooks", "degeneracy_report", "estimate_neff", "head_sync_matrices", "input_hooks",
    "neuron_sync_matrices", "output_hooks", "register_basis_kind", "residual_hooks", "resolve_hooks", "splice",
    "splice_into", "synchronized_heads", "synchronized_neurons", "unsplice", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # tl_degeneracy.llc etc. without importing them first
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tl_degeneracy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _ALIASES.get(name, name))
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .basis.bases import InteractionBasis
    from .basis.linear import LinearBasis
    from .basis.linear import LinearBasis as LayerBasis
    from .basis.protocol import Basis, register_basis_kind
    from .basis.splice import SpliceHandle, splice, splice_into, unsplice
    from .checkpoint import CheckpointMismatchError
    from .collection.accumulators import AdditiveAccumulator, GramAccumulator
    from .collection.batch_pass import NonFiniteError
    from .collection.config import JacobianConfig, ProbeKind, RunConfig
    from .collection.grams import collect
    from .collection.observers import Observer
    from .collection.options import StreamOptions
    from .collection.stats import Progress, RunRecord, Stats
    from .data import EmptyDataError
    from .degeneracy.account import DegeneracyReport, degeneracy_report
    from .degeneracy.weights import degeneracy_hooks, input_hooks, output_hooks
    from .hook_names import UnknownHookError, act_name, residual_hooks, resolve_hooks
    from .interactions.edges import collect_edges
    from .interactions.graph import InteractionGraph
    from .interrupts import Terminated
    from .llc.config import LLCConfig, ParamSubset
    from .llc.estimate import NeffResult, estimate_neff
    from .losses import KL, MSE, BehavioralLoss
    from .sync.heads import HeadSync, HeadSyncAccumulator, head_sync_matrices, synchronized_heads
    from .sync.neurons import NeuronSync, NeuronSyncAccumulator, neuron_sync_matrices, synchronized_neurons
