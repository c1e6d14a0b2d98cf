"""tl_degeneracy: degeneracy in the loss landscape of TransformerLens models.

Collect float64 activation and Jacobian Gram matrices at hook points (``collect`` →
``Stats``), fit interaction bases and splice them into live models, find synchronized
heads and neurons, count the model's degeneracies, build the interaction graph
(``tl_degeneracy.interactions``) and sample the effective parameter count
(``tl_degeneracy.llc``) (Bushnaq et al. 2024, arXiv 2405.10927;
the mathematics in docs/theory.md).
"""
from .accumulators import AdditiveAccumulator, GramAccumulator
from .batch_pass import NonFiniteError
from .checkpoint import CheckpointMismatchError
from .collect import Terminated, collect
from .config import JacobianConfig, ProbeKind, RunConfig
from .data import EmptyDataError
from .degeneracy_report import DegeneracyReport, degeneracy_hooks, degeneracy_report
from .head_sync import HeadSync, HeadSyncAccumulator, head_sync_matrices, synchronized_heads
from .hook_names import UnknownHookError, act_name, residual_hooks, resolve_hooks
from .interaction_basis import InteractionBasis, LayerBasis
from .interactions import InteractionGraph, collect_edges
from .llc import LLCConfig, NeffResult, ParamSubset, estimate_neff
from .losses import KL, MSE, BehavioralLoss
from .neuron_sync import NeuronSync, NeuronSyncAccumulator, neuron_sync_matrices, synchronized_neurons
from .observers import Observer
from .splice import SpliceHandle, splice, splice_into, unsplice
from .stats import Progress, RunRecord, Stats

__all__ = [
    "AdditiveAccumulator", "GramAccumulator", "NonFiniteError", "CheckpointMismatchError", "Terminated",
    "collect", "JacobianConfig", "ProbeKind", "RunConfig", "EmptyDataError",
    "DegeneracyReport", "degeneracy_hooks", "degeneracy_report",
    "HeadSync", "HeadSyncAccumulator", "head_sync_matrices", "synchronized_heads",
    "UnknownHookError", "act_name", "residual_hooks", "resolve_hooks",
    "InteractionBasis", "LayerBasis", "InteractionGraph", "collect_edges", "LLCConfig", "NeffResult", "ParamSubset",
    "estimate_neff", "KL", "MSE", "BehavioralLoss",
    "NeuronSync", "NeuronSyncAccumulator", "neuron_sync_matrices", "synchronized_neurons",
    "Observer", "SpliceHandle", "splice", "splice_into", "unsplice", "Progress", "RunRecord", "Stats",
]
__version__ = "0.2.0"
