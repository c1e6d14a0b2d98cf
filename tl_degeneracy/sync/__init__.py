"""Synchronized attention heads and MLP neurons (docs/theory.md §4, paper §3.2).

- ``heads``: the ``HeadSync`` observer (attention-pattern sums per layer) and ``synchronized_heads``.
- ``neurons``: the ``NeuronSync`` observer (firing-pattern sums per MLP layer) and ``synchronized_neurons``.
- ``clustering``: grouping members whose pairwise distance is below a threshold (both use it).
"""
from .clustering import Linkage, blocks_below, worst_within
from .heads import (
    HEAD_SYNC,
    HeadBlock,
    HeadSync,
    HeadSyncAccumulator,
    HeadSyncMatrices,
    SynchronizedHeads,
    head_sync_matrices,
    synchronized_heads,
)
from .neurons import (
    NEURON_SYNC,
    NeuronBlock,
    NeuronLayerSync,
    NeuronSync,
    NeuronSyncAccumulator,
    NeuronSyncMatrices,
    SynchronizedNeurons,
    neuron_sync_matrices,
    synchronized_neurons,
)

__all__ = [
    "Linkage", "blocks_below", "worst_within", "HEAD_SYNC", "HeadBlock", "HeadSync", "HeadSyncAccumulator",
    "HeadSyncMatrices", "SynchronizedHeads", "head_sync_matrices", "synchronized_heads", "NEURON_SYNC",
    "NeuronBlock", "NeuronLayerSync", "NeuronSync", "NeuronSyncAccumulator", "NeuronSyncMatrices",
    "SynchronizedNeurons", "neuron_sync_matrices", "synchronized_neurons",
]
