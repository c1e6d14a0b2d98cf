"""Streaming collection: one pass over data under hooks, summed into float64 accumulators.

- ``RunConfig`` / ``JacobianConfig`` (``config``): what a pass accumulates; ``StreamOptions``
  (``options``): how it runs (tokens, checkpoints, resume, progress, ranks).
- ``collect`` (``grams``): the Gram pass; ``stream`` (``stream``): the driver every pass shares.
- ``batch_pass``: one batch's activation and Jacobian Grams (``probes``, ``readout``, ``tail_cut``).
- ``accumulators``, ``stats``, ``observers``: what the sums are, where they are kept, and how other
  collectors (head and neuron synchronisation, top-k examples, ...) join a pass.
"""
from .accumulators import AdditiveAccumulator, GramAccumulator
from .batch_pass import NoGradientError, NonFiniteError
from .config import JacobianConfig, ProbeKind, ProbeSpace, RunConfig
from .grams import GramPass, collect
from .observers import LayerObserver, Observer
from .options import StreamOptions
from .stats import Progress, RunRecord, Stats
from .stream import StreamPlan, Terminated, rank_and_world, run_record, sigterm_as_interrupt, stream

__all__ = [
    "AdditiveAccumulator", "GramAccumulator", "NonFiniteError", "NoGradientError", "JacobianConfig", "ProbeKind",
    "ProbeSpace", "RunConfig", "GramPass", "collect", "LayerObserver", "Observer", "StreamOptions", "Progress",
    "RunRecord", "Stats", "StreamPlan", "Terminated", "rank_and_world", "run_record", "sigterm_as_interrupt", "stream",
]
