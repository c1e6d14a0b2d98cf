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


def head_sync_heatmap(tv: torch.Tensor, layer: int, threshold: float, path: Path, vmax: float | None = None) -> Path:
    """Mean TV distance between heads; ``vmax`` shared by every layer's figure (one colour scale); pairs at
    or below the threshold outlined."""
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    top = max(float(tv.max()) if vmax is None else vmax, 1e-6)
    image = ax.imshow(tv.cpu().numpy(), vmin=0, vmax=top, cmap="viridis")
    bar = fig.colorbar(image, ax=ax, label="mean TV distance")
    bar.ax.axhline(threshold, color="r", lw=1.5)  # the threshold on the colour scale
    heads = range(tv.shape[0])
    for i in heads:
        for j in heads:
            if i != j and float(tv[i, j]) <= threshold:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="r", lw=1.5))
    ax.set_xticks(list(heads))
    ax.set_yticks(list(heads))  # integer head indices, not imshow's ±0.5 edges
    ax.set_title(f"layer {layer}: head synchronisation (threshold {threshold:g}, red)", fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("head")
    return save_figure(fig, path)


def cross_layer_summary(report: Any, basis: Any, path: Path) -> Path | None:
    """One figure for a deep model: kept directions per basis hook (IB and PCA), the interaction spectra as
    one heatmap (each hook's Λ relative to its largest), and synchronisation counts per layer."""
    hooks = list(report.spectra)
    heads, neurons = report.synchronized_heads, report.synchronized_neurons
    if not hooks and heads is None and neurons is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    x = range(len(hooks))
    for key, label, style in (("ib_kept", "IB kept", "C0-"), ("ib_dirs_99", "IB dirs for 99% of ΣΛ", "C0--"),
                              ("pca_dirs_99", "PCA dirs for 99% of variance", "C1--")):
        values = [getattr(report.spectra[h], key) for h in hooks]
        if any(v is not None for v in values):
            ax.plot(x, [float("nan") if v is None else v for v in values], style, marker=".", label=label)
    ax.set_xticks(list(x), [h.replace("blocks.", "").replace(".hook_", " ") for h in hooks], rotation=90, fontsize=6)
    ax.set_ylabel("directions")
    ax.set_title("directions per residual hook", fontsize=9)
    if hooks:
        ax.legend(fontsize=7)
    ax = axes[1]
    rows = [basis[h].interaction_eigenvalues.cpu() for h in hooks if basis is not None and h in basis.layers]
    if rows:
        width = max(r.numel() for r in rows)
        grid = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            rel = (r.clamp_min(1e-300) / r.max()).log10()
            grid[i, : r.numel()] = rel.clamp_min(-16)
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", vmin=-16, vmax=0, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="log10 Λ_i / Λ_1")
        ax.set_xlabel("direction (by Λ)")
        ax.set_ylabel("basis hook (row order as left)")
        ax.set_title("interaction spectra, one row per hook", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no interaction basis (stage 'jacobians' off)", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
        ax.set_axis_off()
    ax = axes[2]
    drew = False
    if heads is not None:
        pairs = {l: 0 for l in heads.layers}
        for b in heads.blocks:
            pairs[b.layer] += len(b.heads) * (len(b.heads) - 1) // 2
        ax.bar([l - 0.2 for l in pairs], list(pairs.values()), width=0.4, label="synchronized head pairs")
        drew = True
    if neurons is not None:
        layers = list(neurons.layers)
        ax.bar([l + 0.2 for l in layers], [sum(len(b.neurons) > 1 for b in neurons.layers[l].blocks) for l in layers],
               width=0.4, label="neuron blocks (>1)")
        ax.plot(layers, [len(neurons.layers[l].dead) for l in layers], "k.", label="dead neurons")
        drew = True
    if drew:
        from matplotlib.ticker import MaxNLocator

        ax.set_xlabel("layer")
        ax.set_ylabel("count")
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))  # counts: from 0, never a ±0.04 axis
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if all(h.get_height() == 0 for h in ax.patches) and not any(any(line.get_ydata()) for line in ax.lines):
            ax.text(0.5, 0.6, "none synchronized or dead\nat these thresholds", ha="center", transform=ax.transAxes,
                    fontsize=8, color="#555")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title("synchronisation per layer", fontsize=9)
    else:
        ax.set_axis_off()
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
