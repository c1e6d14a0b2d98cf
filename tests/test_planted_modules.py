"""End to end on a planted two-module transformer: edges → module search finds the modules."""
from __future__ import annotations

import math

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.interactions import collect_edges, cut_scale, find_modules, node_bases, random_partition_costs
from tl_degeneracy.interactions import modules as modules_module
from tl_degeneracy.testing.planted import planted_modular_model, planted_tokens

pytestmark = pytest.mark.models

NODES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
POSITIONS = {NODES[1]: [-1], NODES[2]: [-1]}  # one position: the modules are exactly independent there


def _graphs(model, kinds=("interaction", "pca", "standard")):
    tokens = planted_tokens()
    stats = tld.collect(model, tokens, NODES, jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]),
                        positions=POSITIONS, batch_size=243, progress=False)
    bases = node_bases(stats, NODES, kinds=kinds)
    return bases, collect_edges(model, tokens, bases, NODES, exact=True, positions=POSITIONS, batch_size=243,
                                progress=False)


def _module_of_directions(basis, hook):
    """0 for a direction living in module A's residual dimensions, 1 for module B's."""
    P = basis[hook].C_pinv
    half = P.shape[0] // 2
    a, b = P[:half].norm(dim=0), P[half:].norm(dim=0)
    assert bool(((a < 1e-9 * b) | (b < 1e-9 * a)).all()), "a direction mixes the modules"
    return (b > a).long().tolist()


def test_module_search_finds_the_two_planted_modules_at_zero_cost_in_every_basis():
    bases, graphs = _graphs(planted_modular_model(seed=0))
    for name, graph in graphs.items():
        truth = [m for hook in NODES for m in _module_of_directions(bases[name], hook)]
        result = find_modules(graph, eps_rtol=1e-6)
        assert result.cut_cost == 0.0, name
        assert result.module_sizes == [sum(1 for m in truth if m == 0), sum(1 for m in truth if m == 1)]
        same = [int(a == b) for a, b in zip(result.assignment, truth)]
        assert all(same) or not any(same), (name, result.assignment, truth)  # the labels, up to renaming
        random = random_partition_costs(graph, result.eps, result.module_sizes, n=50, seed=0)
        assert float(random.costs.min()) > 0, name  # every random split of the same sizes cuts real edges


def test_a_planted_cross_edge_is_the_only_cut_and_costs_what_the_formula_says(monkeypatch):
    _, weak = _graphs(planted_modular_model(seed=0, cross=0.02), kinds=("standard",))
    _, double = _graphs(planted_modular_model(seed=0, cross=0.04), kinds=("standard",))
    E, E2 = weak["standard"].edges[1], double["standard"].edges[1]
    half = E.shape[0] // 2
    # module B's output coordinate B0 from module A's input coordinate A0, and nothing else across
    cross = torch.zeros_like(E, dtype=torch.bool)
    cross[half:, :half] = True
    cross[:half, half:] = True
    assert E[half, 0] > 0 and float(E[cross].sum()) == pytest.approx(float(E[half, 0]), rel=1e-12)
    assert float(E2[half, 0] / E[half, 0]) == pytest.approx(4.0, rel=1e-10)  # strength ∝ cross²: known exactly
    graph = weak["standard"]
    scale = cut_scale(graph, eps_rtol=1e-6)
    result = find_modules(graph, eps=scale.eps)
    assert [(c.pair, c.i, c.j) for c in result.cut] == [(1, half, 0)]
    assert result.cut_cost == pytest.approx(0.5 * math.log(float(E[half, 0]) / scale.eps), rel=1e-12)
    assert result.module_sizes == [12, 12] and result.bisections[0].method == "min_cut"
    # METIS alone (no Stoer–Wagner certificate) finds the same modules, at the same float64 cost
    monkeypatch.setattr(modules_module, "_MIN_CUT_MAX_WORK", 0)
    metis = find_modules(graph, eps=scale.eps)
    assert metis.bisections[0].method == "metis" and metis.assignment == result.assignment
    assert metis.cut_cost == result.cut_cost
