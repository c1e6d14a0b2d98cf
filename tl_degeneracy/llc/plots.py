"""PNG figures of ``N_eff(ε)`` results (matplotlib, headless Agg backend).

Each function takes ``NeffResult``s (and optional K-FAC counts) and writes one PNG; nothing
here samples or recomputes. A scale where no chain was kept (N_eff NaN), a count that is missing,
zero or negative, or an empty input is drawn as a note on the figure, never an error: a figure
is always written.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..plotting import plt
from ..plotting import save_figure as _save
from .estimate import NeffResult


def neff_curve(result: NeffResult, path: str | Path, kfac: Sequence[float | None] | None = None,
               quadratic: Sequence[float] | None = None) -> Path:
    """``N_eff(ε)`` with its standard errors, against the nominal count and, when given, the
    K-FAC count at curvature ``γ ε`` (``kfac[i]`` for ``result.eps[i]``) and a quadratic prediction."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    eps = result.eps
    shown = [(s.eps, s.n_eff, s.standard_error if _finite(s.standard_error) else 0.0) for s in result.scales
             if _finite(s.n_eff) and s.eps > 0]
    if shown:
        x, y, err = zip(*shown)
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label="sampled N_eff(ε) = 2λ̂(ε)")
    missing = [s.eps for s in result.scales if not _finite(s.n_eff)]
    if missing:
        _note(ax, "no estimate (no chain kept) at ε = " + ", ".join(f"{e:g}" for e in missing))
    ax.axhline(result.n_params, color="grey", ls="--", lw=1, label=f"nominal {result.n_params}")
    if kfac is not None:
        pts = [(e, k) for e, k in zip(eps, kfac) if k is not None and k > 0 and e > 0]
        if pts:
            ax.plot(*zip(*pts), "s:", color="C1", label="K-FAC #{g·k > γε}")
    if quadratic is not None:
        pts = [(e, q) for e, q in zip(eps, quadratic) if _finite(q) and e > 0]
        if pts:
            ax.plot(*zip(*pts), "x--", color="C2", label="Σ th/(th+γ) (quadratic)")
    positive = [e for e in eps if e > 0]
    if positive:  # fixed limits: a log axis with nothing finite on it cannot autoscale
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(positive) * 2)
    ax.set_xlabel("loss scale ε")
    ax.set_ylabel("effective parameters")
    ax.set_title(f"{result.subset_text}: γ = {result.config['gamma']:g}", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def layer_bars(results: Mapping[str, NeffResult], eps: float, path: str | Path,
               kfac: Mapping[str, float | None] | None = None) -> Path:
    """Per-part bars at one ε: nominal, sampled N_eff (± s.e.) and, when given, the K-FAC count."""
    labels = list(results)
    x = list(range(len(labels)))
    nominal = [results[k].n_params for k in labels]
    scales = [results[k].scale(eps) for k in labels]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.6))
    width = 0.28 if kfac is not None else 0.4
    if not labels:
        _note(ax, "no parts to show")
    ax.bar([i - width for i in x], nominal, width=width, label="nominal")
    ax.bar(x, [s.n_eff if _finite(s.n_eff) else 0.0 for s in scales], width=width,
           yerr=[s.standard_error if _finite(s.standard_error) else 0.0 for s in scales], capsize=3,
           label=f"sampled N_eff(ε={eps:g})")
    missing = [k for k, s in zip(labels, scales) if not _finite(s.n_eff)]
    if missing:
        _note(ax, "no estimate (no chain kept): " + ", ".join(missing))
    if kfac is not None:
        ax.bar([i + width for i in x], [max(kfac.get(k) or 0, 0) for k in labels], width=width,
               label="K-FAC #{g·k > γε}")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("parameters")
    ax.set_title("Nominal vs effective parameters per part", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_traces(result: NeffResult, path: str | Path) -> Path:
    """``t·L̂_B`` per step for every chain and scale (burn-in shaded; left-out chains dashed)."""
    n = max(1, len(result.scales))
    fig, axes = plt.subplots(n, 1, figsize=(6, 1.9 * n + 0.6), squeeze=False)
    burn = int(result.config["burn_in"])
    for ax, s in zip(axes[:, 0], result.scales):
        for c in s.chains:
            values = [s.t * v if v is not None and math.isfinite(v) else math.nan for v in c.trace]
            ax.plot(values, lw=0.7, ls="-" if c.status == "ok" else "--", label=f"chain {c.chain} ({c.status})")
        ax.axvspan(0, burn, color="grey", alpha=0.15, lw=0)
        if math.isfinite(s.n_eff):
            ax.axhline(s.n_eff / 2, color="k", lw=0.8, ls=":", label="λ̂")
        ax.set_ylabel("t·L_B", fontsize=7)
        ax.set_title(f"ε = {s.eps:g}: N_eff = {s.n_eff:.4g} ± {s.standard_error:.2g}", fontsize=8)
        if not any(math.isfinite(v) for c in s.chains for v in (c.trace or []) if v is not None):
            _note(ax, "no loss trace recorded")
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=3)
    if not result.scales:
        _note(axes[0, 0], "no scales")
    axes[-1, 0].set_xlabel("step (burn-in shaded)")
    return _save(fig, path)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=7, color="C3", wrap=True)
