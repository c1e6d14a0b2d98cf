"""How much memory a collection will take, said before it starts (and a run that cannot fit refused).

The float64 sums are known exactly from the hooks' widths: ``(d(d+1)/2 + d + 1)·8`` bytes per Gram
(``G`` or ``M``, kept as upper triangles), two ``d_mlp²`` matrices and a triangle per layer for
neuron synchronisation, the top-k records of the outlier observer. One batch adds the graph the
Jacobian probes run back through, the probes' gradients and the observers' temporaries: a formula
fitted to measured peaks (``batch_memory``; benchmarks/README.md). Widths come from one forward
pass over two tokens. The batch size, when not given, is chosen from the same formula.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..collection.config import RunConfig
from ..forward import forward_until, model_device
from ..generations import HookedModel
from ..hook_names import enable_gated_hooks
from ..triangular import packed_size

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
    gram = lambda d: (packed_size(d) + d + 1) * 8  # noqa: E731
    parts = {"G": sum(gram(widths[h]) for h in config.hooks),
             "M": sum(gram(widths[h]) for h in config.jacobian_hooks)}
    for obs in config.observers:
        if obs.kind == "neuron_sync":
            parts["neuron sync"] = sum((2 * widths[h] ** 2 + packed_size(widths[h]) + 4 * widths[h]) * 8
                                       for h in obs.hooks()[1::2])
        elif obs.kind == "head_sync":
            parts["head sync"] = len(obs.hooks()) * 2 * int(model.cfg.n_heads) ** 2 * 8
        else:  # top-k records and per-position moments: small
            parts[obs.kind] = sum(widths[h] * 5 * 8 + 32 * 5 * 8 for h in obs.hooks())
    state = sum(parts.values())
    params = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    batch = batch_memory(model, config, sum(widths.values()))
    return MemoryEstimate(state=state, model=params, batch=batch, parts=parts)


# Fitted to measured peaks (benchmarks/README.md, "memory"): SmolLM2-135M, all stages, batch 1–8 of 128
# tokens: peak − state = 0.80 GB + 0.48 GB per sequence, within 4% at every batch size.
RUNTIME_BYTES = int(0.75 * GIB)  # torch's own buffers, first-touch pages, one layer's temporaries
GRAPH_FLOATS_PER_TOKEN_LAYER = (24, 9, 3)  # × (d_model, d_mlp, n_heads·context): the backward's saved tensors


def batch_memory(model: HookedModel, config: RunConfig, captured_width: int = 0) -> int:
    """Bytes one batch needs beyond the sums and the weights: the graph the Jacobian probes run back through
    (fitted, see above), or without Jacobians the captured activations (``captured_width`` floats a token)."""
    cfg = model.cfg
    B, T = config.batch_size, config.context or min(128, int(cfg.n_ctx))
    element = next(iter(model.parameters())).element_size()
    if config.jacobians is None or not config.jacobian_hooks:
        return RUNTIME_BYTES + 2 * captured_width * B * T * element  # and one float64 copy at a time
    L, d, H = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    a, b, c = GRAPH_FLOATS_PER_TOKEN_LAYER
    return RUNTIME_BYTES + L * B * T * (a * d + b * d_mlp + c * H * T) * element


AUTO_BATCH_SIZES = (8, 4, 2, 1)
CPU_BATCH_BYTES = 2 * GIB


def batch_budget(model: HookedModel) -> int:
    """What one batch may take when the batch size is chosen: 2 GiB on a CPU (where larger batches are not
    faster: SmolLM2 collects as fast at batch 1 as at 8, benchmarks/README.md), a quarter of a GPU."""
    device = model_device(model)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory // 4)
    return CPU_BATCH_BYTES


def choose_batch_size(model: HookedModel, config: RunConfig) -> RunConfig:
    """``config`` with the largest batch size of ``AUTO_BATCH_SIZES`` whose batch fits ``batch_budget`` (the
    smallest when none does). It depends on the model, the run and the device, never on the memory free
    now: a resumed run chooses the same."""
    budget = batch_budget(model)
    candidate = config
    for size in AUTO_BATCH_SIZES:
        candidate = replace(config, batch_size=size)
        if batch_memory(model, candidate) <= budget:
            break
    return candidate
