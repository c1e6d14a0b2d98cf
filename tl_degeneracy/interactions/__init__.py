"""The interaction graph: edges between consecutive nodes' directions, their sparsity and modules.

- ``collect_edges`` streams the edges ``E_ij`` (docs/theory.md §6) in several bases at once
  (``node_bases``: interaction basis, PCA, the model's coordinates); ``InteractionGraph`` holds them.
- ``sparsity_table``: fractions of edges carrying 50/90/99% of ``ΣE``, Gini, Lorenz curves.
- ``DirectionBudget``: edges among each node's top-k (or top-mass) directions, the rest in one vertex.
- ``find_modules`` / ``module_sweep``: the paper's cut-cost modules (§5.2.3, eq. 35), searched by METIS.
- ``ablation_curves``: keep the top-k directions of a node, per basis, and measure the loss.
- ``tl_degeneracy.analysis.interactions``: all of it for an analysis folder (``tl-degeneracy interactions``).
Plots live in ``interactions.plots`` (matplotlib, the ``report`` extra; not imported here).
"""
from ..basis.coordinates import random_basis
from .ablation import AblationCurve, ablation_curves
from .edges import EdgeAccumulator, EdgeConfig, EdgeMethod, collect_edges, graphs_from_stats, node_bases
from .graph import DirectionBudget, InteractionGraph, RestMode, contract, load_graphs, pair_name, save_graphs
from .modules import (
    DEFAULT_BALANCE,
    DEFAULT_EPS_RTOL,
    Bisection,
    CutEdge,
    CutScale,
    ModuleResult,
    RandomCuts,
    cost_csr,
    cost_graph,
    cut_cost,
    cut_edges,
    cut_scale,
    edge_costs,
    find_modules,
    module_sweep,
    random_partition_costs,
)
from .partition import CostGraph
from .sparsity import FRACTIONS, edge_fraction, edge_fractions, gini, lorenz_curve, sparsity_row, sparsity_table

__all__ = [
    "AblationCurve", "ablation_curves", "random_basis",
    "EdgeAccumulator", "EdgeConfig", "EdgeMethod", "collect_edges", "graphs_from_stats", "node_bases",
    "DirectionBudget", "InteractionGraph", "RestMode", "contract", "load_graphs", "pair_name", "save_graphs",
    "DEFAULT_BALANCE", "DEFAULT_EPS_RTOL", "Bisection", "CutEdge", "CutScale", "ModuleResult", "RandomCuts",
    "CostGraph", "cost_csr", "cost_graph", "cut_cost", "cut_edges", "cut_scale", "edge_costs", "find_modules",
    "module_sweep",
    "random_partition_costs",
    "FRACTIONS", "edge_fraction", "edge_fractions", "gini", "lorenz_curve", "sparsity_row", "sparsity_table",
]
