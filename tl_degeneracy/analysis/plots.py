"""PNG figures for the analysis report (matplotlib, headless Agg backend).

Each function takes plain fitted objects (``LinearBasis``, head-sync matrices, the report's
per-layer table) and writes one PNG; nothing here recomputes statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..basis.linear import LinearBasis
from ..degeneracy.account import LayerTotals
from ..plotting import plt, save_figure


def _positive(values: torch.Tensor) -> torch.Tensor:
    # log axes: eigenvalues at or below zero (numerical noise) are drawn at the floor
    floor = max(float(values.abs().max()) * 1e-18, 1e-300)
    return values.clamp_min(floor)


def spectra(layer: LinearBasis, path: Path) -> Path:
    """Activation (D) and interaction (Λ) eigenvalues on a log scale, thresholds dashed."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    D = layer.activation_eigenvalues.cpu()
    ax.semilogy(range(1, len(D) + 1), _positive(D), ".-", label="activation Gram D")
    if layer.interaction_eigenvalues.numel():
        L = layer.interaction_eigenvalues.cpu()
        ax.semilogy(range(1, len(L) + 1), _positive(L), ".-", label="interaction Λ")
    for key, style in (("activation", "C0"), ("interaction", "C1")):
        if key in layer.thresholds:
            ax.axhline(layer.thresholds[key], color=style, ls="--", lw=0.8,
                       label=f"{key} threshold {layer.thresholds[key]:.2g}")
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"{layer.hook}: {layer.k} of {layer.d} directions kept", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def cumulative(ib: dict[str, Any], pca: dict[str, Any], path: Path) -> Path:
    """Fraction of ΣΛ (IB, solid) and of variance (PCA, dashed) in the leading k directions."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, hook in enumerate(ib):
        for basis, style, name in ((ib, "-", "IB"), (pca, "--", "PCA")):
            if hook not in basis:
                continue
            values = basis[hook].eigenvalues.cpu().clamp_min(0)
            curve = torch.cumsum(values, 0) / values.sum()
            ax.plot(range(1, len(curve) + 1), curve, style, color=f"C{i % 10}", label=f"{name} {hook}")
    ax.axhline(0.99, color="grey", lw=0.6, ls=":", label="99%")
    ax.set_xscale("log")
    ax.set_xlabel("leading directions kept")
    ax.set_ylabel("cumulative fraction\n(IB: of ΣΛ; PCA: of variance)", fontsize=8)
    ax.set_title("How many directions carry the interactions (IB, solid) vs the variance (PCA, dashed)", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def head_sync_heatmap(tv: torch.Tensor, layer: int, threshold: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(tv.cpu().numpy(), vmin=0, vmax=max(float(tv.max()), 1e-6), cmap="viridis")
    fig.colorbar(image, ax=ax, label="mean TV distance")
    heads = range(tv.shape[0])
    ax.set_xticks(list(heads))
    ax.set_yticks(list(heads))  # integer head indices, not imshow's ±0.5 edges
    ax.set_title(f"layer {layer}: head synchronisation (threshold {threshold:g})", fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("head")
    return save_figure(fig, path)


def effective_parameters(per_layer: dict[str, LayerTotals], path: Path) -> Path:
    """Nominal weight parameters vs the K-FAC effective count per layer."""
    layers = list(per_layer)
    nominal = [per_layer[l].nominal for l in layers]
    effective = [per_layer[l].kfac_rank for l in layers]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = range(len(layers))
    ax.bar([i - 0.2 for i in x], nominal, width=0.4, label="nominal")
    ax.bar([i + 0.2 for i in x], effective, width=0.4, label="effective (K-FAC)")
    ax.set_xticks(list(x), layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters")
    ax.set_title("Weight parameters per layer: nominal vs K-FAC effective count", fontsize=8)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
