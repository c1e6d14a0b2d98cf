"""The streaming driver every pass over data shares: batches, checkpoints, resume, ranks.

A *plan* (``RunConfig`` for the Grams, ``EdgeConfig`` for the interaction graph, ...) says
what one batch contributes; ``stream`` feeds it the data and owns everything else, once:
batches are numbered in data order; with ``torch.distributed`` initialised, rank ``r`` of
``w`` takes batches ``i ≡ r (mod w)`` and the sums are all-reduced at the end, so any
number of processes gives what one process gives.

A checkpoint records the run's identity (model, tokenizer, ``plan.to_dict()``) and a chained
SHA-256 of the token ids of every batch consumed; resuming re-reads the skipped batches and
refuses, naming the field, if anything differs.
"""
from __future__ import annotations

import hashlib
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointMismatchError, check_resumable, rank_path
from ..data import EmptyDataError, TokenBatch, iter_batches
from ..generations import HookedModel, describe_model
from ..hook_names import enable_gated_hooks
from ..interrupts import DeferredInterrupts, Terminated, sigterm_as_interrupt
from .accumulators import AdditiveAccumulator
from .options import StreamOptions
from .stats import Progress, RunRecord, Stats

SAVE_TIME_FACTOR = 20  # checkpoints that take SLOW_SAVE_SECONDS or more are this many times their writing time
SLOW_SAVE_SECONDS = 0.5  # apart at least (a GB-sized state: ≤ 5% of the run spent writing it)

__all__ = ["StreamPlan", "stream", "Terminated", "sigterm_as_interrupt", "run_record", "rank_and_world"]


@runtime_checkable
class StreamPlan(Protocol):
    """What one pass over the data accumulates. ``to_dict()`` is its identity (checkpoint, report)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def context(self) -> int | None: ...

    def to_dict(self) -> dict[str, Any]: ...

    def gated_hooks(self) -> list[str]:
        """Hook points that must be switched on before the pass (TL's ``use_attn_result`` etc.)."""
        ...

    def run_batch(self, model: HookedModel, batch: TokenBatch,
                  batch_index: int) -> dict[tuple[str, str], AdditiveAccumulator]:
        """Every accumulator's contribution from one batch (nothing is added anywhere)."""
        ...


def rank_and_world(distributed: bool | None) -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` unless distributed (default: when a group is up)."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = active
    if not distributed:
        return 0, 1
    if not active:
        raise RuntimeError("distributed=True but torch.distributed is not initialised (launch with torchrun "
                           "and call torch.distributed.init_process_group first)")
    return dist.get_rank(), dist.get_world_size()


def _package_version() -> str:
    try:
        return version("tl_degeneracy")
    except PackageNotFoundError:
        return "unknown"


def describe_tokenizer(model: HookedModel) -> str | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    return f"{getattr(tok, 'name_or_path', '') or type(tok).__name__} (vocab {len(tok)})"


def run_record(model: HookedModel, plan: StreamPlan) -> RunRecord:
    return RunRecord(model=describe_model(model), config=plan.to_dict(), tokenizer=describe_tokenizer(model),
                     package_version=_package_version())


def _chain(digest: str, batch: TokenBatch) -> str:
    """The running data hash after one more batch (token ids and padding mask)."""
    h = hashlib.sha256(digest.encode())
    h.update(str(tuple(batch.tokens.shape)).encode())
    h.update(batch.tokens.to(torch.int64).cpu().contiguous().numpy().tobytes())
    if batch.attention_mask is not None:
        h.update(batch.attention_mask.to(torch.uint8).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def stream(model: HookedModel, data: Any, plan: StreamPlan, options: StreamOptions | None = None, *,
           desc: str = "collect") -> Stats:
    """Run ``plan`` over ``data`` and return the summed accumulators (``StreamOptions``: how)."""
    options = options or StreamOptions()
    max_tokens, resume = options.max_tokens, options.resume
    checkpoint_every, checkpoint_seconds = options.checkpoint_every, options.checkpoint_seconds
    record = run_record(model, plan)
    rank, world = rank_and_world(options.distributed)
    ckpt_path = None if options.checkpoint is None else rank_path(options.checkpoint, rank, world)

    stats = Stats(run=record, progress=Progress())
    if resume and ckpt_path is not None and ckpt_path.exists():
        # onto the model's device, where the running sums of an uninterrupted run live
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        stats = Stats.load(ckpt_path, device=device)
        if stats.run is None or stats.progress is None:
            raise CheckpointMismatchError(f"cannot resume from {ckpt_path}: it holds no run record or progress")
        check_resumable(stats.run.identity(), record.identity(), ckpt_path)
    assert stats.progress is not None
    resumed_from = stats.progress
    skip = resumed_from.batches_seen
    # Counted over every rank's batches, so identical on all ranks (max_tokens stays global).
    tokens_seen = resumed_from.tokens_seen
    next_batch = skip
    digest, replayed_tokens = "", 0
    replayed = skip == 0  # until the skipped batches are re-read and checked, the checkpoint on disk stays

    save_seconds = 0.0  # how long the last checkpoint took to write

    def save_checkpoint() -> None:
        nonlocal save_seconds
        if ckpt_path is not None and replayed:
            start = time.monotonic()
            stats.progress = Progress(next_batch, tokens_seen, digest, world)
            stats.save(ckpt_path)
            save_seconds = time.monotonic() - start

    accumulate = getattr(plan, "run_batch_into", None)  # adds to the running sums in place, when the plan can
    undo = enable_gated_hooks(model, plan.gated_hooks())
    bar = tqdm(total=max_tokens, initial=tokens_seen, unit="tok", unit_scale=True, disable=not options.progress,
               desc=desc, dynamic_ncols=True)
    last_save = time.monotonic()
    in_batch = False  # the running sums hold part of a batch: nothing may be saved now
    try:
        with DeferredInterrupts() as interrupts:
            for index, batch in enumerate(iter_batches(data, model, plan.batch_size, plan.context)):
                if index < skip:  # done before the checkpoint we resumed from: re-read to check the data
                    batch = _trim(batch, max_tokens, replayed_tokens)
                    digest = _chain(digest, batch)
                    replayed_tokens += batch.n_tokens
                    if index == skip - 1:
                        if digest != resumed_from.data_sha256 or replayed_tokens != tokens_seen:
                            raise CheckpointMismatchError(
                                f"cannot resume from {ckpt_path}: the first {skip} batches of this data differ from "
                                "the ones the checkpoint was made from (data, tokenization, context, batching or "
                                "max_tokens changed). Resuming would mix two data streams; delete the checkpoint "
                                "to start afresh.")
                        replayed = True
                    continue
                if max_tokens is not None and tokens_seen >= max_tokens:
                    break
                batch = _trim(batch, max_tokens, tokens_seen)
                if index % world == rank:
                    in_batch = interrupts.holding = True
                    if accumulate is not None:
                        _add(stats, accumulate(model, batch, index, stats.accumulators))
                    else:
                        _add(stats, plan.run_batch(model, batch, index))
                    stats.n_tokens += batch.n_tokens
                    stats.n_batches += 1
                    in_batch = interrupts.holding = False
                digest = _chain(digest, batch)
                tokens_seen += batch.n_tokens
                next_batch = index + 1
                bar.update(batch.n_tokens)
                due = next_batch % checkpoint_every == 0 or time.monotonic() - last_save >= checkpoint_seconds
                # a GB-sized state takes seconds to write: then never spend more than ~5% of the time on it
                slow = save_seconds >= SLOW_SAVE_SECONDS
                if due and (not slow or time.monotonic() - last_save >= SAVE_TIME_FACTOR * save_seconds):
                    save_checkpoint()
                    last_save = time.monotonic()
                interrupts.check()  # Ctrl-C / SIGTERM that came during the batch: raised here, once it is whole
    except KeyboardInterrupt:
        if not in_batch:  # a second Ctrl-C mid-batch: the running sums are partial, the last checkpoint stands
            save_checkpoint()
        raise
    finally:
        bar.close()
        for fn in undo:
            fn()
    if not replayed:  # the data ended before the batches the checkpoint had consumed
        raise CheckpointMismatchError(f"cannot resume from {ckpt_path}: it has consumed {skip} batches, but this "
                                      "data has fewer. Resuming would mix two data streams; delete the checkpoint "
                                      "to start afresh.")
    if next_batch == 0:
        raise EmptyDataError("the data yielded no batches; nothing was accumulated")
    if not stats.accumulators:
        raise EmptyDataError(f"rank {rank} of {world} received no batch; use fewer processes or more data")
    save_checkpoint()  # before any all-reduce: per-rank files must hold per-rank sums
    stats.progress = Progress(next_batch, tokens_seen, digest, world)
    if world > 1:
        stats.all_reduce()
    return stats


def _trim(batch: TokenBatch, max_tokens: int | None, tokens_seen: int) -> TokenBatch:
    """The rows of ``batch`` needed to reach ``max_tokens``."""
    if max_tokens is None:
        return batch
    rows = -(-(max_tokens - tokens_seen) // batch.tokens.shape[1])  # ceil
    return batch.head(rows)


def _add(stats: Stats, contributions: dict[tuple[str, str], AdditiveAccumulator]) -> None:
    for key, acc in contributions.items():
        if key in stats.accumulators:
            stats.accumulators[key].add_(acc)
        else:
            stats.accumulators[key] = acc
