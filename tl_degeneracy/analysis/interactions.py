"""The interaction graph of a finished analysis folder: edges, sparsity, modules, ablation curves.

``interactions_analysis(model, data, out)`` reads ``stats.safetensors`` and the bases an
``analyze`` run wrote to ``out``, streams the edges in the interaction basis, PCA and the model's
coordinates (or those ``config.bases`` names; with the direction budget it gives; checkpointed to
``out/interactions_checkpoint.safetensors``), and writes ``interactions.safetensors`` and the
``interactions`` section of ``report.json``; ``render`` draws its plots. ``interactions_estimate`` says
what the edge pass will cost before it runs. ``tl-degeneracy analyze --interactions`` and
``tl-degeneracy interactions DIR`` call them.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..basis.bases import InteractionBasis
from ..collection.options import StreamOptions
from ..collection.stats import RunRecord
from ..data import whole_rows
from ..generations import HookedModel
from ..hook_names import residual_hooks
from ..interactions.ablation import ablation_curves
from ..interactions.edges import EdgeConfig, EdgeCost, collect_edges, estimate_edge_cost
from ..interactions.graph import load_graphs, save_graphs
from ..interactions.modules import DEFAULT_EPS_RTOL, module_sweep
from ..interactions.sparsity import sparsity_table
from .files import BASIS_FILE, EDGES_CHECKPOINT_FILE, EDGES_FILE, PCA_FILE, PLOTS_DIR, REPORT_FILE, load_analysis
from .sections import AblationSection, InteractionsConfig, InteractionsSection, ModuleRow, SparsityRow

EDGE_UNITS = ("behavioural loss (MSE on logits, summed over the vocabulary) in the interaction basis; "
              "activation-scale units in PCA and the model's coordinates")


def _prepare(model: HookedModel, out: Path, config: InteractionsConfig) -> tuple[Any, Any, dict[str, Any], EdgeConfig]:
    """The analysis's report and statistics, the bases and the edge pass's config."""
    report, stats = load_analysis(out, model)
    assert stats.run is not None
    ib = InteractionBasis.load(out / BASIS_FILE)
    nodes = list(config.nodes) if config.nodes else [h for h in residual_hooks(model) if h in ib.layers]
    missing = [h for h in nodes if h not in ib.layers or h not in stats.hooks]
    if len(nodes) < 2 or missing:
        raise ValueError(f"the interaction graph needs bases at ≥ 2 nodes; {out} has none at {missing or nodes}. "
                         "Analyse with the residual stream as --hooks (the default)")
    load = {"interaction": lambda: ib, "pca": lambda: InteractionBasis.load(out / PCA_FILE),
            "standard": lambda: InteractionBasis.fit_kind("standard", stats, nodes)}
    bases = {name: load[name]() for name in config.bases}
    context = stats.run.config.get("context")
    edge_config = EdgeConfig.build(model, bases, nodes, exact=config.n_probes is None, n_probes=config.n_probes,
                                   seed=config.seed, batch_size=config.batch_size, context=context,
                                   budget=config.budget(), chunk_budget_bytes=int(config.memory_gib * 2**30))
    return report, stats, bases, edge_config


def interactions_estimate(model: HookedModel, out: str | Path, config: InteractionsConfig | None = None, *,
                          calibrate: bool = True) -> EdgeCost:
    """What the edge pass of ``interactions_analysis(model, ..., out, config)`` will cost (``EdgeCost``).

    Batches of ``config.batch_size`` rows of the analysis's context (the model's when it had none), as
    many as ``config.max_tokens`` needs; with ``calibrate``, one chunk of passes is timed.
    """
    config = config or InteractionsConfig()
    return _estimate(model, _prepare(model, Path(out), config)[3], config, calibrate)


def _estimate(model: HookedModel, edge_config: EdgeConfig, config: InteractionsConfig, calibrate: bool) -> EdgeCost:
    context = edge_config.context or int(getattr(getattr(model, "cfg", None), "n_ctx", 0) or 0) or 1024
    n_batches = max(1, math.ceil(config.max_tokens / (config.batch_size * context)))
    rows = config.batch_size if n_batches > 1 else min(config.batch_size, math.ceil(config.max_tokens / context))
    return estimate_edge_cost(model, edge_config, (rows, context), n_batches, calibrate=calibrate)


def interactions_analysis(model: HookedModel, data: Any, out: str | Path, config: InteractionsConfig | None = None,
                          *, resume: bool = False, progress: bool = True, keep_checkpoint: bool = False,
                          checkpoint_every: int = 10, checkpoint_seconds: float = 60.0,
                          announce: Callable[[str], None] | None = None) -> InteractionsSection:
    """Edges, sparsity, modules and ablation curves for the analysis in ``out`` (see the module docstring).

    ``announce``: given, it receives the edge pass's cost estimate (``interactions_estimate``, one timed
    chunk) before the pass starts.
    """
    config = config or InteractionsConfig()
    out = Path(out)
    report, stats, bases, edge_config = _prepare(model, out, config)
    if announce is not None:
        announce(_estimate(model, edge_config, config, calibrate=True).describe())
    nodes = list(edge_config.nodes)
    context = edge_config.context
    start = time.time()
    checkpoint = out / EDGES_CHECKPOINT_FILE
    graphs = collect_edges(model, data, bases, config=edge_config,
                           options=StreamOptions(max_tokens=config.max_tokens, checkpoint=checkpoint, resume=resume,
                                                 checkpoint_every=checkpoint_every,
                                                 checkpoint_seconds=checkpoint_seconds, progress=progress))
    run = next(iter(graphs.values())).meta.get("run")
    save_graphs(graphs, out / EDGES_FILE, {"run": run, "config": config.to_dict()})
    edge_seconds = time.time() - start
    sparsity = [SparsityRow.from_dict(row) for g in graphs.values() for row in sparsity_table(g)]
    modules = {name: [ModuleRow.from_dict(r) for r in module_sweep(g, config.eps_rtol_grid, n_modules=config.n_modules,
                                                                   balance=config.balance, seed=config.seed,
                                                                   assignment=True)]
               for name, g in graphs.items()}
    held_out = whole_rows(data, model, config.ablation_tokens, context, skip_tokens=stats.n_tokens,
                          batch_size=config.batch_size)
    held_note = "held out: the rows after the statistics' tokens"
    if held_out is None:
        held_out = whole_rows(data, model, config.ablation_tokens, context, batch_size=config.batch_size)
        held_note = "not held out: the data has no rows beyond the statistics' tokens"
    assert held_out is not None  # the statistics were collected on this data
    curves = ablation_curves(model, held_out, bases, nodes, batch_size=config.batch_size, seed=config.seed,
                             progress=progress)
    first = next(iter(graphs.values()))
    section = InteractionsSection(
        config=config, nodes=nodes, edge_run=None if run is None else RunRecord.from_dict(run),
        edge_tokens=first.meta.get("n_tokens"), edge_seconds=round(edge_seconds, 1),
        seconds=round(time.time() - start, 1), edge_units=EDGE_UNITS, sparsity=sparsity, modules=modules,
        ablation=AblationSection(int(held_out.numel()), held_note, curves))
    report.interactions = section
    report.save(out / REPORT_FILE)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)
    return section


def _nearest(rows: list[ModuleRow], eps_rtol: float) -> ModuleRow | None:
    """The row whose ε/max E is nearest ``eps_rtol`` on a log scale."""
    return min(rows, key=lambda r: abs(math.log10(r.eps_rtol or 1.0) - math.log10(eps_rtol))) if rows else None


def interaction_figures(out: Path, section: InteractionsSection) -> dict[str, list[Path]]:
    """Plots of the interactions section: layered graphs with modules, Lorenz curves, ablation curves."""
    from ..interactions import plots

    graphs = load_graphs(out / EDGES_FILE)
    folder = out / PLOTS_DIR
    figures: dict[str, list[Path]] = {"interaction_graph": [], "lorenz": [], "ablation": []}
    for name, graph in graphs.items():
        row = _nearest(section.modules.get(name, []), DEFAULT_EPS_RTOL)
        labels = [m for node in graph.nodes for m in row.modules[node]] if row and row.modules else None
        figures["interaction_graph"].append(plots.plot_layered_graph(graph, folder / f"graph_{name}.png",
                                                                     modules=labels))
    figures["lorenz"].append(plots.plot_lorenz(graphs, folder / "lorenz.png"))
    figures["ablation"].append(plots.plot_ablation([c.to_dict() for c in section.ablation.curves],
                                                   folder / "ablation.png"))
    return figures
