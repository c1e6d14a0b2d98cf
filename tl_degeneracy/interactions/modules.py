"""Modules of an interaction graph: the paper's cut cost (§5.2.3, eq. 35) and a balanced search for it.

**Cost** (docs/theory.md §6). Cutting an edge of weight ``w = E^{1/2}`` costs
``max(0, log(w / ε^{1/2})) = max(0, ½ log(E_ij / ε))``: edges at or below the loss scale ε are
free to cut, and weak links add logarithmically. A partition's cost is the sum over the edges
between different modules.

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
Each bisection takes the first of these that applies:

1. **Connected components** (exact): if the components of the positive-cost graph can be packed
   into two sides within the bound (a subset-sum over component sizes, free vertices filling
   up), the cut costs 0 — the optimum. Kernighan–Lin alone can miss such a cut: it only swaps
   pairs of vertices, at a fixed size, from a random start.
2. **Global minimum cut** (exact when it applies): networkx's Stoer–Wagner on the positive-cost
   graph when it is connected and small (``_MIN_CUT_MAX_WORK``); if that cut can be balanced with the
   free vertices it is the cheapest balanced bisection, since (1) having failed, every balanced
   bisection cuts that graph somewhere. This certifies a single weak link between two modules.
3. **Kernighan–Lin** (heuristic): ``networkx.algorithms.community.kernighan_lin_bisection`` from
   ``restarts`` seeded random starts at the target size and at the two extreme allowed sizes (KL
   swaps pairs, so each run keeps its start's sizes exactly); the cheapest is kept. Not certified.

**Why networkx KL and not Leiden.** Leiden (leidenalg/igraph) optimises modularity or the
Constant Potts Model: it chooses the number and sizes of communities itself and scores them
against a null model. The quantity here is a *cut cost* (eq. 35) at a *fixed* number of modules
under a *balance constraint*, which is exactly what a balanced min-cut bisection minimises;
Leiden has no way to state either constraint. networkx is pure Python, maintained, and already a
dependency; its KL and Stoer–Wagner work on the weighted cost graph directly.

**Scale.** networkx is pure Python: fine for thousands of vertices with sparse positive-cost graphs
(raise ε to prune), slow for a dense graph over GPT-2's 13 × 768 residual directions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .graph import InteractionGraph

DEFAULT_EPS_RTOL = 1e-3
DEFAULT_BALANCE = 0.2
DEFAULT_RESTARTS = 8
# Stoer–Wagner is O(V·E + V² log V) in pure Python: only run it below this V·E
_MIN_CUT_MAX_WORK = 5_000_000
_CUT_EDGES_IN_DICT = 20


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


def edge_costs(E: Float[Tensor, "k_out k_in"], eps: float) -> Float[Tensor, "k_out k_in"]:
    """``max(0, ½ log(E / ε))`` per edge, float64; exactly 0 where ``E ≤ ε`` (also when ``ε = 0 = E``)."""
    E = E.detach().to(device="cpu", dtype=torch.float64)
    positive = E > eps
    # the where keeps 0/0 and log(0) out of the result; the division only matters where E > eps
    return torch.where(positive, 0.5 * torch.log(torch.where(positive, E, 1.0) / max(eps, 1e-300)),
                       torch.zeros((), dtype=torch.float64))


def _labels(graph: InteractionGraph, assignment: Tensor | Sequence[int]) -> Tensor:
    a = torch.as_tensor(assignment, dtype=torch.long).reshape(-1).cpu()
    if a.numel() != graph.n_vertices:
        raise ValueError(f"assignment has {a.numel()} labels, the graph has {graph.n_vertices} vertices")
    return a


def cut_cost(graph: InteractionGraph, assignment: Int[Tensor, " v"] | Sequence[int], eps: float) -> float:
    """Total cost of the edges whose endpoints carry different module labels (vertex order of the graph)."""
    a, off = _labels(graph, assignment), graph.offsets()
    total = 0.0
    for l, E in enumerate(graph.edges):
        a_in = a[off[l]:off[l] + E.shape[1]]
        a_out = a[off[l + 1]:off[l + 1] + E.shape[0]]
        total += float(edge_costs(E, eps)[a_out[:, None] != a_in[None, :]].sum())
    return total


@dataclass(frozen=True)
class CutEdge:
    """One cut edge with positive cost: node ``pair`` direction ``j`` → node ``pair + 1`` direction ``i``."""

    pair: int
    i: int
    j: int
    E: float
    cost: float


def cut_edges(graph: InteractionGraph, assignment: Int[Tensor, " v"] | Sequence[int], eps: float) -> list[CutEdge]:
    """Every cut edge with positive cost, most expensive first."""
    a, off = _labels(graph, assignment), graph.offsets()
    out = []
    for l, E in enumerate(graph.edges):
        a_in = a[off[l]:off[l] + E.shape[1]]
        a_out = a[off[l + 1]:off[l + 1] + E.shape[0]]
        costs = edge_costs(E, eps)
        for i, j in ((a_out[:, None] != a_in[None, :]) & (costs > 0)).nonzero().tolist():
            out.append(CutEdge(l, i, j, float(E[i, j]), float(costs[i, j])))
    return sorted(out, key=lambda c: (-c.cost, c.pair, c.i, c.j))


def cost_graph(graph: InteractionGraph, eps: float) -> nx.Graph:
    """networkx graph on all vertices (``0 … V−1``) with the positive-cost edges, ``weight`` = cost."""
    G = nx.Graph()
    G.add_nodes_from(range(graph.n_vertices))
    off = graph.offsets()
    for l, E in enumerate(graph.edges):
        costs = edge_costs(E, eps)
        idx = costs.nonzero().tolist()
        G.add_weighted_edges_from((off[l] + j, off[l + 1] + i, float(costs[i, j])) for i, j in idx)
    return G


@dataclass
class Bisection:
    """One split of the recursion: how many vertices, the two side sizes, its cost and how it was found."""

    n_vertices: int
    sizes: tuple[int, int]
    allowed: tuple[int, int]  # the first side's size bounds
    cost: float
    method: str  # "components" | "min_cut" | "kernighan_lin" | "trivial"
    certified: bool  # provably the cheapest bisection of this vertex set within the bound


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
    cut_cost: float
    cut: list[CutEdge]  # positive-cost edges cut, most expensive first
    n_positive_edges: int  # edges with E > ε (the ones that cost anything to cut)
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
            "cut_cost": self.cut_cost, "n_cut_edges": len(self.cut), "n_positive_edges": self.n_positive_edges,
            "optimal": self.optimal,
            "cut_edges": [{"source": self.nodes[c.pair], "target": self.nodes[c.pair + 1], "pair": c.pair,
                           "i": c.i, "j": c.j, "E": c.E, "cost": c.cost} for c in self.cut[:_CUT_EDGES_IN_DICT]],
            "bisections": [{"n_vertices": b.n_vertices, "sizes": list(b.sizes), "allowed": list(b.allowed),
                            "cost": b.cost, "method": b.method, "certified": b.certified} for b in self.bisections],
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


def _pack_components(H: nx.Graph, lo: int, hi: int, target: float) -> set[int] | None:
    """A first side of size in ``[lo, hi]`` made of whole components plus free vertices, or None.

    Subset-sum over the sizes of the components that have edges (free vertices fill up to the
    size nearest ``target``); among the feasible packings the one nearest the target is taken.
    """
    free = sorted(v for v in H if H.degree(v) == 0)
    comps = sorted((sorted(c) for c in nx.connected_components(H) if len(c) > 1), key=lambda c: (-len(c), c[0]))
    m, f = H.number_of_nodes(), len(free)
    reach = np.zeros(m + 1, dtype=bool)
    reach[0] = True
    first = np.full(m + 1, -1)  # the component whose addition first reached each sum
    for index, comp in enumerate(comps):
        s = len(comp)
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
    side: set[int] = set()
    while sigma > 0:  # walk back through the components that built this sum (each used once)
        comp = comps[int(first[sigma])]
        side.update(comp)
        sigma -= len(comp)
    side.update(free[:size - len(side)])
    return side


def _min_cut(H: nx.Graph, lo: int, hi: int, target: float) -> set[int] | None:
    """Stoer–Wagner's global minimum cut of the connected positive-cost part, balanced with free vertices."""
    core = H.subgraph([v for v in H if H.degree(v) > 0])
    n_core = core.number_of_nodes()
    if n_core < 2 or not nx.is_connected(core) or n_core * core.number_of_edges() > _MIN_CUT_MAX_WORK:
        return None
    _, (part, _) = nx.stoer_wagner(core)
    free = sorted(v for v in H if H.degree(v) == 0)
    for side in (set(part), set(core) - set(part)):  # either half may be the first side
        if len(side) <= hi and len(side) + len(free) >= lo:
            size = min(max(round(target), lo, len(side)), hi, len(side) + len(free))
            return side | set(free[:size - len(side)])
    return None


def _kernighan_lin(H: nx.Graph, sizes: list[int], restarts: int, rng: np.random.Generator) -> set[int]:
    """The cheapest of ``restarts`` KL runs from random starts, cycling through the given first-side sizes."""
    nodes = sorted(H)
    best: tuple[float, set[int]] | None = None
    for r in range(max(restarts, 1)):
        size = sizes[r % len(sizes)]
        order = rng.permutation(len(nodes))
        start = {nodes[i] for i in order[:size]}
        p1, p2 = nx.community.kernighan_lin_bisection(H, partition=(start, set(nodes) - start), weight="weight")
        side = p2 if len(p2) == size else p1  # KL keeps the start's sizes; find which returned half is ours
        cost = float(nx.cut_size(H, side, weight="weight"))
        if best is None or cost < best[0]:
            best = (cost, side)
    assert best is not None
    return best[1]


def _bisect(H: nx.Graph, t: float, balance: float, need: tuple[int, int], restarts: int,
            rng: np.random.Generator) -> tuple[set[int], Bisection]:
    m = H.number_of_nodes()
    lo, hi = _size_bounds(m, t, balance, *need)
    if lo > hi:
        raise ValueError(f"cannot split {m} vertices into sides holding {need[0]} and {need[1]} modules")
    side = _pack_components(H, lo, hi, t * m)
    if side is not None:
        return side, Bisection(m, (len(side), m - len(side)), (lo, hi), 0.0, "components", True)
    side = _min_cut(H, lo, hi, t * m)
    method, certified = "min_cut", True  # a balanced global minimum cut: no heuristic can beat it
    if side is None:
        sizes = sorted({min(max(round(t * m), lo), hi), lo, hi}, key=lambda s: abs(s - t * m))
        side = _kernighan_lin(H, sizes, restarts, rng)
        method, certified = "kernighan_lin", False
    cost = float(nx.cut_size(H, side, weight="weight"))
    return side, Bisection(m, (len(side), m - len(side)), (lo, hi), cost, method, certified)


def _canonical(labels: list[int]) -> list[int]:
    """Relabel modules 0, 1, … in order of their first vertex."""
    names: dict[int, int] = {}
    return [names.setdefault(x, len(names)) for x in labels]


def find_modules(graph: InteractionGraph, eps_rtol: float = DEFAULT_EPS_RTOL, *, eps: float | None = None,
                 n_modules: int = 2, balance: float = DEFAULT_BALANCE, seed: int = 0,
                 restarts: int = DEFAULT_RESTARTS) -> ModuleResult:
    """Partition all directions of all nodes into ``n_modules`` modules of least cut cost (module docstring).

    ``balance`` is β: each bisection's sides hold ``(t ± β/2)`` of its vertices (``t = ½`` for two
    modules); β = 0 asks for exactly balanced sides. ``seed`` fixes the KL starts.
    """
    if not 0 <= balance <= 1:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    V = graph.n_vertices
    if not 1 <= n_modules <= max(V, 1):
        raise ValueError(f"n_modules must be between 1 and the {V} vertices, got {n_modules}")
    scale = cut_scale(graph, eps_rtol, eps)
    G = cost_graph(graph, scale.eps)
    rng = np.random.default_rng(seed)
    labels = [0] * V
    bisections: list[Bisection] = []
    next_label = 1

    def split(vertices: list[int], label: int, count: int) -> None:
        nonlocal next_label
        if count <= 1 or not vertices:
            return
        a = (count + 1) // 2
        side, record = _bisect(G.subgraph(vertices), a / count, balance, (a, count - a), restarts, rng)
        bisections.append(record)
        other, next_label = next_label, next_label + 1
        rest = [v for v in vertices if v not in side]
        for v in rest:
            labels[v] = other
        split(sorted(side), label, a)
        split(rest, other, count - a)

    split(list(range(V)), 0, n_modules)
    assignment = _canonical(labels)
    counts = np.bincount(np.asarray(assignment, dtype=np.int64), minlength=n_modules).tolist() if V else []
    return ModuleResult(
        basis=graph.basis, nodes=list(graph.nodes), sizes=graph.sizes, scale=scale, n_modules=n_modules,
        balance=float(balance), seed=seed, restarts=restarts, assignment=assignment, module_sizes=counts,
        cut_cost=cut_cost(graph, assignment, scale.eps), cut=cut_edges(graph, assignment, scale.eps),
        n_positive_edges=G.number_of_edges(), bisections=bisections)


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
