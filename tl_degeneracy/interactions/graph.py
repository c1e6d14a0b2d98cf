"""``InteractionGraph``: the edges between consecutive nodes of a network, in one basis.

A *node* is a hook point with a basis (interaction basis, PCA or the model's own
coordinates); its *directions* are the vertices. ``edges[l]`` holds
``E_ij`` (docs/theory.md §6) from direction ``j`` of node ``l`` to direction ``i`` of node
``l + 1``: shape ``[k_{l+1}, k_l]``, float64, in units of the behavioural loss when the
basis carries the interaction basis's ``Λ^{1/2}`` scaling.

**Direction budgets and the rest vertex.** A ``DirectionBudget`` keeps the most important
directions of every node (``Basis.importance``: Λ for the interaction basis, variance for PCA and
the model's coordinates) and lumps the others, ``R``, into one *rest* vertex ``ρ``, the last vertex
of its node. The budgeted graph is the full graph with each rest set contracted to one vertex,
edge weights summed (``contract``):

    E[i, j]  = E_ij                        kept i, kept j (the full graph's kept block, unchanged)
    E[i, ρ]  = Σ_{j∈R} E_ij                the rest of node l  → kept direction i of node l+1
    E[ρ', j] = Σ_{i∈R'} E_ij               kept direction j    → the rest of node l+1
    E[ρ', ρ] = Σ_{i∈R', j∈R} E_ij          rest → rest

so every pair's ΣE is the full graph's ΣE: no edge mass is dropped, and nothing is added.
(The edge of the rest *component* as one variable, ``E_(x,t)[(Σ_{j∈R} a_tij)²]``, would not do:
cancellations between rest directions can make it arbitrarily smaller than their summed edges.)
How ``E[·, ρ]`` is computed — exactly or by unbiased Rademacher probes — is ``edges.py``'s.
``directions[l]`` names the basis direction of each kept vertex; ``rest[l]`` counts the directions
in node ``l``'s rest vertex (0: the node has none).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..checkpoint import atomic_save_safetensors, read_safetensors_metadata
from ..validation import fraction, one_of, optional_positive_int, positive_int

META_KEY = "tl_degeneracy_interactions"
# a cumulative importance "reaches" q·Σ within this relative rounding slack (as sparsity.edge_fraction)
_REACH_RTOL = 1e-12


def pair_name(source: str, target: str) -> str:
    """How one layer pair's edges are keyed: ``source->target``."""
    return f"{source}->{target}"


class RestMode(str, Enum):
    """How the edges into the rest vertex, ``E[i, ρ] = Σ_{j∈R} E_ij``, are obtained by forward mode.

    - ``PROBES``: ``S`` Rademacher combinations of the rest directions, one pass each: unbiased, with
      a standard error reported (``edges.py``). The default: ``S`` passes instead of ``|R|``.
    - ``EXACT``: one pass per rest direction, summed: exact, and as costly as the full graph.

    Edges out of the rest vertex ``E[ρ', ·]`` are exact either way, and the backward methods get
    every input direction from each pass, so their rest edges are exact too.
    """

    PROBES = "probes"
    EXACT = "exact"


@dataclass(frozen=True)
class DirectionBudget:
    """Which directions of each node keep their own vertex; the rest share one (module docstring).

    ``top_k``: at most this many per node. ``mass``: the fewest leading directions whose importance
    reaches ``mass`` of the node's total (e.g. 0.99: "the directions carrying 99% of ΣΛ"). With
    both, the smaller set; with neither, every direction (no rest vertex: today's full graph).
    ``rest``/``rest_probes``: how the rest vertex's incoming edges are computed (``RestMode``).
    """

    top_k: int | None = None
    mass: float | None = None
    rest: RestMode = RestMode.PROBES
    rest_probes: int = 8

    def __post_init__(self) -> None:
        optional_positive_int(self.top_k, "top_k (directions kept per node)")
        if self.mass is not None and fraction(self.mass, "mass (share of a node's total importance kept)") == 0:
            raise ValueError("mass (share of a node's total importance kept) must be > 0, got 0; leave it unset to "
                             "keep every direction")
        object.__setattr__(self, "rest", one_of(self.rest, RestMode, "rest"))
        positive_int(self.rest_probes, "rest_probes")

    @property
    def keeps_all(self) -> bool:
        return self.top_k is None and self.mass is None

    def select(self, importance: Tensor) -> list[int]:
        """The kept directions' indices (ascending: the basis's own order) for one node's ``importance``.

        Directions are ranked by importance, larger first, ties in the basis's order (a stable sort).
        """
        w = importance.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        n = w.numel()
        if self.top_k is not None:
            n = min(n, self.top_k)
        order = torch.argsort(w, descending=True, stable=True)
        if self.mass is not None:
            cum = torch.cumsum(w[order].clamp(min=0), 0)
            total = float(cum[-1]) if cum.numel() else 0.0
            needed = int((cum < self.mass * total * (1 - _REACH_RTOL)).sum()) + 1 if total > 0 else 0
            n = min(n, needed)
        return sorted(order[:n].tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "mass": self.mass, "rest": self.rest.value, "rest_probes": self.rest_probes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DirectionBudget:
        return cls(data.get("top_k"), data.get("mass"), RestMode(data.get("rest", "probes")),
                   int(data.get("rest_probes", 8)))


def rest_of(kept: Sequence[int], k: int) -> list[int]:
    """The directions of a ``k``-direction node that are not in ``kept`` (ascending)."""
    keep = set(kept)
    return [j for j in range(k) if j not in keep]


def contract(E: Float[Tensor, "k_out k_in"], kept_out: Sequence[int],
             kept_in: Sequence[int]) -> Float[Tensor, "_m _n"]:
    """A full edge matrix with each side's directions outside ``kept_*`` summed into one rest row/column.

    Rows: ``kept_out`` in order, then the rest row if any direction is left; columns likewise. The
    result's sum equals ``E``'s (module docstring).
    """
    rest_out, rest_in = rest_of(kept_out, E.shape[0]), rest_of(kept_in, E.shape[1])
    rows = [E[list(kept_out)]] + ([E[rest_out].sum(0, keepdim=True)] if rest_out else [])
    by_rows = torch.cat(rows, 0)
    cols = [by_rows[:, list(kept_in)]] + ([by_rows[:, rest_in].sum(1, keepdim=True)] if rest_in else [])
    return torch.cat(cols, 1)


@dataclass
class InteractionGraph:
    """Nodes (hook names, forward order), their sizes, and one edge matrix per consecutive pair.

    ``directions[l]``: the basis direction behind each kept vertex of node ``l`` (None: vertex ``j``
    is direction ``j``, no budget); ``rest[l]``: directions lumped into node ``l``'s rest vertex, the
    node's last vertex (0 or an empty list: no rest vertex anywhere).
    """

    basis: str  # "interaction" | "pca" | "standard" | "random" (a name, for tables and plots)
    nodes: list[str]
    edges: list[Float[Tensor, "_k_out _k_in"]]  # edges[l][i, j]: node l vertex j → node l+1 vertex i
    n_datapoints: list[int] = field(default_factory=list)  # output datapoints behind each edges[l]
    meta: dict[str, Any] = field(default_factory=dict)
    directions: list[list[int]] | None = None
    rest: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.nodes) - 1:
            raise ValueError(f"{len(self.nodes)} nodes need {len(self.nodes) - 1} edge matrices, got {len(self.edges)}")
        for l, E in enumerate(self.edges[1:], start=1):
            if E.shape[1] != self.edges[l - 1].shape[0]:
                raise ValueError(f"edges[{l}] has {E.shape[1]} input directions but edges[{l - 1}] has "
                                 f"{self.edges[l - 1].shape[0]} output directions: node {self.nodes[l]!r} disagrees")
        if not self.rest:
            self.rest = [0] * len(self.nodes)
        if len(self.rest) != len(self.nodes) or any(r < 0 for r in self.rest):
            raise ValueError(f"rest needs one count >= 0 per node ({len(self.nodes)}), got {self.rest}")
        if self.directions is not None:
            if len(self.directions) != len(self.nodes):
                raise ValueError(f"directions needs one list per node ({len(self.nodes)}), got {len(self.directions)}")
            for l, (dirs, k) in enumerate(zip(self.directions, self.sizes)):
                if len(dirs) + (self.rest[l] > 0) != k:
                    raise ValueError(f"node {self.nodes[l]!r} has {k} vertices, but {len(dirs)} kept directions"
                                     f"{' and a rest vertex' if self.rest[l] else ''}")
        elif any(self.rest):
            raise ValueError("a graph with rest vertices must name its kept directions (directions=)")

    @property
    def sizes(self) -> list[int]:
        """Vertices per node (kept directions, plus one when the node has a rest vertex)."""
        if not self.edges:
            return []
        return [self.edges[0].shape[1], *(E.shape[0] for E in self.edges)]

    @property
    def n_vertices(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> list[int]:
        """Index of each node's first vertex among all vertices (vertex = offset[l] + index in node)."""
        out, total = [], 0
        for k in self.sizes:
            out.append(total)
            total += k
        return out

    def vertex_labels(self) -> list[tuple[int, int]]:
        """``(node index, vertex index in the node)`` of every vertex, in vertex order."""
        return [(l, j) for l, k in enumerate(self.sizes) for j in range(k)]

    def has_rest(self, l: int) -> bool:
        return self.rest[l] > 0

    def rest_index(self, l: int) -> int | None:
        """Node ``l``'s rest vertex as an index within the node (its last), or None."""
        return self.sizes[l] - 1 if self.has_rest(l) else None

    def rest_vertices(self) -> list[int]:
        """Global indices of every rest vertex (e.g. to leave them out of a module search)."""
        off = self.offsets()
        return [off[l] + self.sizes[l] - 1 for l in range(len(self.sizes)) if self.has_rest(l)]

    def direction(self, l: int, j: int) -> int | None:
        """The basis direction behind vertex ``j`` of node ``l`` (None for the rest vertex)."""
        if self.rest_index(l) == j:
            return None
        return j if self.directions is None else self.directions[l][j]

    def kept_block(self, l: int) -> Float[Tensor, "_m _n"]:
        """``edges[l]`` among kept directions only (the rest row and column left out)."""
        E = self.edges[l]
        rows = E.shape[0] - int(self.has_rest(l + 1))
        cols = E.shape[1] - int(self.has_rest(l))
        return E[:rows, :cols]

    def rest_mass(self, l: int) -> float:
        """The part of ``edges[l]``'s sum on edges that touch a rest vertex."""
        return float(self.edges[l].sum() - self.kept_block(l).sum())

    def adjacency(self) -> Float[Tensor, "v v"]:
        """The symmetric ``[V, V]`` matrix of edge strengths over all vertices (dense; small graphs)."""
        V, off = self.n_vertices, self.offsets()
        A = torch.zeros(V, V, dtype=torch.float64)
        for l, E in enumerate(self.edges):
            rows = slice(off[l + 1], off[l + 1] + E.shape[0])
            cols = slice(off[l], off[l] + E.shape[1])
            A[rows, cols] = E.to(torch.float64)
            A[cols, rows] = E.to(torch.float64).T
        return A

    def total(self) -> float:
        return float(sum(E.sum() for E in self.edges))


def save_graphs(graphs: dict[str, InteractionGraph], path: Path, meta: dict[str, Any]) -> None:
    """Every basis's edge matrices in one safetensors file, ``meta`` (JSON-able) in its header."""
    tensors = {f"{name}/{pair_name(a, b)}": E.contiguous() for name, g in graphs.items()
               for a, b, E in zip(g.nodes[:-1], g.nodes[1:], g.edges)}
    info = {**meta, "bases": {name: {"nodes": g.nodes, "n_datapoints": g.n_datapoints, "directions": g.directions,
                                     "rest": g.rest, "meta": {k: v for k, v in g.meta.items() if k != "run"}}
                              for name, g in graphs.items()}}
    atomic_save_safetensors(tensors, {META_KEY: json.dumps(info)}, path)


def load_graphs(path: Path) -> dict[str, InteractionGraph]:
    """The graphs ``save_graphs`` wrote (files from before budgets load with every direction kept)."""
    from safetensors.torch import load_file

    info = read_safetensors_metadata(path, key=META_KEY)
    tensors = load_file(str(path))
    graphs = {}
    for name, entry in info["bases"].items():
        nodes = entry["nodes"]
        edges = [tensors[f"{name}/{pair_name(a, b)}"] for a, b in zip(nodes[:-1], nodes[1:])]
        graphs[name] = InteractionGraph(name, nodes, edges, entry["n_datapoints"],
                                        {"run": info.get("run"), **entry.get("meta", {})},
                                        entry.get("directions"), entry.get("rest") or [])
    return graphs
