"""Forward and backward passes under hooks: the helpers every pass over a model shares.

- ``forward_until`` runs ``model(tokens)`` under hooks and stops it once every hook it tracks has
  fired (the one way the package cuts a forward short: collection, edges and the sampler use it);
- ``output_at`` reads one hook's activation as the output, nothing after it computed;
- ``ParamsRequireGrad`` makes activations carry a graph without writing any parameter's ``.grad``;
- ``batched_vjp`` pulls a stack of cotangents back in one vmapped backward pass;
- ``to_device`` and ``model_device`` move tensors where the model is without stalling a GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .generations import HookedModel

Hook = Callable[[Tensor, Any], Any]


class StopForward(Exception):
    """Raised by a hook once every hook a pass needs has fired: the rest of the forward is waste."""


def model_device(model: HookedModel) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to CUDA from pinned memory, an asynchronous copy (no stream sync)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def forward_until(model: HookedModel, tokens: Tensor, kwargs: dict[str, Any] | None,
                  fwd_hooks: Sequence[tuple[str, Hook]], stop_early: bool = True,
                  untracked: Sequence[tuple[str, Hook]] = ()) -> Tensor | None:
    """``model(tokens, **kwargs)`` under ``fwd_hooks``; with ``stop_early``, cut short after the last fires.

    This skips what follows the last needed hook (the rest of its block, ln_final and the
    unembedding) on both TL generations — the bridge ignores ``stop_at_layer == n_layers``.
    ``untracked`` hooks run after ``fwd_hooks`` at the same point and need not fire.
    Returns the model output, or None when stopped early.
    """
    pending = set(range(len(fwd_hooks)))  # by position: one hook point may carry several functions

    def tracked(index: int, fn: Hook) -> Hook:
        def hook(act: Tensor, hook: Any) -> Any:
            result = fn(act, hook)
            pending.discard(index)
            if stop_early and not pending:
                raise StopForward
            return result

        return hook

    try:
        hooks = [(name, tracked(i, fn)) for i, (name, fn) in enumerate(fwd_hooks)] + list(untracked)
        with model.hooks(fwd_hooks=hooks):
            return model(tokens, **(kwargs or {}))
    except StopForward:
        return None


def output_at(model: HookedModel, tokens: Tensor, hook_name: str, kwargs: dict[str, Any] | None = None,
              before: Sequence[tuple[str, Hook]] = (), untracked: Sequence[tuple[str, Hook]] = ()) -> Tensor:
    """The activation at ``hook_name`` (nothing after it is computed). ``before``: hooks that fire
    earlier in the same pass (e.g. one replacing an activation); ``untracked``: hooks that may fire."""
    got: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> Tensor:
        got["act"] = act
        return act

    forward_until(model, tokens, kwargs, [*before, (hook_name, capture)], stop_early=True, untracked=untracked)
    if "act" not in got:
        raise RuntimeError(f"hook point {hook_name!r} did not fire in the forward pass")
    return got["act"]


class ParamsRequireGrad:
    """Make every parameter require grad for the forward pass, so activations carry a graph.

    ``torch.autograd.grad`` then differentiates only w.r.t. the captured activations: no
    parameter ``.grad`` is ever written.
    """

    def __init__(self, model: HookedModel):
        self.frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]

    def __enter__(self) -> None:
        for p in self.frozen:
            p.requires_grad_(True)

    def __exit__(self, *exc: Any) -> None:
        for p in self.frozen:
            p.requires_grad_(False)


def batched_vjp(z: Tensor, inputs: list[Tensor], cotangents: list[Tensor] | Tensor) -> list[Tensor | None]:
    """``Jᵀ v`` at every input for a stack of cotangents ``v`` (shaped like ``z``), on a leading axis.

    One vmapped backward pass per stack (``is_grads_batched``) is ~3× faster than a Python loop
    of passes; where an op has no batching rule we fall back to the loop. The graph is retained.
    """
    if len(cotangents) > 1:
        try:
            stacked = cotangents if isinstance(cotangents, Tensor) else torch.stack(cotangents)
            return list(torch.autograd.grad(z, inputs, grad_outputs=stacked, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True))
        except RuntimeError:
            pass
    per = [torch.autograd.grad(z, inputs, grad_outputs=v, retain_graph=True, allow_unused=True) for v in cotangents]
    return [None if grads[0] is None else torch.stack(grads) for grads in zip(*per)]
