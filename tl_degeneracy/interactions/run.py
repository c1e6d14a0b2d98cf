"""The interaction graph of a finished analysis folder: edges, sparsity, modules, ablation curves.

``interactions_analysis(model, data, out)`` reads ``stats.safetensors`` and the bases an
``analyze`` run wrote to ``out``, streams the edges in the interaction basis, PCA and the model's
coordinates (checkpointed to ``out/interactions_checkpoint.safetensors``), and writes
``interactions.safetensors`` and the ``interactions`` section of ``report.json``; ``render`` draws
its plots. ``tl-degeneracy analyze --interactions`` and ``tl-degeneracy interactions DIR`` call it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import iter_batches
from ..generations import HookedModel
from ..hook_names import residual_hooks
from ..interaction_basis import InteractionBasis
from ..stats import atomic_save_safetensors, read_safetensors_metadata
from .ablation import ablation_curves
from .edges import collect_edges, pair_name
from .graph import InteractionGraph
from .modules import DEFAULT_BALANCE, DEFAULT_EPS_RTOL, module_sweep
from .sparsity import sparsity_table

EDGES_FILE = "interactions.safetensors"
CHECKPOINT_FILE = "interactions_checkpoint.safetensors"
BASES = ("interaction", "pca", "standard")


@dataclass(frozen=True)
class InteractionsConfig:
    """Options of the interaction-graph analysis (recorded in report.json; the edge pass's own
    identity, ``EdgeConfig.to_dict()``, is what its checkpoint must match).

    ``eps_rtol_grid``: module-search scales ε relative to the largest edge (the package convention);
    the plots use ``DEFAULT_EPS_RTOL`` (or the grid's nearest point).
    """

    nodes: tuple[str, ...] | None = None  # default: the residual stream nodes the analysis fitted bases at
    n_probes: int | None = None  # None: exact edges (forward mode); else Rademacher probes over positions
    max_tokens: int = 1024
    batch_size: int = 8
    eps_rtol_grid: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
    n_modules: int = 2
    balance: float = DEFAULT_BALANCE
    ablation_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_probes", "max_tokens", "batch_size", "n_modules", "ablation_tokens"):
            value = getattr(self, name)
            if name == "n_probes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.eps_rtol_grid or not all(0 < e for e in self.eps_rtol_grid):
            raise ValueError(f"eps_rtol_grid must hold positive values (ε relative to the largest edge), got "
                             f"{self.eps_rtol_grid!r}")
        if not 0 <= self.balance < 1:
            raise ValueError(f"balance must be in [0, 1), got {self.balance}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["nodes"] = None if self.nodes is None else list(self.nodes)
        out["eps_rtol_grid"] = list(self.eps_rtol_grid)
        return out


def save_graphs(graphs: dict[str, InteractionGraph], path: Path, meta: dict[str, Any]) -> None:
    tensors = {f"{name}/{pair_name(a, b)}": E for name, g in graphs.items()
               for a, b, E in zip(g.nodes[:-1], g.nodes[1:], g.edges)}
    info = {**meta, "bases": {name: {"nodes": g.nodes, "n_datapoints": g.n_datapoints} for name, g in graphs.items()}}
    atomic_save_safetensors(tensors, {"tl_degeneracy_interactions": json.dumps(info)}, path)


def load_graphs(path: Path) -> dict[str, InteractionGraph]:
    from safetensors.torch import load_file

    info = read_safetensors_metadata(path, key="tl_degeneracy_interactions")
    tensors = load_file(str(path))
    graphs = {}
    for name, entry in info["bases"].items():
        nodes = entry["nodes"]
        edges = [tensors[f"{name}/{pair_name(a, b)}"] for a, b in zip(nodes[:-1], nodes[1:])]
        graphs[name] = InteractionGraph(name, nodes, edges, entry["n_datapoints"], {"run": info.get("run")})
    return graphs


def _held_out_tokens(data: Any, model: HookedModel, skip_tokens: int, n_tokens: int, batch_size: int,
                     context: int | None) -> tuple[torch.Tensor, str]:
    """Rows after the first ``skip_tokens`` (what the statistics saw), up to ``n_tokens``; from the
    start, with a note, when the data holds no more."""
    rows, seen, taken = [], 0, 0
    first: list[torch.Tensor] = []
    for batch in iter_batches(data, model, batch_size, context):
        if batch.attention_mask is not None and not bool(batch.attention_mask.all()):
            continue  # padded rows would need a mask in the loss; whole rows are plenty
        for row in batch.tokens:
            if sum(r.numel() for r in first) < n_tokens:
                first.append(row)
            if seen >= skip_tokens and taken < n_tokens:
                rows.append(row)
                taken += row.numel()
            seen += row.numel()
        if taken >= n_tokens:
            break
    if rows:
        return torch.stack(rows), "held out: the rows after the statistics' tokens"
    return torch.stack(first), "not held out: the data has no rows beyond the statistics' tokens"


def interactions_analysis(model: HookedModel, data: Any, out: str | Path, config: InteractionsConfig | None = None,
                          *, resume: bool = False, progress: bool = True, keep_checkpoint: bool = False,
                          checkpoint_every: int = 10, checkpoint_seconds: float = 60.0) -> dict[str, Any]:
    """Edges, sparsity, modules and ablation curves for the analysis in ``out`` (see the module docstring)."""
    from ..analysis import load_analysis

    config = config or InteractionsConfig()
    out = Path(out)
    report, stats = load_analysis(out, model)
    assert stats.run is not None
    ib = InteractionBasis.load(out / "basis.safetensors")
    pca = InteractionBasis.load(out / "pca_basis.safetensors")
    nodes = list(config.nodes) if config.nodes else [h for h in residual_hooks(model) if h in ib.layers]
    missing = [h for h in nodes if h not in ib.layers or h not in stats.hooks]
    if len(nodes) < 2 or missing:
        raise ValueError(f"the interaction graph needs bases at ≥ 2 nodes; {out} has none at {missing or nodes}. "
                         "Analyse with the residual stream as --hooks (the default)")
    standard = InteractionBasis.fit(stats, hooks=nodes, scaling="identity")
    bases = {"interaction": ib, "pca": pca, "standard": standard}
    context = stats.run.config.get("context")
    start = time.time()
    checkpoint = out / CHECKPOINT_FILE
    graphs = collect_edges(model, data, bases, nodes, exact=config.n_probes is None, n_probes=config.n_probes,
                           seed=config.seed,
                           batch_size=config.batch_size, context=context, max_tokens=config.max_tokens,
                           checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every,
                           checkpoint_seconds=checkpoint_seconds, progress=progress)
    run = next(iter(graphs.values())).meta.get("run")
    save_graphs(graphs, out / EDGES_FILE, {"run": run, "config": config.to_dict()})
    edge_seconds = time.time() - start
    sparsity = [row for g in graphs.values() for row in sparsity_table(g)]
    modules = {name: module_sweep(g, config.eps_rtol_grid, n_modules=config.n_modules, balance=config.balance,
                                  seed=config.seed, assignment=True) for name, g in graphs.items()}
    held_out, held_note = _held_out_tokens(data, model, stats.n_tokens, config.ablation_tokens, config.batch_size,
                                           context)
    curves = ablation_curves(model, held_out, bases, nodes, batch_size=config.batch_size, seed=config.seed,
                             progress=progress)
    section = {
        "config": config.to_dict(), "nodes": nodes, "edge_run": run, "edge_tokens": graphs["interaction"].meta.get(
            "n_tokens"), "edge_seconds": round(edge_seconds, 1), "seconds": round(time.time() - start, 1),
        "edge_units": "behavioural loss (MSE on logits, summed over the vocabulary) in the interaction basis; "
                      "activation-scale units in PCA and the model's coordinates",
        "sparsity": sparsity, "modules": modules,
        "ablation": {"tokens": int(held_out.numel()), "text": held_note, "curves": [c.to_dict() for c in curves]},
    }
    report.interactions = section
    report.save(out / "report.json")
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)
    return section


def interaction_figures(out: Path, section: dict[str, Any]) -> dict[str, list[Path]]:
    """Plots of the interactions section: layered graphs with modules, Lorenz curves, ablation curves."""
    from . import plots

    graphs = load_graphs(out / EDGES_FILE)
    figures: dict[str, list[Path]] = {"interaction_graph": [], "lorenz": [], "ablation": []}
    for name, graph in graphs.items():
        rows = section["modules"].get(name, [])
        row = min(rows, key=lambda r: abs(torch.tensor(r["eps_rtol"] or 1.0).log10() -
                                          torch.tensor(DEFAULT_EPS_RTOL).log10()).item()) if rows else None
        labels = [m for node in graph.nodes for m in row["modules"][node]] if row and "modules" in row else None
        figures["interaction_graph"].append(plots.plot_layered_graph(graph, out / "plots" / f"graph_{name}.png",
                                                                     modules=labels))
    figures["lorenz"].append(plots.plot_lorenz(graphs, out / "plots" / "lorenz.png"))
    figures["ablation"].append(plots.plot_ablation(section["ablation"]["curves"], out / "plots" / "ablation.png"))
    return figures
