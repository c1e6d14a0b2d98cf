"""tl_degeneracy: degeneracy in the loss landscape of TransformerLens models.

Collect float64 activation and Jacobian Gram matrices at hook points (``collect`` →
``Stats``), fit interaction bases, and count the model's degeneracies
(Bushnaq et al. 2024, arXiv 2405.10927).
"""
from .accumulators import AdditiveAccumulator, GramAccumulator
from .batch_pass import NonFiniteError
from .checkpoint import CheckpointMismatchError
from .collect import collect
from .data import EmptyDataError
from .hook_names import UnknownHookError, resolve_hooks
from .stats import Stats

__all__ = [
    "AdditiveAccumulator", "GramAccumulator", "NonFiniteError", "CheckpointMismatchError",
    "collect", "EmptyDataError", "UnknownHookError", "resolve_hooks", "Stats",
]
__version__ = "0.1.0"
from .head_sync import HeadSyncAccumulator, head_sync_matrices, synchronized_heads  # noqa: E402  (registers head_sync=True)
from .neuron_sync import NeuronSyncAccumulator, neuron_sync_matrices, synchronized_neurons  # noqa: E402  (registers neuron_sync=True)
from .degeneracy_report import DegeneracyReport, degeneracy_hooks, degeneracy_report  # noqa: E402
