"""Modules of an interaction graph: the paper's cut cost (§5.2.3, eq. 35) and a balanced search for it.

**Cost** (docs/theory.md §6). Cutting an edge of weight ``w = E^{1/2}`` costs
``max(0, log(w / ε^{1/2})) = max(0, ½ log(E_ij / ε))``: edges at or below the loss scale ε are
free to cut, and weak links add logarithmically. A partition's cost is the sum over the edges
between different modules, always recomputed in float64 from the labels (``cut_cost``).

**ε.** Given as ``eps_rtol`` relative to the largest edge of the graph (the package convention,
docs/theory.md §7: ``ε = eps_rtol · max E``), or as an absolute ``eps``, which then replaces it.
Every result records both (``eps``, ``eps_rtol``) and a sentence saying which was given.

**Search.** Recursive bisection: ``n_modules`` modules are found by splitting the vertex set into
``⌈n/2⌉ : ⌊n/2⌋`` shares of the modules and recursing; each split minimises the cost of the edges
it cuts (edges cut earlier are already paid). Each bisection keeps both sides within a balance
bound ``β``: a side meant to hold a fraction ``t`` of the vertices holds between ``(t − β/2)·m`` and
``(t + β/2)·m`` of the ``m`` vertices (for two modules, between ``(1−β)/2`` and ``(1+β)/2``);
without it one module wins trivially. Sizes nearest the target are always allowed. Vertices
with no positive-cost edge are *free*: they cost nothing anywhere and are placed to balance.
Edges that cost nothing (``E ≤ ε``) are dropped before the search; the rest are held as CSR
arrays (``partition.CostGraph``). Each bisection takes the first of these that applies, and
records which (``Bisection.method``):

1. **Connected components** (``"components"``, exact): if the components of the positive-cost
   graph can be packed into two sides within the bound (a subset-sum over component sizes, free
   vertices filling up), the cut costs 0 — the optimum. A local search can miss such a cut.
2. **Global minimum cut** (``"min_cut"``, exact when it applies): networkx's Stoer–Wagner on the
   positive-cost graph when it is connected and small (``_MIN_CUT_MAX_WORK``); if that cut can be
   balanced with the free vertices it is the cheapest balanced bisection, since (1) having failed,
   every balanced bisection cuts that graph somewhere. This certifies a single weak link.
3. **METIS** (``"metis"``, heuristic): pymetis's multilevel bisection with the costs as integer
   edge weights (``partition``: ``w = max(1, round(c·s))``, their sum ≤ 2⁵⁰, resolution ``1/s``),
   the target fraction as ``tpwgts`` and β as ``ufactor``. ``restarts`` runs, seeds ``seed, seed+1,
   …``, cycle through the target size and the two extreme allowed sizes (the cheapest cut may sit at
   a bound); a side METIS leaves outside the bound is trimmed; the cheapest run is kept. Each split
   records METIS's options, the resolution and the trimming (``Bisection.metis``). Not certified.
   *Fallback* (``"kernighan_lin"``): when pymetis cannot be imported, networkx's Kernighan–Lin from
   ``restarts`` seeded random starts at the same three sizes, the cheapest kept. Pure Python:
   minutes beyond ~10⁵ edges. The result says which ran (``ModuleResult.search`` and
   ``search_meaning``), and the fallback warns.

**Why METIS, and why recursive.** The quantity is a *cut cost* (eq. 35) at a *fixed* number of
modules under a *balance constraint*: a balanced minimum-cut graph partition, which is what METIS
computes (multilevel coarsening, an initial bisection of the coarse graph, Fiduccia–Mattheyses
refinement on the way back), in C, in near-linear time in the edges. Leiden (leidenalg/igraph)
optimises modularity or the Constant Potts Model against a null model and chooses the number and
sizes of communities itself; it cannot state either constraint. Kernighan–Lin swaps pairs of
vertices at a fixed size from random starts, in pure Python. More than two modules come from our
recursive bisection, not from METIS's k-way call (or its own recursive one): β keeps its meaning
split by split (k-way's ``ufactor`` only caps each module's size), the exact steps (1)–(2) get every
split, and every split records how it was found. Measured (benchmarks/module_search.py, 13 × 768,
4.0 M positive edges, eight modules): on a clearly modular graph all three recover the planted
modules; on a weakly modular one the costs agree within 0.6 % (k-way 0.24 % below ours, METIS's
recursive call 0.34 % above). k-way is faster (0.4 s against 6 s with 8 METIS runs per split), but
both are within the budget and only the recursion keeps the meaning above.

**Scale.** A SmolLM2/GPT-2-sized graph (13 × 768 directions, 4 M positive-cost edges) is searched
in seconds on two cores (a bisection 3.8 s, eight modules 6.3 s at load average 4; benchmarks/):
CSR arrays built with one nonzero scan per node into preallocated arrays, components by label
propagation, subgraphs and cuts by masks, the costs in single-threaded numpy, METIS in C;
Stoer–Wagner only on small graphs. The largest arrays are touched as few times as possible: on a
small shared machine fresh pages cost as much as the arithmetic. Costs reach METIS as integers with a
resolution near ``1e-8`` nats there, and every reported cost is float64 from the labels. Without
pymetis the search falls back to networkx and is limited to thousands of vertices with sparse
positive-cost graphs (raise ε to prune).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .graph import InteractionGraph
from .partition import CostGraph, MetisSplit, metis_bisection

DEFAULT_EPS_RTOL = 1e-3
DEFAULT_BALANCE = 0.2
DEFAULT_RESTARTS = 8
# Stoer–Wagner is O(V·E + V² log V) in pure Python: only run it below this V·E
_MIN_CUT_MAX_WORK = 5_000_000
_CUT_EDGES_IN_DICT = 20
_CUT_EDGES_KEPT = 1000  # ModuleResult.cut keeps the most expensive ones; n_cut_edges counts them all


@dataclass(frozen=True)
class CutScale:
    """The loss scale ε of one search: absolute, relative to the largest edge, and which was given."""

    eps: float
    eps_rtol: float | None  # eps / max E; None when every edge is 0
    max_edge: float
    meaning: str

    def to_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "eps_rtol": self.eps_rtol, "max_edge": self.max_edge, "eps_meaning": self.meaning}


def cut_scale(graph: InteractionGraph, eps_rtol: float = DEFAULT_EPS_RTOL, eps: float | None = None) -> CutScale:
    """ε from ``eps_rtol · max E`` (package convention), or the absolute ``eps`` when given (it wins)."""
    top = max((float(E.max()) for E in graph.edges if E.numel()), default=0.0)
    if eps is not None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (the cost ½ log(E/ε) diverges at ε = 0), got {eps}")
        return CutScale(float(eps), float(eps) / top if top > 0 else None, top,
                        f"absolute loss scale ε = {eps:g} given; edges E ≤ ε are free to cut")
    if not eps_rtol > 0:
        raise ValueError(f"eps_rtol must be > 0, got {eps_rtol}")
    return CutScale(float(eps_rtol) * top, float(eps_rtol), top,
                    f"ε = eps_rtol × the largest edge ({eps_rtol:g} × {top:.6g}); edges E ≤ ε are free to cut")


def _cost_matrix(E: Tensor, eps: float) -> np.ndarray:
    """``edge_costs`` in numpy (single-threaded: these elementwise passes only lose to thread start-up)."""
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    E_np = E.detach().to(device="cpu", dtype=torch.float64).numpy()
    positive = E_np > eps
    scale = eps if eps > 0 else 1e-300  # ε = 0 only arises for an all-zero graph, where nothing is positive
    out = np.where(positive, E_np, scale)  # keeps 0/0 and log(0) out; only entries with E > ε matter
    if math.isfinite(float(out.max(initial=0.0)) / scale):
        np.divide(out, scale, out=out)
        np.log(out, out=out)
    else:  # E/ε overflows float64 somewhere (E = 1e10, ε = 1e-300): log E − log ε instead
        np.log(out, out=out)
        out -= math.log(scale)
    out *= 0.5
    out[~positive] = 0.0
    return out


def edge_costs(E: Float[Tensor, "k_out k_in"], eps: float) -> Float[Tensor, "k_out k_in"]:
    """``max(0, ½ log(E / ε))`` per edge, float64; exactly 0 where ``E ≤ ε`` (also when ``ε = 0 = E``).

    Where ``E/ε`` would overflow float64 (``E = 1e10``, ``ε = 1e-300``) ``log E − log ε`` is used.
    """
    return torch.from_numpy(_cost_matrix(E, eps))


def _all_costs(graph: InteractionGraph, eps: float) -> list[np.ndarray]:
    return [_cost_matrix(E, eps) for E in graph.edges]


def cost_csr(graph: InteractionGraph, eps: float) -> CostGraph:
    """The positive-cost edges of the graph as CSR arrays over all vertices (``partition.CostGraph``)."""
    return CostGraph.from_pairs(_all_costs(graph, eps))


def cost_graph(graph: InteractionGraph, eps: float) -> nx.Graph:
    """networkx graph on all vertices (``0 … V−1``) with the positive-cost edges, ``weight`` = cost.

    Built edge by edge in Python: for small graphs and inspection; the search uses ``cost_csr``."""
    return cost_csr(graph, eps).to_networkx()


def _labels(graph: InteractionGraph, assignment: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(assignment, Tensor):
        assignment = assignment.detach().cpu().numpy()
    a = np.asarray(assignment, dtype=np.int64).reshape(-1)
    if a.size != graph.n_vertices:
        raise ValueError(f"assignment has {a.size} labels, the graph has {graph.n_vertices} vertices")
    return a


def _pair_labels(graph: InteractionGraph, a: np.ndarray, l: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of pair ``l``'s input (node l) and output (node l + 1) directions."""
    off, E = graph.offsets(), graph.edges[l]
    return a[off[l]:off[l] + E.shape[1]], a[off[l + 1]:off[l + 1] + E.shape[0]]


@dataclass(frozen=True)
class _Cut:
    """A partition's cut: float64 total, how many positive-cost edges, and the most expensive ones."""

    total: float
    count: int
    edges: list[CutEdge]


def _cut(graph: InteractionGraph, costs: list[np.ndarray], a: np.ndarray, limit: int | None) -> _Cut:
    """One pass over the pairs. Per pair only the edges at or above its ``limit``-th largest cut cost can be
    among the ``limit`` most expensive overall (ties included), so only those are gathered and sorted."""
    total, count = 0.0, 0
    found: list[list[np.ndarray]] = [[], [], [], [], []]
    for l, (E, C) in enumerate(zip(graph.edges, costs)):
        a_in, a_out = _pair_labels(graph, a, l)
        cut = np.where(a_out[:, None] != a_in[None, :], C, 0.0)
        total += float(cut.sum())
        n = int(np.count_nonzero(cut))
        count += n
        if n == 0 or limit == 0:
            continue
        floor = np.partition(cut.ravel(), cut.size - min(limit, n))[cut.size - min(limit, n)] if limit else 0.0
        i, j = np.nonzero((cut >= floor) & (cut > 0))
        E_np = E.detach().to(device="cpu", dtype=torch.float64).numpy()
        for part, values in zip(found, (np.full_like(i, l), i, j, E_np[i, j], cut[i, j])):
            part.append(values)
    if not found[0]:
        return _Cut(total, count, [])
    pair, rows, cols, e, c = (np.concatenate(p) for p in found)
    order = np.lexsort((cols, rows, pair, -c))[:limit]
    return _Cut(total, count, [CutEdge(int(pair[k]), int(rows[k]), int(cols[k]), float(e[k]), float(c[k]))
                               for k in order])


def cut_cost(graph: InteractionGraph, assignment: Int[Tensor, " v"] | Sequence[int], eps: float) -> float:
    """Total cost of the edges whose endpoints carry different module labels (vertex order of the graph)."""
    return _cut(graph, _all_costs(graph, eps), _labels(graph, assignment), limit=0).total


@dataclass(frozen=True)
class CutEdge:
    """One cut edge with positive cost: node ``pair`` direction ``j`` → node ``pair + 1`` direction ``i``."""

    pair: int
    i: int
    j: int
    E: float
    cost: float


def cut_edges(graph: InteractionGraph, assignment: Int[Tensor, " v"] | Sequence[int], eps: float,
              limit: int | None = None) -> list[CutEdge]:
    """Every cut edge with positive cost, most expensive first (ties: pair, i, j); the first ``limit`` if given."""
    return _cut(graph, _all_costs(graph, eps), _labels(graph, assignment), limit).edges


@dataclass
class Bisection:
    """One split of the recursion: how many vertices, the two side sizes, its cost and how it was found."""

    n_vertices: int
    sizes: tuple[int, int]
    allowed: tuple[int, int]  # the first side's size bounds
    cost: float
    method: str  # "components" | "min_cut" | "metis" | "kernighan_lin"
    certified: bool  # provably the cheapest bisection of this vertex set within the bound
    metis: MetisSplit | None = None  # METIS's options, the weights' resolution, the trimming (method "metis")

    def to_dict(self) -> dict[str, Any]:
        return {"n_vertices": self.n_vertices, "sizes": list(self.sizes), "allowed": list(self.allowed),
                "cost": self.cost, "method": self.method, "certified": self.certified,
                "metis": None if self.metis is None else self.metis.to_dict()}


@dataclass
class ModuleResult:
    """Modules found in one graph at one ε: labels per vertex, sizes, cost, and the search's record."""

    basis: str
    nodes: list[str]
    sizes: list[int]  # directions per node
    scale: CutScale
    n_modules: int
    balance: float
    seed: int
    restarts: int
    assignment: list[int]  # module label per vertex (graph vertex order); labels by first appearance
    module_sizes: list[int]
    cut_cost: float  # float64, from the labels (cut_cost)
    cut: list[CutEdge]  # the most expensive positive-cost edges cut, most expensive first (at most _CUT_EDGES_KEPT)
    n_cut_edges: int  # all positive-cost edges cut
    n_positive_edges: int  # edges with E > ε (the ones that cost anything to cut)
    search: str  # the heuristic behind uncertified splits: "metis" | "kernighan_lin" (pymetis missing)
    search_meaning: str
    bisections: list[Bisection] = field(default_factory=list)

    @property
    def eps(self) -> float:
        return self.scale.eps

    @property
    def eps_rtol(self) -> float | None:
        return self.scale.eps_rtol

    @property
    def optimal(self) -> bool:
        """Provably a cheapest partition: zero cost, or a certified single bisection."""
        return self.cut_cost == 0 or (len(self.bisections) == 1 and self.bisections[0].certified)

    def by_node(self) -> list[list[int]]:
        """Module label of each direction, per node."""
        out, start = [], 0
        for k in self.sizes:
            out.append(self.assignment[start:start + k])
            start += k
        return out

    def to_dict(self, assignment: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "basis": self.basis, **self.scale.to_dict(), "n_modules": self.n_modules, "balance": self.balance,
            "seed": self.seed, "restarts": self.restarts, "module_sizes": self.module_sizes,
            "cut_cost": self.cut_cost, "n_cut_edges": self.n_cut_edges, "n_positive_edges": self.n_positive_edges,
            "optimal": self.optimal, "search": self.search, "search_meaning": self.search_meaning,
            "cut_edges": [{"source": self.nodes[c.pair], "target": self.nodes[c.pair + 1], "pair": c.pair,
                           "i": c.i, "j": c.j, "E": c.E, "cost": c.cost} for c in self.cut[:_CUT_EDGES_IN_DICT]],
            "bisections": [b.to_dict() for b in self.bisections],
        }
        if assignment:
            out["modules"] = dict(zip(self.nodes, self.by_node()))
        return out


def _size_bounds(m: int, t: float, balance: float, need_a: int, need_b: int) -> tuple[int, int]:
    """Allowed sizes of the first side: within ``t·m ± β·m/2``, nearest-to-target sizes always allowed,
    and each side large enough for the modules it must still hold."""
    lo = math.ceil((t - balance / 2) * m - 1e-9)
    hi = math.floor((t + balance / 2) * m + 1e-9)
    lo, hi = min(lo, math.floor(t * m)), max(hi, math.ceil(t * m))
    return max(lo, need_a), min(hi, m - need_b)


def _pack_components(components: np.ndarray, free: np.ndarray, lo: int, hi: int, target: float) -> np.ndarray | None:
    """A first side (mask) of size in ``[lo, hi]`` made of whole components plus free vertices, or None.

    Subset-sum over the sizes of the components that have edges (free vertices fill up to the
    size nearest ``target``); among the feasible packings the one nearest the target is taken.
    """
    m, f = len(components), int(free.sum())
    roots, sizes = np.unique(components[~free], return_counts=True)  # roots: each component's first vertex
    order = np.lexsort((roots, -sizes))  # largest first, then by first vertex
    roots, sizes = roots[order], sizes[order]
    reach = np.zeros(m + 1, dtype=bool)
    reach[0] = True
    first = np.full(m + 1, -1)  # the component whose addition first reached each sum
    for index, s in enumerate(sizes.tolist()):
        new = np.zeros_like(reach)
        new[s:] = reach[:m + 1 - s] & ~reach[s:]
        first[new] = index
        reach |= new
    best: tuple[float, int, int] | None = None
    for sigma in np.flatnonzero(reach).tolist():
        a, b = max(sigma, lo), min(sigma + f, hi)  # sizes reachable with free vertices, within the bound
        if a > b:
            continue
        size = min(max(round(target), a), b)  # free vertices move the side towards the target
        if best is None or abs(size - target) < best[0]:
            best = (abs(size - target), sigma, size)
    if best is None:
        return None
    _, sigma, size = best
    chosen = []
    while sigma > 0:  # walk back through the components that built this sum (each used once)
        chosen.append(roots[first[sigma]])
        sigma -= int(sizes[first[sigma]])
    side = np.isin(components, chosen) & ~free
    side[np.flatnonzero(free)[:size - int(side.sum())]] = True
    return side


def _min_cut(H: CostGraph, components: np.ndarray, free: np.ndarray, lo: int, hi: int,
             target: float) -> np.ndarray | None:
    """Stoer–Wagner's global minimum cut of the connected positive-cost part, balanced with free vertices."""
    core = np.flatnonzero(~free)
    n_core = len(core)
    if n_core < 2 or n_core * H.n_edges > _MIN_CUT_MAX_WORK or len(np.unique(components[core])) > 1:
        return None
    _, (part, _) = nx.stoer_wagner(H.subgraph(core).to_networkx())
    in_part = np.zeros(n_core, dtype=bool)
    in_part[list(part)] = True
    spare = np.flatnonzero(free)
    for side in (core[in_part], core[~in_part]):  # either half may be the first side
        if len(side) <= hi and len(side) + len(spare) >= lo:
            size = min(max(round(target), lo, len(side)), hi, len(side) + len(spare))
            mask = np.zeros(H.n_vertices, dtype=bool)
            mask[side] = True
            mask[spare[:size - len(side)]] = True
            return mask
    return None


def _kernighan_lin(H: CostGraph, sizes: list[int], restarts: int, rng: np.random.Generator) -> np.ndarray:
    """The cheapest of ``restarts`` KL runs from random starts, cycling through the given first-side sizes."""
    G = H.to_networkx()
    nodes = list(range(H.n_vertices))
    best: tuple[float, set[int]] | None = None
    for r in range(max(restarts, 1)):
        size = sizes[r % len(sizes)]
        order = rng.permutation(len(nodes))
        start = {nodes[i] for i in order[:size]}
        p1, p2 = nx.community.kernighan_lin_bisection(G, partition=(start, set(nodes) - start), weight="weight")
        side = p2 if len(p2) == size else p1  # KL keeps the start's sizes; find which returned half is ours
        cost = float(nx.cut_size(G, side, weight="weight"))
        if best is None or cost < best[0]:
            best = (cost, side)
    assert best is not None
    mask = np.zeros(H.n_vertices, dtype=bool)
    mask[list(best[1])] = True
    return mask


@dataclass(frozen=True)
class _Search:
    """What runs when no exact step applies: METIS, or Kernighan–Lin when pymetis cannot be imported."""

    name: str  # "metis" | "kernighan_lin"
    meaning: str
    metis: Any  # the pymetis module, or None


def _search() -> _Search:
    """The one place the heuristic is chosen (imported per call, so a missing pymetis is seen at once)."""
    exact = "connected components (exact), then Stoer–Wagner on small connected graphs (exact)"
    try:
        import pymetis
    except ImportError as error:
        return _Search("kernighan_lin", f"{exact}, then networkx Kernighan–Lin from seeded random starts: FALLBACK, "
                       f"pymetis could not be imported ({error}); pure Python, slow beyond ~1e5 edges", None)
    return _Search("metis", f"{exact}, then METIS multilevel bisection (pymetis {pymetis.version}) on integer-"
                   "scaled costs, best of `restarts` partitionings; costs recomputed in float64", pymetis)


def _bisect(H: CostGraph, t: float, balance: float, need: tuple[int, int], restarts: int, seed: int,
            rng: np.random.Generator, search: _Search) -> tuple[np.ndarray, Bisection]:
    m = H.n_vertices
    lo, hi = _size_bounds(m, t, balance, *need)
    if lo > hi:
        raise ValueError(f"cannot split {m} vertices into sides holding {need[0]} and {need[1]} modules")
    components, free = H.components(), H.degree() == 0
    side = _pack_components(components, free, lo, hi, t * m)
    if side is not None:
        n = int(side.sum())
        return side, Bisection(m, (n, m - n), (lo, hi), 0.0, "components", True)
    side = _min_cut(H, components, free, lo, hi, t * m)
    method, certified, record = "min_cut", True, None  # a balanced global minimum cut: no heuristic can beat it
    # the heuristics start at the target and at the two extreme allowed sizes: the cheapest cut may be either
    sizes = sorted({min(max(round(t * m), lo), hi), lo, hi}, key=lambda s: abs(s - t * m))
    if side is None and search.metis is not None:
        targets = [t, *(s / m for s in sizes[1:])]
        side, record = metis_bisection(H, targets, lo, hi, seed=seed, runs=restarts, metis=search.metis)
        method, certified = "metis", False
    elif side is None:
        side = _kernighan_lin(H, sizes, restarts, rng)
        method, certified = "kernighan_lin", False
    n = int(side.sum())
    return side, Bisection(m, (n, m - n), (lo, hi), H.cut(side), method, certified, record)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel modules 0, 1, … in order of their first vertex."""
    if not len(labels):
        return labels
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def find_modules(graph: InteractionGraph, eps_rtol: float = DEFAULT_EPS_RTOL, *, eps: float | None = None,
                 n_modules: int = 2, balance: float = DEFAULT_BALANCE, seed: int = 0,
                 restarts: int = DEFAULT_RESTARTS) -> ModuleResult:
    """Partition all directions of all nodes into ``n_modules`` modules of least cut cost (module docstring).

    ``balance`` is β: each bisection's sides hold ``(t ± β/2)`` of its vertices (``t = ½`` for two
    modules); β = 0 asks for exactly balanced sides. ``seed`` fixes METIS's (or KL's) randomness and
    ``restarts`` is how many partitionings each uncertified split tries.
    """
    if not 0 <= balance <= 1:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    if restarts < 1:
        raise ValueError(f"restarts must be ≥ 1, got {restarts}")
    V = graph.n_vertices
    if not 1 <= n_modules <= max(V, 1):
        raise ValueError(f"n_modules must be between 1 and the {V} vertices, got {n_modules}")
    search = _search()
    if search.metis is None and n_modules > 1:
        warnings.warn(f"module search: {search.meaning}", RuntimeWarning, stacklevel=2)
    scale = cut_scale(graph, eps_rtol, eps)
    costs = _all_costs(graph, scale.eps)
    H = CostGraph.from_pairs(costs)
    rng = np.random.default_rng(seed)
    labels = np.zeros(V, dtype=np.int64)
    bisections: list[Bisection] = []
    next_label = 1

    def split(sub: CostGraph, vertices: np.ndarray, count: int) -> None:
        nonlocal next_label
        a = (count + 1) // 2
        side, record = _bisect(sub, a / count, balance, (a, count - a), restarts, seed, rng, search)
        bisections.append(record)
        labels[vertices[~side]] = next_label
        next_label += 1
        for mask, share in ((side, a), (~side, count - a)):
            if share > 1:
                split(sub.subgraph(np.flatnonzero(mask)), vertices[mask], share)

    if n_modules > 1 and V:
        split(H, np.arange(V), n_modules)
    assignment = _canonical(labels)
    counts = np.bincount(assignment, minlength=n_modules).tolist() if V else []
    cut = _cut(graph, costs, assignment, _CUT_EDGES_KEPT)
    return ModuleResult(
        basis=graph.basis, nodes=list(graph.nodes), sizes=graph.sizes, scale=scale, n_modules=n_modules,
        balance=float(balance), seed=seed, restarts=restarts, assignment=assignment.tolist(), module_sizes=counts,
        cut_cost=cut.total, cut=cut.edges, n_cut_edges=cut.count,
        n_positive_edges=H.n_edges, search=search.name, search_meaning=search.meaning, bisections=bisections)


@dataclass
class RandomCuts:
    """Cut costs of random partitions with given module sizes, and where a found cost sits among them."""

    costs: Float[Tensor, " n"]
    module_sizes: list[int]
    eps: float
    found: float | None = None

    @property
    def quantile(self) -> float | None:
        """Fraction of the random partitions costing at most ``found`` (small: found beats random)."""
        if self.found is None or self.costs.numel() == 0:
            return None
        return float((self.costs <= self.found).to(torch.float64).mean())

    def to_dict(self) -> dict[str, Any]:
        c = self.costs
        n = c.numel()
        return {"n": n, "module_sizes": self.module_sizes, "eps": self.eps,
                "mean": float(c.mean()) if n else None, "std": float(c.std(correction=0)) if n else None,
                "min": float(c.min()) if n else None, "max": float(c.max()) if n else None,
                "found": self.found, "quantile_of_found": self.quantile}


def random_partition_costs(graph: InteractionGraph, eps: float, sizes: Sequence[int], n: int = 200, seed: int = 0,
                           found: float | None = None) -> RandomCuts:
    """Cut costs of ``n`` uniformly random partitions into modules of the given ``sizes`` (absolute ``eps``).

    A partition is a random permutation of the vertices, the first ``sizes[0]`` in module 0 and so
    on. Costs are computed in one batch: cut = Σ costs − Σ_modules (costs inside a module).
    """
    sizes = [int(s) for s in sizes]
    if sum(sizes) != graph.n_vertices:
        raise ValueError(f"module sizes sum to {sum(sizes)}, the graph has {graph.n_vertices} vertices")
    gen = torch.Generator().manual_seed(seed)
    base = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    labels = torch.stack([base[torch.randperm(graph.n_vertices, generator=gen)] for _ in range(n)]) if n else \
        torch.zeros(0, graph.n_vertices, dtype=torch.long)
    onehot = torch.nn.functional.one_hot(labels, len(sizes)).to(torch.float64)  # [n, V, M]
    off = graph.offsets()
    costs = torch.zeros(n, dtype=torch.float64)
    for l, E in enumerate(graph.edges):
        C = edge_costs(E, eps)
        p_in = onehot[:, off[l]:off[l] + E.shape[1]]
        p_out = onehot[:, off[l + 1]:off[l + 1] + E.shape[0]]
        inside = torch.einsum("nim,ij,njm->n", p_out, C, p_in)
        costs += (C.sum() - inside).clamp_min(0.0)  # rounding must not make a cost negative
    return RandomCuts(costs, sizes, float(eps), found)


def module_sweep(graph: InteractionGraph, eps_rtol_grid: Sequence[float], *, n_modules: int = 2,
                 balance: float = DEFAULT_BALANCE, seed: int = 0, restarts: int = DEFAULT_RESTARTS,
                 n_random: int = 200, assignment: bool = False) -> list[dict[str, Any]]:
    """``find_modules`` at each ``eps_rtol`` of the grid, each row with random partitions of the same
    sizes for comparison (``random``: mean, std, min, max, quantile of the found cost). JSON-ready."""
    rows = []
    for rtol in eps_rtol_grid:
        result = find_modules(graph, rtol, n_modules=n_modules, balance=balance, seed=seed, restarts=restarts)
        random = random_partition_costs(graph, result.eps, result.module_sizes, n=n_random, seed=seed,
                                        found=result.cut_cost)
        rows.append({**result.to_dict(assignment=assignment), "random": random.to_dict()})
    return rows
