"""``InteractionGraph``: the edges between consecutive nodes of a network, in one basis.

A *node* is a hook point with a basis (interaction basis, PCA or the model's own
coordinates); its *directions* are the vertices. ``edges[l]`` holds
``E_ij`` (docs/theory.md §6) from direction ``j`` of node ``l`` to direction ``i`` of node
``l + 1``: shape ``[k_{l+1}, k_l]``, float64, in units of the behavioural loss when the
basis carries the interaction basis's ``Λ^{1/2}`` scaling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..checkpoint import atomic_save_safetensors, read_safetensors_metadata

META_KEY = "tl_degeneracy_interactions"


def pair_name(source: str, target: str) -> str:
    """How one layer pair's edges are keyed: ``source->target``."""
    return f"{source}->{target}"


@dataclass
class InteractionGraph:
    """Nodes (hook names, forward order), their sizes, and one edge matrix per consecutive pair."""

    basis: str  # "interaction" | "pca" | "standard" | "random" (a name, for tables and plots)
    nodes: list[str]
    edges: list[Float[Tensor, "_k_out _k_in"]]  # edges[l][i, j]: node l direction j → node l+1 direction i
    n_datapoints: list[int] = field(default_factory=list)  # output datapoints behind each edges[l]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.nodes) - 1:
            raise ValueError(f"{len(self.nodes)} nodes need {len(self.nodes) - 1} edge matrices, got {len(self.edges)}")
        for l, E in enumerate(self.edges[1:], start=1):
            if E.shape[1] != self.edges[l - 1].shape[0]:
                raise ValueError(f"edges[{l}] has {E.shape[1]} input directions but edges[{l - 1}] has "
                                 f"{self.edges[l - 1].shape[0]} output directions: node {self.nodes[l]!r} disagrees")

    @property
    def sizes(self) -> list[int]:
        """Directions per node."""
        if not self.edges:
            return []
        return [self.edges[0].shape[1], *(E.shape[0] for E in self.edges)]

    @property
    def n_vertices(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> list[int]:
        """Index of each node's first direction among all vertices (vertex = offset[l] + direction)."""
        out, total = [], 0
        for k in self.sizes:
            out.append(total)
            total += k
        return out

    def vertex_labels(self) -> list[tuple[int, int]]:
        """``(node index, direction)`` of every vertex, in vertex order."""
        return [(l, j) for l, k in enumerate(self.sizes) for j in range(k)]

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
    tensors = {f"{name}/{pair_name(a, b)}": E for name, g in graphs.items()
               for a, b, E in zip(g.nodes[:-1], g.nodes[1:], g.edges)}
    info = {**meta, "bases": {name: {"nodes": g.nodes, "n_datapoints": g.n_datapoints} for name, g in graphs.items()}}
    atomic_save_safetensors(tensors, {META_KEY: json.dumps(info)}, path)


def load_graphs(path: Path) -> dict[str, InteractionGraph]:
    """The graphs ``save_graphs`` wrote."""
    from safetensors.torch import load_file

    info = read_safetensors_metadata(path, key=META_KEY)
    tensors = load_file(str(path))
    graphs = {}
    for name, entry in info["bases"].items():
        nodes = entry["nodes"]
        edges = [tensors[f"{name}/{pair_name(a, b)}"] for a, b in zip(nodes[:-1], nodes[1:])]
        graphs[name] = InteractionGraph(name, nodes, edges, entry["n_datapoints"], {"run": info.get("run")})
    return graphs
