"""The interaction graph: edges between consecutive nodes' directions, their sparsity and modules.

``collect_edges`` streams the edges (docs/theory.md §8) in several bases at once;
``InteractionGraph`` holds them.
"""
from .edges import EdgeAccumulator, EdgeConfig, collect_edges, graphs_from_stats, node_bases
from .graph import InteractionGraph

__all__ = ["EdgeAccumulator", "EdgeConfig", "collect_edges", "graphs_from_stats", "node_bases", "InteractionGraph"]
from .ablation import AblationCurve, ablation_curves, random_basis  # noqa: E402

__all__ += ["AblationCurve", "ablation_curves", "random_basis"]
