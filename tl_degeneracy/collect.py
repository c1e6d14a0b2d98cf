"""``collect``: stream data through a model and accumulate float64 statistics.

Memory is O(d²) per hook point: activations are reduced to their batch sums inside the
hook and never cached. The pass itself is a ``RunConfig``; batching, checkpoints, resume and
``torch.distributed`` belong to the shared driver (``stream.py``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .batch_pass import NonFiniteError
from .checkpoint import CheckpointMismatchError
from .config import JacobianConfig, PositionSpec, RunConfig
from .data import EmptyDataError
from .generations import HookedModel
from .hook_names import HookSpec
from .observers import Observer
from .stats import Stats
from .stream import Terminated, run_record, sigterm_as_interrupt, stream

__all__ = ["collect", "NonFiniteError", "EmptyDataError", "CheckpointMismatchError", "Terminated",
           "run_record", "sigterm_as_interrupt"]


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
    max_tokens: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 50,
    checkpoint_seconds: float = 300.0,
    progress: bool = True,
    distributed: bool | None = None,
) -> Stats:
    """Accumulate activation Grams (and optionally Jacobian Grams and observers) over ``data``.

    What is accumulated is a ``RunConfig``: pass one as ``config=``, or the same options as
    keywords (``hooks`` … ``context``), which build it. ``collect(model, tokens,
    "blocks.*.hook_resid_pre", jacobians=True)`` is the simple call.

    Args:
        model: a HookedTransformer (TL 3.x), TransformerBridge (TL 4.x) or HookedRootModule.
        data: token ids ``[n_seq, pos]``, an iterable of batches, or a ``datasets`` dataset.
        hooks: hook names, glob patterns or a names_filter callable (default
            ``blocks.*.hook_resid_pre``). Results are keyed by these names.
        jacobians: ``True`` (4 random probes of the MSE behavioural loss on the logits) or a
            ``JacobianConfig`` (``exact=True``, ``n_probes``, ``loss="kl"``, ``output``, ...).
        jacobian_hooks: only these of ``hooks`` get ``M`` (default: all of them).
        observers: e.g. ``[HeadSync(), NeuronSync()]``.
        positions: datapoints per sequence: None (all), e.g. ``[-1]``, or a boolean mask.
        batch_size: sequences per batch; context: tokens per sequence for text data.
        config: a ready ``RunConfig`` instead of the keywords above.
        max_tokens: stop once this many tokens were processed (last batch trimmed).
        checkpoint: file the running sums are written to every ``checkpoint_every`` batches
            or ``checkpoint_seconds`` seconds, whichever comes first, on Ctrl-C, on SIGTERM and
            at the end (atomically). With ``resume=True`` an existing checkpoint is continued
            after checking that it is the same run on the same data; the result equals an
            uninterrupted run.
        distributed: split batches over torch.distributed ranks and all-reduce (default:
            when a process group is initialised).
    """
    if config is None:
        config = RunConfig.build(model, hooks, jacobians=jacobians, jacobian_hooks=jacobian_hooks,
                                 positions=positions, batch_size=batch_size, context=context, observers=observers)
    elif (hooks, jacobians, jacobian_hooks, tuple(observers), positions, batch_size, context) != \
            (None, False, None, (), None, 8, None):
        raise TypeError("pass either config= or the options that build it (hooks, jacobians, observers, "
                        "positions, batch_size, context), not both")
    return stream(model, data, config, max_tokens=max_tokens, checkpoint=checkpoint, resume=resume,
                  checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds, progress=progress,
                  distributed=distributed, desc="collect")
