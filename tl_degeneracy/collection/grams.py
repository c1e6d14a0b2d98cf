"""``collect``: stream data through a model and accumulate float64 statistics.

Memory is O(d²) per hook point: activations are reduced to their batch sums inside the
hook and never cached. What one pass accumulates is a ``RunConfig``; ``GramPass`` makes it a
stream plan (``batch_pass.run_batch`` per batch); batching, checkpoints, resume and
``torch.distributed`` belong to the shared driver (``stream.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import TokenBatch
from ..generations import HookedModel
from ..hook_names import HookSpec
from ..positions import PositionSpec
from .accumulators import AdditiveAccumulator
from .batch_pass import run_batch
from .config import JacobianConfig, RunConfig
from .observers import Observer
from .options import StreamOptions
from .stats import Stats
from .stream import stream

__all__ = ["collect", "GramPass"]


@dataclass(frozen=True)
class GramPass:
    """The stream plan of a ``RunConfig``: its identity, gated hooks and one batch's sums."""

    config: RunConfig

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def context(self) -> int | None:
        return self.config.context

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def gated_hooks(self) -> list[str]:
        return self.config.gated_hooks()

    def run_batch(self, model: HookedModel, batch: TokenBatch,
                  batch_index: int) -> dict[tuple[str, str], AdditiveAccumulator]:
        return run_batch(model, batch, self.config, batch_index)

    def run_batch_into(self, model: HookedModel, batch: TokenBatch, batch_index: int,
                       running: dict[tuple[str, str], AdditiveAccumulator]
                       ) -> dict[tuple[str, str], AdditiveAccumulator]:
        """Add the batch to ``running`` in place; return the accumulators it does not hold yet."""
        return run_batch(model, batch, self.config, batch_index, into=running)


_BUILD_DEFAULTS = (None, False, None, (), None, 8, None)


def collect(
    model: HookedModel,
    data: Any,
    hooks: HookSpec = None,
    *,
    jacobians: bool | JacobianConfig = False,
    jacobian_hooks: HookSpec = None,
    observers: Sequence[Observer] = (),
    positions: PositionSpec = None,
    batch_size: int = 8,
    context: int | None = None,
    config: RunConfig | None = None,
    options: StreamOptions | None = None,
    **stream_options: Any,
) -> Stats:
    """Accumulate activation Grams (and optionally Jacobian Grams and observers) over ``data``.

    What is accumulated is a ``RunConfig``: pass one as ``config=``, or the same options as
    keywords (``hooks`` … ``context``), which build it. How the pass runs is a ``StreamOptions``:
    pass one as ``options=``, or its fields as keywords (``max_tokens``, ``checkpoint``,
    ``resume``, ``checkpoint_every``, ``checkpoint_seconds``, ``progress``, ``distributed``).
    ``collect(model, tokens, "blocks.*.hook_resid_pre", jacobians=True)`` is the simple call.

    Args:
        model: a HookedTransformer (TL 3.x), TransformerBridge (TL 4.x) or HookedRootModule.
        data: token ids ``[n_seq, pos]``, an iterable of batches, or a ``datasets`` dataset.
        hooks: hook names, glob patterns or a names_filter callable (default
            ``blocks.*.hook_resid_pre``). Results are keyed by these names.
        jacobians: ``True`` (4 random probes of the MSE behavioural loss on the logits) or a
            ``JacobianConfig`` (``exact=True``, ``n_probes``, ``loss="kl"``, ``output``, ...).
        jacobian_hooks: hook points with ``M`` (default: ``hooks``); others than ``hooks`` get ``M`` only.
        observers: e.g. ``[HeadSync(), NeuronSync()]``.
        positions: datapoints per sequence: None (all), e.g. ``[-1]``, or a boolean mask.
        batch_size: sequences per batch; context: tokens per sequence for text data.
        config: a ready ``RunConfig`` instead of the keywords above.
        options, stream_options: how the pass runs (``StreamOptions``). With a checkpoint and
            ``resume=True`` an existing checkpoint is continued after checking that it is the same run
            on the same data; the result equals an uninterrupted run.
    """
    if config is None:
        config = RunConfig.build(model, hooks, jacobians=jacobians, jacobian_hooks=jacobian_hooks,
                                 positions=positions, batch_size=batch_size, context=context, observers=observers)
    elif (hooks, jacobians, jacobian_hooks, tuple(observers), positions, batch_size, context) != _BUILD_DEFAULTS:
        raise TypeError("pass either config= or the options that build it (hooks, jacobians, observers, "
                        "positions, batch_size, context), not both")
    run = StreamOptions.of(options, "collect()", **stream_options)
    return stream(model, data, GramPass(config), run, desc="collect")
