"""How much memory a collection will take, said before it starts (and a run that cannot fit refused).

The float64 sums are known exactly from the hooks' widths: ``(d² + d + 1)·8`` bytes per Gram (``G``
or ``M``), three ``d_mlp²`` matrices per layer for neuron synchronisation, the top-k records of the
outlier observer. One batch adds the model's activations kept for the backward passes, the probes'
gradients and the observers' temporaries: an estimate, conservative by design (checked against
measured peaks in benchmarks/README.md). Widths come from one forward pass over two tokens.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collection.config import RunConfig
from ..forward import forward_until, model_device
from ..generations import HookedModel
from ..hook_names import enable_gated_hooks

GIB = 2**30


def hook_widths(model: HookedModel, names: list[str]) -> dict[str, int]:
    """The flattened width of each hook's activation (``[batch, pos, ...]`` → the product of ``...``)."""
    widths: dict[str, int] = {}

    def measure(name: str):
        def hook(act: torch.Tensor, hook: Any) -> None:
            widths[name] = math.prod(act.shape[2:]) if act.ndim > 2 else 1

        return hook

    tokens = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
    undo = enable_gated_hooks(model, names)
    try:
        with torch.no_grad():
            forward_until(model, tokens, None, [(n, measure(n)) for n in dict.fromkeys(names)], stop_early=True)
    finally:
        for fn in undo:
            fn()
    return widths


@dataclass
class MemoryEstimate:
    state: int  # bytes of float64 sums (and the outlier observer's records)
    model: int  # the model's parameters and buffers
    batch: int  # one batch's activations, graph, probe gradients and temporaries (estimated)
    parts: dict[str, int] = field(default_factory=dict)  # the state by kind

    @property
    def total(self) -> int:
        return self.state + self.model + self.batch

    def describe(self, available: int | None = None) -> str:
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.parts.items() if size)
        line = (f"memory estimate: {self.total / GIB:.1f} GiB = {self.state / GIB:.2f} GiB of float64 sums ({parts}) + "
                f"{self.model / GIB:.2f} GiB model + ~{self.batch / GIB:.2f} GiB per batch")
        return line + ("" if available is None else f"; {available / GIB:.1f} GiB available")


def available_memory() -> int | None:
    """Bytes the system can still give (``MemAvailable``; ``None`` where it cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(model: HookedModel, config: RunConfig) -> MemoryEstimate:
    """What collecting ``config`` on ``model`` needs (see the module docstring)."""
    observer_hooks = [h for obs in config.observers for h in obs.hooks()]
    widths = hook_widths(model, [*config.hooks, *config.jacobian_hooks, *observer_hooks])
    gram = lambda d: (d * d + d + 1) * 8  # noqa: E731
    parts = {"G": sum(gram(widths[h]) for h in config.hooks),
             "M": sum(gram(widths[h]) for h in config.jacobian_hooks)}
    for obs in config.observers:
        if obs.kind == "neuron_sync":
            parts["neuron sync"] = sum((3 * widths[h] ** 2 + 3 * widths[h]) * 8 for h in obs.hooks()[1::2])
        elif obs.kind == "head_sync":
            parts["head sync"] = len(obs.hooks()) * 2 * int(model.cfg.n_heads) ** 2 * 8
        else:  # top-k records and per-position moments: small
            parts[obs.kind] = sum(widths[h] * 5 * 8 + 32 * 5 * 8 for h in obs.hooks())
    state = sum(parts.values())
    params = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    cfg = model.cfg
    B, T = config.batch_size, config.context or min(128, int(cfg.n_ctx))
    element = next(iter(model.parameters())).element_size()
    L, d, H = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    # the forward's saved activations (a graph when there are Jacobians), attention patterns included
    per_layer = B * T * (16 * d + 6 * d_mlp) * element + 2 * B * H * T * T * element
    batch = L * per_layer
    captured = sum(widths.values()) * B * T * element
    batch += captured
    if config.jacobians is not None and config.jacobian_hooks:
        chunk = 16 if config.jacobians.exact else min(int(config.jacobians.n_probes or 4), 16)
        batch += chunk * sum(widths[h] for h in config.jacobian_hooks) * B * T * element * 2
        batch += max(widths[h] for h in config.jacobian_hooks) * chunk * B * T * 8  # one hook's float64 copy
    if any(o.kind == "neuron_sync" for o in config.observers):
        largest = max(widths[h] for o in config.observers if o.kind == "neuron_sync" for h in o.hooks())
        batch += 3 * largest ** 2 * 8 + 6 * B * T * largest * 8  # one layer's contribution and temporaries
    return MemoryEstimate(state=state, model=params, batch=int(1.25 * batch), parts=parts)
