"""The positive-cost graph in CSR arrays, and METIS's balanced bisection of it (pymetis).

**The graph.** Vertices are every direction of every node, in the interaction graph's vertex order;
an undirected edge joins two directions of consecutive nodes whose cut costs more than 0
(``CostGraph.from_pairs``: edges at or below ε are dropped before anything else sees them). Both
directions of each edge are stored, rows sorted, as METIS wants them. The arrays are built per node
with one scan for nonzeros over ``[C_{l-1} | C_lᵀ]`` (the node's rows of the cost matrices on either
side), so no step loops over edges in Python and nothing assumes square or equal-width layers.
Components (label propagation), induced subgraphs and cuts are array operations too.

**Integer weights.** METIS takes integer edge weights ≥ 1 in its ``idx_t`` (64 bits in pymetis's
wheels; ``pymetis.zero_copy_dtype()`` says which). Costs become ``w = max(1, round(c · s))`` with one
scale ``s = (B − n) / Σc`` per call, ``n`` the stored entries (both directions) and ``B = 2^50``
(``2^30`` for a 32-bit ``idx_t``). Then ``Σ w ≤ Σ (c·s + 1) = B``: no sum METIS forms over weights
(a vertex's, a cut, a coarse edge) can exceed ``B``, far below ``2^63``. The *resolution* is ``1/s``
nats: a weight stands for its cost to within ``½/s``, and a positive cost below ``1/s`` becomes 1,
never 0. On a 13 × 768 graph with 3 M positive edges ``1/s`` is about ``1e-8`` nats. The
integers only steer the search: every reported cost is recomputed in float64 from the labels.

**Balance.** A side meant to hold a fraction ``t`` of ``m`` vertices must hold between ``lo`` and
``hi`` (``modules._size_bounds``). METIS bounds each part from above, by ``(1 + ufactor/1000) ×``
its target, with one ``ufactor`` for both parts; ``ufactor = ⌊1000 · (min(hi/(t·m), (m−lo)/((1−t)·m))
− 1)⌋`` (at least 1) keeps both sides within the bound (for ``t = ½`` exactly ``1000 β``). METIS
treats it as a target, so a side that ends up outside ``[lo, hi]`` is trimmed (``rebalance``): the
vertices whose move raises the cut least go to the other side.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import networkx as nx
import numpy as np

WEIGHT_BITS = 50  # Σ of METIS's integer weights ≤ 2^50 (2^(bits−2) for a narrower idx_t)
_CHUNK = 1 << 20  # entries per chunk of elementwise work on the largest arrays


def _vertex_dtype(n: int) -> type[np.signedinteger]:
    """int32 for vertex ids when they fit: arrays over all stored entries are large, and half as large is faster."""
    return np.int32 if n < 2 ** 31 else np.int64


@dataclass(frozen=True)
class CostGraph:
    """A symmetric graph in CSR form: vertex ``v``'s neighbours are ``indices[indptr[v]:indptr[v+1]]``,
    with the cut cost of each edge in ``costs`` (float64, > 0). Each edge is stored twice."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int64 [2 · edges]
    costs: np.ndarray  # float64 [2 · edges]

    @classmethod
    def from_pairs(cls, costs: Sequence[np.ndarray]) -> CostGraph:
        """From one cost matrix per consecutive node pair (``costs[l]``: ``[k_{l+1}, k_l]``, ≥ 0; zeros dropped)."""
        if not costs:
            return cls.empty(0)
        for l, C in enumerate(costs):
            if C.size and not (C.min() >= 0 and np.isfinite(C.max())):  # a NaN fails the first test
                raise ValueError(f"cut costs of pair {l} must be finite and ≥ 0")
        sizes = [costs[0].shape[1], *(c.shape[0] for c in costs)]
        off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # entries per vertex: its nonzero costs to the node before and to the node after
        counts = np.concatenate([(np.count_nonzero(costs[l - 1], axis=1) if l > 0 else 0) +
                                 (np.count_nonzero(costs[l], axis=0) if l < len(costs) else 0)
                                 for l in range(len(sizes))])
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # filled node by node, in place: one fresh allocation per array (fresh pages are slow to touch)
        indices = np.empty(indptr[-1], dtype=np.int64)
        values = np.empty(indptr[-1], dtype=np.float64)
        for l in range(len(sizes)):
            # this node's rows: its costs from node l−1 and to node l+1, with those nodes' vertex ids
            parts = ([(costs[l - 1], np.arange(off[l - 1], off[l]))] if l > 0 else []) + \
                    ([(costs[l].T, np.arange(off[l + 1], off[l + 2]))] if l < len(costs) else [])
            block = np.concatenate([p for p, _ in parts], axis=1) if len(parts) > 1 else \
                np.ascontiguousarray(parts[0][0])
            column = np.concatenate([c for _, c in parts])
            flat = block.ravel()
            at = np.flatnonzero(flat)  # row-major: sorted by vertex, then by neighbour
            span = slice(indptr[off[l]], indptr[off[l + 1]])
            np.take(flat, at, out=values[span])
            np.take(column, at % block.shape[1], out=indices[span])
        return cls(indptr, indices, values)

    @classmethod
    def empty(cls, n: int) -> CostGraph:
        return cls(np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

    @property
    def n_vertices(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_edges(self) -> int:
        return len(self.indices) // 2

    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    @cached_property
    def rows(self) -> np.ndarray:
        """The vertex each stored entry belongs to (the CSR row, expanded; int32 halves its memory)."""
        return np.repeat(np.arange(self.n_vertices, dtype=_vertex_dtype(self.n_vertices)), self.degree())

    def subgraph(self, vertices: np.ndarray) -> CostGraph:
        """The graph induced on ``vertices`` (ascending), renumbered ``0 … len − 1`` in that order."""
        vertices = np.asarray(vertices, dtype=np.int64)
        if len(vertices) > 1 and not (np.diff(vertices) > 0).all():
            raise ValueError("subgraph vertices must be strictly ascending")
        inside = np.zeros(self.n_vertices, dtype=bool)
        inside[vertices] = True
        keep = inside[self.rows] & inside[self.indices]
        counts = np.bincount(self.rows[keep], minlength=self.n_vertices)[vertices]
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64, copy=False)
        new = np.cumsum(inside) - 1
        return CostGraph(indptr, new[self.indices[keep]], self.costs[keep])

    def cut(self, side: np.ndarray) -> float:
        """Float64 cost of the edges between ``side`` (a boolean mask) and the rest."""
        crossing = side[self.rows] != side[self.indices]
        return 0.5 * float(np.add.reduce(self.costs, where=crossing))  # each edge is stored twice

    def components(self) -> np.ndarray:
        """Connected components: each vertex labelled with the smallest vertex of its component.

        Label propagation with pointer jumping, on arrays: each vertex takes the smallest label among
        itself and its neighbours, the vertex its old label pointed at takes it too, and labels jump
        to their labels' labels until they settle; repeat until nothing changes. A label is always a
        vertex of the same component and never larger than the vertex, so at the fixed point every
        component carries its smallest vertex.
        """
        labels = np.arange(self.n_vertices, dtype=_vertex_dtype(self.n_vertices))
        linked = self.degree() > 0
        if not linked.any():
            return labels.astype(np.int64)
        starts = self.indptr[:-1][linked]  # reduceat's segments: the non-empty rows
        while True:
            new = labels.copy()
            new[linked] = np.minimum(labels[linked], np.minimum.reduceat(labels[self.indices], starts))
            np.minimum.at(new, labels, new)
            while True:
                up = new[new]
                if np.array_equal(up, new):
                    break
                new = up
            if np.array_equal(new, labels):
                return labels.astype(np.int64)
            labels = new

    def to_networkx(self) -> nx.Graph:
        """networkx graph on ``0 … n − 1`` with ``weight`` = cost (a Python loop: small graphs only)."""
        once = self.rows < self.indices
        u, v, c = self.rows[once], self.indices[once], self.costs[once]
        G = nx.Graph()
        G.add_nodes_from(range(self.n_vertices))
        G.add_weighted_edges_from(zip(u.tolist(), v.tolist(), c.tolist()))
        return G


@dataclass(frozen=True)
class IntegerWeights:
    """Integer edge weights for METIS: ``max(1, round(cost · scale))``, summing to at most ``budget``."""

    weights: np.ndarray
    scale: float  # integer units per nat of cost
    budget: int

    @property
    def resolution(self) -> float:
        """The cost of one integer unit (nats): the smallest positive cost METIS can tell from zero."""
        return 1.0 / self.scale


def weight_budget(idx_bits: int) -> int:
    """The bound on the sum of all weights handed to METIS, for an ``idx_bits``-bit ``idx_t``."""
    return 2 ** min(idx_bits - 2, WEIGHT_BITS)


def integer_weights(costs: np.ndarray, idx_bits: int = 64) -> IntegerWeights:
    """Scale positive float costs to integers ≥ 1 whose total fits the budget (module docstring)."""
    costs = np.asarray(costs, dtype=np.float64)
    budget = weight_budget(idx_bits)
    if costs.size and not (costs.min() > 0 and np.isfinite(costs.max())):
        raise ValueError("METIS weights need finite costs > 0 (zero-cost edges are dropped first)")
    if 2 * costs.size >= budget:
        raise ValueError(f"{costs.size} edge entries leave no room in a {idx_bits}-bit METIS index")
    # the margin covers the rounding of the float sum and products (relative ≲ 1e-15)
    scale = (budget - costs.size) / (float(costs.sum()) * (1 + 1e-12)) if costs.size else 1.0
    weights = np.empty(costs.size, dtype=np.int64 if idx_bits > 32 else np.int32)
    for start in range(0, costs.size, _CHUNK):  # in chunks: one float temporary of chunk size, reused
        part = costs[start:start + _CHUNK] * scale
        np.rint(part, out=part)
        np.maximum(part, 1.0, out=part)  # a positive cost never becomes 0
        weights[start:start + _CHUNK] = part
    return IntegerWeights(weights, scale, budget)


@dataclass(frozen=True)
class MetisSplit:
    """How METIS made one bisection: the run kept, its options, the weights' resolution, the trimming."""

    version: str  # pymetis
    runs: int  # METIS runs tried (seeds and target sizes); the cheapest was kept
    target: float  # the kept run's first-side fraction (tpwgts[0])
    ufactor: int
    seed: int
    weight_scale: float  # integer units per nat
    resolution: float  # nats per integer unit
    sizes_from_metis: tuple[int, int]
    moved: int  # vertices moved afterwards to meet the balance bound

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sizes_from_metis": list(self.sizes_from_metis)}


def ufactor_for(m: int, t: float, lo: int, hi: int) -> int:
    """METIS's imbalance (per mille above each part's target) that keeps the first side in ``[lo, hi]``."""
    slack = min(hi / (t * m), (m - lo) / ((1 - t) * m)) - 1.0
    return max(1, math.floor(1000 * slack + 1e-9))


def rebalance(graph: CostGraph, side: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, int]:
    """Move the fewest vertices across so the first side holds ``lo … hi``: those whose move raises the
    cut least (gains from the current sides, taken once). Returns the new mask and how many moved."""
    size = int(side.sum())
    if lo <= size <= hi:
        return side, 0
    leaving = size > hi  # the side vertices leave: True (the first side) when it is too large
    excess = size - hi if leaving else lo - size
    rows = graph.rows
    same = side[rows] == side[graph.indices]
    n = graph.n_vertices
    internal = np.bincount(rows, weights=np.where(same, graph.costs, 0.0), minlength=n)
    external = np.bincount(rows, weights=np.where(same, 0.0, graph.costs), minlength=n)
    candidates = np.flatnonzero(side == leaving)
    moving = candidates[np.argsort(internal[candidates] - external[candidates], kind="stable")[:excess]]
    out = side.copy()
    out[moving] = not leaving
    return out, excess


def metis_bisection(graph: CostGraph, targets: Sequence[float], lo: int, hi: int, *, seed: int, runs: int,
                    metis: Any) -> tuple[np.ndarray, MetisSplit]:
    """The cheapest of ``runs`` METIS bisections (seeds ``seed, seed + 1, …``, cycling through the first
    side's target fractions ``targets``), each trimmed into ``[lo, hi]``. ``metis`` is the imported pymetis
    module. Returns the first side's mask and the kept run's record.

    Runs are ranked by METIS's own integer cut over the scale (each cut edge within ``½ · resolution`` of
    its cost, or up to one resolution above it when rounded up to 1), a trimmed run by its float64 cut;
    the caller recomputes the kept side's cost in float64."""
    m = graph.n_vertices
    w = integer_weights(graph.costs, 8 * np.dtype(metis.zero_copy_dtype()).itemsize)
    dtype = w.weights.dtype
    adjacency = metis.CSRAdjacency(graph.indptr.astype(dtype, copy=False), graph.indices.astype(dtype, copy=False))
    best: tuple[float, np.ndarray, MetisSplit] | None = None
    for r in range(max(1, runs)):
        t = targets[r % len(targets)]
        ufactor = ufactor_for(m, t, lo, hi)
        options = metis.Options(ufactor=ufactor, seed=int(seed) + r)
        objective, parts = metis.part_graph(2, adjacency=adjacency, eweights=w.weights, tpwgts=[t, 1.0 - t],
                                            options=options, recursive=True)
        side = np.asarray(parts) == 0
        found = int(side.sum())
        side, moved = rebalance(graph, side, lo, hi)
        cost = graph.cut(side) if moved else objective / w.scale
        if best is None or cost < best[0]:
            best = (cost, side, MetisSplit(str(metis.version), max(1, runs), t, ufactor, int(seed) + r, w.scale,
                                           w.resolution, (found, m - found), moved))
    assert best is not None
    return best[1], best[2]
