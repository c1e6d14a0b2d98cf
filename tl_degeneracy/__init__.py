"""tl_degeneracy: degeneracy in the loss landscape of TransformerLens models.

Collect float64 activation and Jacobian Gram matrices at hook points (``collect`` →
``Stats``), fit interaction bases and splice them into live models, find synchronized
heads and neurons, and count the model's degeneracies (Bushnaq et al. 2024, arXiv 2405.10927).
"""
from .accumulators import AdditiveAccumulator, GramAccumulator
from .batch_pass import NonFiniteError
from .checkpoint import CheckpointMismatchError
from .collect import collect
from .data import EmptyDataError
# Importing these registers the head_sync=True / neuron_sync=True collectors.
from .degeneracy_report import DegeneracyReport, degeneracy_hooks, degeneracy_report
from .head_sync import HeadSyncAccumulator, head_sync_matrices, synchronized_heads
from .hook_names import UnknownHookError, resolve_hooks
from .interaction_basis import InteractionBasis, LayerBasis
from .neuron_sync import NeuronSyncAccumulator, neuron_sync_matrices, synchronized_neurons
from .splice import splice, splice_into, unsplice
from .stats import Stats

__all__ = [
    "AdditiveAccumulator", "GramAccumulator", "NonFiniteError", "CheckpointMismatchError",
    "collect", "EmptyDataError", "UnknownHookError", "resolve_hooks", "Stats",
    "InteractionBasis", "LayerBasis", "splice", "splice_into", "unsplice",
    "HeadSyncAccumulator", "head_sync_matrices", "synchronized_heads",
    "NeuronSyncAccumulator", "neuron_sync_matrices", "synchronized_neurons",
    "DegeneracyReport", "degeneracy_hooks", "degeneracy_report",
]
__version__ = "0.1.0"
