"""``collect``: stream data through a model and accumulate float64 statistics.

Memory is O(d²) per hook point: activations are reduced to their batch sums inside the
hook and never cached. Batches are numbered in data order; with ``torch.distributed``
initialised, rank ``r`` of ``w`` takes batches ``i ≡ r (mod w)`` and the sums are
all-reduced at the end, so any number of processes gives what one process gives.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .accumulators import AdditiveAccumulator
from .batch_pass import BatchPlan, JacobianSettings, NonFiniteError, Observer, OutputSpec, run_batch
from .checkpoint import CheckpointMismatchError, check_resumable
from .data import EmptyDataError, iter_batches
from .generations import describe_model
from .hook_names import HookSpec, enable_gated_hooks, resolve_hooks
from .positions import PositionSpec, describe_positions
from .probes import BehavioralLoss, ProbeKind
from .stats import Stats

__all__ = ["collect", "NonFiniteError", "EmptyDataError", "CheckpointMismatchError"]

# Other collectors (head/neuron synchronisation) register a factory here:
# factory(model, options) -> Observer, enabled by collect(..., <name>=True).
OBSERVER_FACTORIES: dict[str, Callable[[torch.nn.Module, dict[str, Any]], Observer]] = {}


def _dist_rank_world(distributed: bool | None) -> tuple[int, int]:
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


def _rank_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def collect(
    model: torch.nn.Module,
    data: Any,
    hooks: HookSpec = None,
    *,
    positions: PositionSpec = None,
    batch_size: int = 8,
    context: int | None = None,
    max_tokens: int | None = None,
    jacobians: bool = False,
    jacobian_hooks: HookSpec = None,
    n_probes: int | None = 4,
    exact: bool = False,
    output: OutputSpec = "logits",
    output_positions: PositionSpec = None,
    output_transform: Callable | None = None,
    behavioral_loss: BehavioralLoss = "mse",
    probe: ProbeKind = "rademacher",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    distributed: bool | None = None,
    **observers: Any,
) -> Stats:
    """Accumulate activation Grams (and optionally Jacobian Grams) at ``hooks`` over ``data``.

    Args:
        model: a HookedTransformer (TL 3.x), TransformerBridge (TL 4.x) or HookedRootModule.
        data: token ids ``[n_seq, pos]``, an iterable of batches, or a ``datasets`` dataset.
        hooks: hook names, glob patterns or a names_filter callable (default
            ``blocks.*.hook_resid_pre``). Results are keyed by these names.
        positions: datapoints per sequence: None (all), e.g. ``[-1]``, or a boolean mask.
        max_tokens: stop once this many tokens were processed (last batch trimmed).
        jacobians: also accumulate Jacobian Grams ``M`` of ``output`` w.r.t. every hook.
        jacobian_hooks: only these of ``hooks`` get ``M`` (default: all of them).
        n_probes: random probes per batch; ``exact=True`` (or None) loops over every output
            component instead (the reference the estimator is tested against).
        output: ``"logits"``, a hook name (local analysis) or a callable on the logits.
        output_positions: positions of the output to keep (e.g. ``[-1]``).
        output_transform: with ``output`` a hook name, a map applied to that hook's
            ``[batch, pos, d]`` activation first (``InteractionBasis.fit_local`` uses it).
        behavioral_loss: ``"mse"`` (paper default) or ``"kl"`` (softmax output Hessian).
        checkpoint: file to write the running sums to every ``checkpoint_every`` batches,
            on Ctrl-C and at the end (atomically). With ``resume=True`` an existing
            checkpoint is continued; the result equals an uninterrupted run.
        distributed: split batches over torch.distributed ranks and all-reduce (default:
            when a process group is initialised).
        **observers: ``head_sync=True`` / ``neuron_sync=True`` and other registered collectors.
    """
    names = resolve_hooks(model, hooks)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    jac_settings = None
    if jacobians:
        if behavioral_loss not in ("mse", "kl"):
            raise ValueError(f"behavioral_loss must be 'mse' or 'kl', got {behavioral_loss!r}")
        if behavioral_loss == "kl" and output != "logits":
            raise ValueError("behavioral_loss='kl' needs output='logits' (it uses the softmax of the output)")
        if isinstance(output, str) and output != "logits":
            resolve_hooks(model, [output])
        if not exact and (n_probes is None or n_probes < 1):
            exact = True
        jac_settings = JacobianSettings(
            n_probes=None if exact else int(n_probes), output=output, output_positions=output_positions,
            behavioral_loss=behavioral_loss, probe=probe, seed=seed, output_transform=output_transform,
        )
    m_names = None
    if jacobians and jacobian_hooks is not None:
        m_names = resolve_hooks(model, jacobian_hooks)
        stray = [h for h in m_names if h not in names]
        if stray:
            raise ValueError(f"jacobian_hooks must be among hooks; not in hooks: {stray}")
    plan = BatchPlan(hooks=names, positions=positions, jacobians=jac_settings, jacobian_hooks=m_names)
    options: dict[str, Any] = {}
    for key, value in observers.items():
        if key not in OBSERVER_FACTORIES:
            raise TypeError(f"collect() got an unexpected keyword argument {key!r}")
        if value:
            options[key] = value
            plan.observers.append(OBSERVER_FACTORIES[key](model, {"value": value}))

    settings = {
        "model": describe_model(model),
        "hooks": names,
        "positions": describe_positions(positions),
        "batch_size": batch_size,
        "jacobians": None if jac_settings is None else {**jac_settings.describe(), "hooks": plan.m_hooks},
        "observers": sorted(options),
    }
    rank, world = _dist_rank_world(distributed)
    ckpt_path = None if checkpoint is None else _rank_path(checkpoint, rank, world)

    stats = Stats(meta={**settings, "progress": {"batches_seen": 0, "tokens_seen": 0}})
    if resume and ckpt_path is not None and ckpt_path.exists():
        stats = Stats.load(ckpt_path, device="cpu")
        check_resumable(stats.meta, settings, ckpt_path)
    skip = stats.meta["progress"]["batches_seen"]
    # Counted over every rank's batches, so identical on all ranks (max_tokens stays global).
    tokens_seen = stats.meta["progress"]["tokens_seen"]
    next_batch = skip

    def save_checkpoint() -> None:
        if ckpt_path is not None:
            stats.meta["progress"] = {"batches_seen": next_batch, "tokens_seen": tokens_seen}
            stats.save(ckpt_path)

    undo = enable_gated_hooks(model, names + [h for obs in plan.observers for h in obs.hooks])
    bar = tqdm(total=max_tokens, initial=tokens_seen, unit="tok", unit_scale=True, disable=not progress,
               desc="collect", dynamic_ncols=True)
    try:
        for index, batch in enumerate(iter_batches(data, model, batch_size, context)):
            if index < skip:
                continue  # done before the checkpoint we resumed from
            if max_tokens is not None:
                if tokens_seen >= max_tokens:
                    break
                rows = -(-(max_tokens - tokens_seen) // batch.tokens.shape[1])  # ceil
                batch = batch.head(rows)
            if index % world == rank:
                _add(stats, run_batch(model, batch, plan, index))
                stats.meta["n_tokens"] += batch.n_tokens
                stats.meta["n_batches"] += 1
            tokens_seen += batch.n_tokens
            next_batch = index + 1
            bar.update(batch.n_tokens)
            if next_batch % checkpoint_every == 0:
                save_checkpoint()
    except KeyboardInterrupt:
        save_checkpoint()  # only whole batches are ever added: a clean resume point
        raise
    finally:
        bar.close()
        for fn in undo:
            fn()
    if next_batch == 0:
        raise EmptyDataError("the data yielded no batches; nothing was accumulated")
    if not stats.accumulators:
        raise EmptyDataError(f"rank {rank} of {world} received no batch; use fewer processes or more data")
    save_checkpoint()  # before any all-reduce: per-rank files must hold per-rank sums
    stats.meta["progress"] = {"batches_seen": next_batch, "tokens_seen": tokens_seen, "world_size": world}
    if world > 1:
        stats.all_reduce()
    return stats


def _add(stats: Stats, contributions: dict[tuple[str, str], AdditiveAccumulator]) -> None:
    for key, acc in contributions.items():
        if key in stats.accumulators:
            stats.accumulators[key].add_(acc)
        else:
            stats.accumulators[key] = acc
