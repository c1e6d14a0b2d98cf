"""From the streamed examples (``examples``) and the facts (``facts``) to what the pages show (``pages``)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .examples import EXAMPLES, HistogramBins
from .facts import (
    IMPORTANCE_NAMES,
    DirectionFacts,
    Edge,
    decoder_vectors,
    densities,
    direct_logit_effects,
    logit_histogram,
    top_tokens,
)
from .pages import DirectionView, Example


def _examples(top: Any, row: int, decode: Callable[[int], str], before: int) -> list[Example]:
    values, ids = top.tensors["values"][row], top.tensors["ids"][row]
    records, window = top.tensors["records"][row], top.tensors["window"][row]
    out = []
    for j in range(values.shape[0]):
        if int(ids[j]) < 0:  # an empty slot: fewer datapoints than k
            continue
        tokens = [decode(int(t)) if int(t) >= 0 else None for t in records[j]]
        vals = [None if torch.isnan(v) else float(v) for v in window[j]]
        out.append(Example(tokens, vals, before, float(window[j, before]), int(ids[j])))  # type: ignore[arg-type]
    return out


def edge_facts(graph: Any, hooks: Sequence[str], hook: str, vertex: int, top: int = 5) -> tuple[list[Edge], list[Edge]]:
    """The strongest edges into and out of vertex ``vertex`` of node ``hook`` (vertex = the direction's position
    among the node's vertices; a vertex past the node's kept directions is its rest vertex)."""
    if hook not in hooks:
        return [], []
    l = list(hooks).index(hook)
    kept = getattr(graph, "kept", None)

    def direction(node: int, v: int) -> int | None:
        if kept is None:
            return v
        chosen = kept[node]
        return int(chosen[v]) if v < len(chosen) else None  # the rest vertex

    def strongest(row: torch.Tensor, node: int) -> list[Edge]:
        total = float(row.sum())
        order = torch.argsort(row, descending=True)[:top]
        return [Edge(hooks[node], direction(node, int(j)), float(row[j]), float(row[j]) / total if total else 0.0)
                for j in order if float(row[j]) > 0]

    incoming = strongest(graph.edges[l - 1][vertex], l - 1) if 0 < l <= len(graph.edges) else []
    outgoing = strongest(graph.edges[l][:, vertex], l + 1) if l < len(graph.edges) else []
    return incoming, outgoing


def direction_views(stats: Any, observer: Mapping[str, Any], bases: Mapping[str, Mapping[str, Any]],
                    decode: Callable[[int], str], model: Any = None, graphs: Mapping[str, Any] | None = None,
                    modules: Mapping[str, Mapping[str, list[int]]] | None = None, n_logits: int = 10
                    ) -> dict[str, dict[str, list[DirectionView]]]:
    """``views[hook][basis]`` for every direction the ``DirectionExamples`` run recorded (``observer``: its
    ``to_dict()``, as saved in the statistics' run record). ``bases[basis][hook]``: the basis layers;
    ``graphs[basis]``: the interaction graph over the same hooks (optional); ``modules[basis][hook]``: module
    labels per vertex (optional)."""
    bins = HistogramBins(**observer["bins"])
    before = int(observer["before"])
    views: dict[str, dict[str, list[DirectionView]]] = {}
    for basis, per_hook in observer["bases"].items():
        for hook, record in per_hook.items():
            layer = bases[basis][hook]
            directions, scales = list(record["directions"]), list(record["scales"])
            top = stats.accumulator(EXAMPLES, f"{basis}:{hook}")
            hist = stats.accumulator(EXAMPLES, f"{basis}:{hook}#histogram")
            above, below, n = densities(hist, bins)
            mean = hist.tensors["s"] / n
            effects = None
            if model is not None:
                vectors = decoder_vectors(layer, directions)
                effects = None if vectors is None else direct_logit_effects(model, vectors)
            graph = None if graphs is None else graphs.get(basis)
            out = []
            for r, i in enumerate(directions):
                facts = DirectionFacts(
                    basis=basis, hook=hook, index=i, rank=r, importance=float(layer.importance[i]),
                    importance_name=IMPORTANCE_NAMES.get(getattr(layer, "kind", basis), "importance"),
                    rms=float(scales[r]), mean=float(mean[r]), n=int(n), density_positive=float(above[r]),
                    density_negative=float(below[r]))
                if effects is not None:
                    facts.logits_top, facts.logits_bottom = top_tokens(effects[r], decode, n_logits)
                    facts.logits_hist_values, facts.logits_hist_heights = logit_histogram(effects[r])
                if graph is not None:
                    vertex = _vertex(graph, hook, i)
                    if vertex is not None:
                        facts.in_edges, facts.out_edges = edge_facts(graph, list(graph.nodes), hook, vertex)
                labels = None if modules is None else modules.get(basis, {}).get(hook)
                if labels is not None:
                    vertex = i if graph is None else _vertex(graph, hook, i)
                    if vertex is not None and vertex < len(labels):
                        facts.module = int(labels[vertex])
                counts = hist.tensors["counts"][r]
                out.append(DirectionView(facts, _examples(top, 2 * r, decode, before),
                                         _examples(top, 2 * r + 1, decode, before),
                                         counts[0].tolist(), counts[1].tolist()))
            views.setdefault(hook, {})[basis] = out
    return views


def _vertex(graph: Any, hook: str, direction: int) -> int | None:
    """The vertex of a direction in the graph's node ``hook`` (None when the node lumps it into its rest)."""
    nodes = list(graph.nodes)
    if hook not in nodes:
        return None
    kept = getattr(graph, "kept", None)
    if kept is None:
        return direction
    chosen = [int(k) for k in kept[nodes.index(hook)]]
    return chosen.index(direction) if direction in chosen else None
