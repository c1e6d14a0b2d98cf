"""Dense references computed from ``run_with_cache``: what the streaming code must equal."""
from __future__ import annotations

import torch


def dense_activations(model, tokens, hook, mask=None) -> torch.Tensor:
    """All datapoints of ``hook`` as a float64 ``[n, d]`` matrix."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == hook)
    act = cache[hook]
    act = act.reshape(act.shape[0], act.shape[1], -1).to(torch.float64)
    return act[mask] if mask is not None else act.reshape(-1, act.shape[-1])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
