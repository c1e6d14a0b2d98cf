"""A purpose-built HookedRootModule: embedding, then hook points between plain linear maps.

Everything after each hook is linear, so docs/theory.md §5's appendix-A result applies: the
interaction-basis coordinates at every hook are the output's principal-component
coordinates, up to sign. An optional GELU after the last hook makes it nonlinear (for the
invariance test, which must hold for any downstream function).
"""
from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

try:
    from transformer_lens.hook_points import HookedRootModule
except ImportError:  # TL 4.x moved it to the top level
    from transformer_lens import HookedRootModule


class DeepLinear(HookedRootModule):
    def __init__(self, dims=(8, 8, 8), d_vocab=11, d_out=5, seed=0, nonlinear=False, bias=True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(d_vocab, dims[0], generator=g, dtype=torch.float64))
        self.hook_0 = HookPoint()
        self.linears = nn.ModuleList()
        self.hooks_after = nn.ModuleList()
        for i in range(1, len(dims)):
            lin = nn.Linear(dims[i - 1], dims[i], dtype=torch.float64)
            with torch.no_grad():
                w = torch.randn(dims[i], dims[i - 1], generator=g, dtype=torch.float64)
                lin.weight.copy_(w / dims[i - 1] ** 0.5)
                lin.bias.copy_(0.1 * bias * torch.randn(dims[i], generator=g, dtype=torch.float64))
            self.linears.append(lin)
            self.hooks_after.append(HookPoint())
        self.out = nn.Linear(dims[-1], d_out, dtype=torch.float64)
        with torch.no_grad():
            self.out.weight.copy_(torch.randn(d_out, dims[-1], generator=g, dtype=torch.float64) / dims[-1] ** 0.5)
            self.out.bias.copy_(0.1 * bias * torch.randn(d_out, generator=g, dtype=torch.float64))
        self.nonlinear = nonlinear
        self.setup()

    def forward(self, tokens, **kwargs):
        x = self.hook_0(self.embed[tokens])
        for lin, hook in zip(self.linears, self.hooks_after):
            x = hook(lin(x))
        if self.nonlinear:
            x = torch.nn.functional.gelu(x) + x
        return self.out(x)
