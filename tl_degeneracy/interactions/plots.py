"""PNG figures of interaction graphs (matplotlib, headless Agg): the layered graph, Lorenz curves, ablation.

Each function takes plain objects (``InteractionGraph``, ``ModuleResult``, the ablation table's
rows) and writes one PNG; nothing here recomputes statistics beyond sorting. Empty or all-zero
edge matrices give a figure that says so, never an exception or a blank image. A node's rest vertex
(a direction budget, graph.py) is drawn as a square below its directions; its edges are sums over
many directions, so they are neither ranked among the strongest edges nor in the Lorenz curves, and
the titles give their share of ΣE.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..plotting import plt
from ..plotting import save_figure as _save
from .graph import InteractionGraph
from .modules import ModuleResult
from .sparsity import gini, lorenz_curve

# one colour per basis across all figures, so IB / PCA / standard / random read the same everywhere
BASIS_STYLE = {"interaction": ("C0", "-"), "pca": ("C1", "--"), "standard": ("C2", "-."), "random": ("grey", ":")}


def _style(basis: str, index: int) -> tuple[str, str]:
    return BASIS_STYLE.get(basis, (f"C{(index + 4) % 10}", "-"))


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def _short(hook: str) -> str:
    return hook.replace("blocks.", "").replace("hook_", "")


def plot_layered_graph(graph: InteractionGraph, path: Path, modules: ModuleResult | Sequence[int] | None = None,
                       top: int = 300) -> Path:
    """Nodes as columns, directions as dots, the ``top`` strongest edges as lines of width ∝ ``√E``.

    ``√E`` is the paper's connection weight ``w``, which spreads widths more legibly than ``E``. With
    ``modules`` (a ``ModuleResult`` or one label per vertex), dots are coloured by module, each node's
    directions are grouped by module, edges inside a module take its colour and cut edges are black
    and dashed. Rest vertices are squares at the bottom of their column; their edges are not drawn.
    """
    sizes = graph.sizes
    labels = None
    if modules is not None:
        labels = list(modules.assignment if isinstance(modules, ModuleResult) else modules)
        if len(labels) != graph.n_vertices:
            raise ValueError(f"{len(labels)} module labels for {graph.n_vertices} vertices")
    fig, ax = plt.subplots(figsize=(min(max(6.0, 1.0 * max(len(graph.nodes), 1) + 3), 16.0), 4.8))
    if not sizes:
        _note(ax, f"{graph.basis}: no edges ({len(graph.nodes)} node(s))")
        ax.set_axis_off()
        return _save(fig, path)
    off = graph.offsets()
    # y position of every vertex: directions spread over [0, 1], grouped by module when given; a rest
    # vertex sits below them
    y = [0.0] * graph.n_vertices
    for l, k in enumerate(sizes):
        rest = graph.rest_index(l)
        kept = [j for j in range(k) if j != rest]
        order = sorted(kept, key=lambda j: (labels[off[l] + j], j) if labels else j)
        for rank, j in enumerate(order):
            y[off[l] + j] = 1 - (rank + 0.5) / max(len(kept), 1)
        if rest is not None:
            y[off[l] + rest] = -0.06
    # the strongest edges among kept directions over the whole graph (topk: a graph can hold millions)
    kept_only = []
    for l, E in enumerate(graph.edges):
        E = E.detach().cpu().to(torch.float64).clone()
        E[graph.kept_block(l).shape[0]:, :] = 0  # the rest row and column: sums, not edges
        E[:, graph.kept_block(l).shape[1]:] = 0
        kept_only.append(E.reshape(-1))
    flat = torch.cat(kept_only)
    n_nonzero = int((flat > 0).sum())
    values, index = flat.topk(min(max(top, 0), n_nonzero))
    starts = [sum(E.numel() for E in graph.edges[:l]) for l in range(len(graph.edges))]
    shown = []
    for value, flat_index in zip(values.tolist(), index.tolist()):
        l = max(p for p, start in enumerate(starts) if start <= flat_index)
        i, j = divmod(flat_index - starts[l], graph.edges[l].shape[1])
        shown.append((value, l, i, j))
    if shown:
        w_max = math.sqrt(shown[0][0])
        segments, widths, colours, styles = [], [], [], []
        for value, l, i, j in reversed(shown):  # weakest first, so strong edges are drawn on top
            u, v = off[l] + j, off[l + 1] + i
            segments.append([(l, y[u]), (l + 1, y[v])])
            widths.append(0.2 + 3.5 * math.sqrt(value) / w_max)
            same = labels is None or labels[u] == labels[v]
            colours.append(f"C{labels[u] % 10}" if labels is not None and same else ("0.35" if same else "k"))
            styles.append("solid" if same else "dashed")
        ax.add_collection(LineCollection(segments, linewidths=widths, colors=colours, linestyles=styles, alpha=0.6))
    for l, k in enumerate(sizes):
        rest = graph.rest_index(l)
        kept = [j for j in range(k) if j != rest]
        colour = [f"C{labels[off[l] + j] % 10}" for j in kept] if labels else "k"
        dot = max(2.0, 30.0 / math.sqrt(max(len(kept), 1)))  # many directions: smaller dots
        ax.scatter([l] * len(kept), [y[off[l] + j] for j in kept], s=dot, c=colour, zorder=3)
        if rest is not None:
            ax.scatter([l], [y[off[l] + rest]], s=40, marker="s", c=f"C{labels[off[l] + rest] % 10}" if labels
                       else "0.5", edgecolors="k", zorder=3)
            ax.annotate(f"+{graph.rest[l]}", (l, y[off[l] + rest]), xytext=(5, -2), textcoords="offset points",
                        fontsize=6)
    ax.set_xticks(range(len(graph.nodes)), [_short(n) for n in graph.nodes], rotation=30, ha="right", fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(-0.3, len(graph.nodes) - 0.7)
    ax.set_ylim(-0.1 if any(graph.rest) else -0.02, 1.02)
    title = f"{graph.basis}: top {len(shown)} of {n_nonzero} nonzero edges (width ∝ √E)"
    if not n_nonzero:
        title = f"{graph.basis}: all edges are zero"
    if any(graph.rest):
        total = graph.total()
        share = sum(graph.rest_mass(l) for l in range(len(graph.edges))) / total if total > 0 else 0.0
        title += f"\nrest vertices (squares, +n directions): {100 * share:.1f}% of ΣE, edges not drawn"
    if isinstance(modules, ModuleResult):
        title += f"\n{modules.n_modules} modules at ε = {modules.eps:.3g}, cut cost {modules.cut_cost:.3g}"
    ax.set_title(title, fontsize=9)
    handles = []
    if labels is not None:
        for m in sorted(set(labels))[:10]:
            handles.append(Line2D([], [], marker="o", ls="-", color=f"C{m % 10}", label=f"module {m}: directions, "
                                  "edges inside"))
        handles.append(Line2D([], [], ls="--", color="k", label="edge cut between modules"))
    else:
        handles.append(Line2D([], [], marker="o", ls="-", color="0.35", mfc="k", mec="k",
                              label="direction; edge width ∝ √E"))
    if any(graph.rest):
        handles.append(Line2D([], [], marker="s", ls="", color="0.5", mec="k", label="rest vertex (+n directions)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _save(fig, path)


def plot_lorenz(graphs_by_basis: dict[str, InteractionGraph], path: Path) -> Path:
    """Edge concentration: one panel per layer pair, one curve per basis. The Lorenz curve turned around:
    ``x`` the fraction of edges, strongest first, on a log axis; ``y`` the share of ``ΣE`` they carry.

    On a linear axis a sparse basis's Lorenz curve hugs the bottom right and the bases cannot be told
    apart; here a sparse basis reaches 1 far to the left. The dotted diagonal is equal edges; the grey
    line marks 99% of ``ΣE``. The legend gives each curve's Gini coefficient (one minus twice the area
    under the Lorenz curve). Edges among kept directions only.
    """
    n_pairs = max((len(g.edges) for g in graphs_by_basis.values()), default=0)
    cols = min(max(n_pairs, 1), 4)
    rows = max(math.ceil(n_pairs / cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.1 * rows), squeeze=False)
    if n_pairs == 0:
        _note(axes[0][0], "no edge matrices")
    smallest = 1.0
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= n_pairs:
            if n_pairs:
                ax.set_axis_off()
            continue
        title = ""
        for index, (basis, graph) in enumerate(graphs_by_basis.items()):
            if p >= len(graph.edges):
                continue
            E = graph.kept_block(p)
            x, y = lorenz_curve(E)
            top_x, top_y = (1 - x).flip(0)[1:], (1 - y).flip(0)[1:]  # strongest first; drop the (0, 0) point
            if top_x.numel():
                smallest = min(smallest, float(top_x[0]))
            colour, style = _style(basis, index)
            zero = " (all zero)" if float(E.sum()) == 0 else ""
            ax.plot(top_x.numpy(), top_y.numpy(), style, color=colour, label=f"{basis}: Gini {gini(E):.2f}{zero}")
            title = f"{_short(graph.nodes[p])} → {_short(graph.nodes[p + 1])}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fraction of edges, strongest first", fontsize=8)
        ax.set_ylabel("share of ΣE they carry", fontsize=8)
        ax.axhline(0.99, color="0.6", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower right")
    for p in range(n_pairs):
        ax = axes[p // cols][p % cols]
        grid = torch.logspace(math.log10(smallest), 0, 50)
        ax.plot(grid.numpy(), grid.numpy(), ":", color="grey", lw=0.8)  # equal edges
        ax.set_xscale("log")
        ax.set_xlim(smallest, 1)
    return _save(fig, path)


def _finite(xs: Sequence[Any], ys: Sequence[Any] | None) -> tuple[list[float], list[float]]:
    if ys is None:
        return [], []
    pairs = [(float(x), float(v)) for x, v in zip(xs, ys) if v is not None and math.isfinite(float(v))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_ablation(curves: list[dict[str, Any]], path: Path) -> Path:
    """Ablation curves: one row per hook, behavioural loss (left) and cross-entropy increase (right)
    against the number of kept directions ``k``, one curve per basis.

    ``curves``: dicts ``{"hook", "basis", "k", "behavioral_loss", "ce_increase"}``. An axis is
    logarithmic when every value on it is positive, symmetric-log when some are not (a CE increase
    can dip below 0 by noise), linear when it has no values.
    """
    hooks = list(dict.fromkeys(c["hook"] for c in curves))
    rows = max(len(hooks), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(9, 2.8 * rows), squeeze=False)
    if not hooks:
        _note(axes[0][0], "no ablation curves")
        _note(axes[0][1], "no ablation curves")
    bases = list(dict.fromkeys(c["basis"] for c in curves))
    for r, hook in enumerate(hooks):
        for col, (key, label) in enumerate((("behavioral_loss", "behavioural loss (MSE on logits)"),
                                            ("ce_increase", "CE increase (nats)"))):
            ax = axes[r][col]
            values: list[float] = []
            ks: list[float] = []
            for curve in (c for c in curves if c["hook"] == hook):
                k, v = _finite(curve.get("k", []), curve.get(key))
                if not k:
                    continue
                colour, style = _style(curve["basis"], bases.index(curve["basis"]))
                ax.plot(k, v, style, marker=".", color=colour, label=curve["basis"])
                values += v
                ks += k
            if values and min(values) > 0:
                ax.set_yscale("log")
            elif values and max(abs(v) for v in values) > 0:
                # linear within 1e-4 of the largest |value|: rounding-level dips below 0 stay readable
                ax.set_yscale("symlog", linthresh=max(1e-4 * max(abs(v) for v in values), 1e-12))
            if not values:
                _note(ax, "no values")
            else:
                ax.legend(fontsize=6)
            positive = [k for k in ks if k > 0]
            if positive and max(positive) / min(positive) >= 16:  # a geometric k grid reads better on log x
                if min(ks) <= 0:
                    ax.set_xscale("symlog", base=2, linthresh=1)
                    ax.set_xlim(left=-0.2)
                else:
                    ax.set_xscale("log", base=2)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{hook}: {label}", fontsize=8)
            ax.set_xlabel("directions kept (k)", fontsize=7)
    return _save(fig, path)
