"""How sparse an interaction graph is: mass fractions, Gini coefficient and Lorenz curve of its edges.

For one edge matrix ``E`` (docs/theory.md §6) with ``n`` entries and total ``ΣE``:

- ``edge_fraction(E, q)``: the smallest number of *largest* edges whose sum reaches ``q · ΣE``,
  divided by ``n``. A basis whose computation is sparse carries 99% of ``ΣE`` in few edges.
- ``gini(E)``: ``G = 2 Σ_i i·x_(i) / (n Σx) − (n + 1)/n`` over the ascending-sorted weights
  ``x_(1) ≤ … ≤ x_(n)``; 0 for equal weights, ``(n − 1)/n`` when one edge carries everything.
  It equals one minus twice the (trapezoid) area under the Lorenz curve below.
- ``lorenz_curve(E)``: ``x = i/n`` (fraction of edges, sorted ascending), ``y`` = cumulative
  fraction of ``ΣE``, both starting at 0 and ending at 1.

**Rest vertices** (a ``DirectionBudget``, graph.py) stand for many directions each, so their
edges are sums of many edges: counted as single edges they would make a graph look sparser than it
is. ``sparsity_table`` therefore measures fractions and Gini over the kept block (edges between kept
directions) and reports beside them ``rest_share``, the part of the pair's ``ΣE`` on edges touching
a rest vertex, and how many directions each rest vertex holds; ``total`` is the whole pair's ``ΣE``.

**All-zero (or empty) matrices** carry no mass, so no edge is needed to carry any fraction of it:
``edge_fraction`` returns 0.0, ``gini`` returns 0.0 (nothing is unequal), and the Lorenz curve
is the diagonal ``y = x``. No NaN is ever returned. Negative or non-finite entries are refused:
``E`` is a mean of squares, so either signals a bug upstream.
"""
from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .graph import InteractionGraph

FRACTIONS = (0.5, 0.9, 0.99)
# a cumulative sum "reaches" q·ΣE within this relative rounding slack (ten 0.1s must reach 0.9·ΣE)
_REACH_RTOL = 1e-12


def _weights(E: Tensor) -> Tensor:
    """The edge weights as a flat float64 vector, checked."""
    w = E.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("edge weights must be finite")
    if w.numel() and float(w.min()) < 0:
        raise ValueError(f"edge weights must be >= 0 (a mean of squares), got min {float(w.min())}")
    return w


def edge_fraction(E: Float[Tensor, "*shape"], q: float) -> float:
    """Fraction of the edges that, taken largest first, carry at least ``q`` of ``ΣE`` (0 if ``ΣE = 0``)."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    w = _weights(E)
    if w.numel() == 0:
        return 0.0
    cum = torch.cumsum(w.sort(descending=True).values, 0)
    total = float(cum[-1])  # the same summation order as the cumulative sum, so q = 1 is reachable
    if total <= 0:
        return 0.0
    needed = int((cum < q * total * (1 - _REACH_RTOL)).sum()) + 1 if q > 0 else 0
    return min(needed, w.numel()) / w.numel()


def edge_fractions(E: Float[Tensor, "*shape"], fractions: tuple[float, ...] = FRACTIONS) -> dict[str, float]:
    """``{str(q): edge_fraction(E, q)}`` for each ``q`` (string keys: JSON-ready)."""
    return {str(q): edge_fraction(E, q) for q in fractions}


def gini(E: Float[Tensor, "*shape"]) -> float:
    """Gini coefficient of the edge weights (0: all equal or all zero; ``(n−1)/n``: one edge holds all)."""
    w = _weights(E)
    n = w.numel()
    total = float(w.sum())
    if n == 0 or total <= 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    value = 2 * float((ranks * w.sort().values).sum()) / (n * total) - (n + 1) / n
    return max(value, 0.0)  # rounding can leave -1e-17 for equal weights


def lorenz_curve(E: Float[Tensor, "*shape"]) -> tuple[Float[Tensor, " m"], Float[Tensor, " m"]]:
    """``(x, y)``, ``n + 1`` points each: fraction of edges (ascending weight) vs fraction of ``ΣE``."""
    w = _weights(E)
    n = w.numel()
    x = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    total = float(w.sum())
    if n == 0 or total <= 0:
        return x, x.clone()  # no mass: perfect equality, the diagonal
    y = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w.sort().values, 0) / total])
    y[-1] = 1.0  # the last point is ΣE/ΣE by definition, not by rounding
    return x, y


def sparsity_row(E: Float[Tensor, "k_out k_in"], fractions: tuple[float, ...] = FRACTIONS) -> dict[str, Any]:
    """The sparsity summary of one edge matrix: ``n_edges``, ``total``, ``fractions``, ``gini``."""
    w = _weights(E)
    return {"n_edges": int(w.numel()), "total": float(w.sum()), "fractions": edge_fractions(E, fractions),
            "gini": gini(E)}


def sparsity_table(graph: InteractionGraph, fractions: tuple[float, ...] = FRACTIONS) -> list[dict[str, Any]]:
    """One JSON-ready row per layer pair ``l → l+1``: basis, pair index, source and target hooks, kept
    directions ``k_in``/``k_out``, ``n_edges`` (among them), ``fractions`` (``{"0.5": …, "0.9": …, "0.99": …}``,
    each the fraction of those edges carrying that share of their sum) and ``gini``; ``total`` (the pair's
    ``ΣE``, rest vertices included), ``rest_share`` (its part on edges touching a rest vertex) and
    ``rest_in``/``rest_out`` (directions in the input and output rest vertices, 0 for none)."""
    rows = []
    for l, E in enumerate(graph.edges):
        block = graph.kept_block(l)
        total = float(_weights(E).sum())
        rest_share = graph.rest_mass(l) / total if total > 0 else 0.0
        rows.append({"basis": graph.basis, "pair": l, "source": graph.nodes[l], "target": graph.nodes[l + 1],
                     "k_in": int(block.shape[1]), "k_out": int(block.shape[0]), **sparsity_row(block, fractions),
                     "total": total, "rest_share": max(rest_share, 0.0), "rest_in": graph.rest[l],
                     "rest_out": graph.rest[l + 1]})
    return rows
