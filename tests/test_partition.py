"""The METIS step of the module search (``interactions.partition``) and the search at scale.

Dense references for the CSR arrays, subgraphs and the cut; networkx for the components; exact
arithmetic for the integer weights over costs from ``E/ε = 1e-300 … 1e300``; a planted 12 × 256
graph with four modules joined by known weak edges, recovered exactly at the cost eq. 35 gives;
and the Kernighan–Lin fallback with pymetis imported away.
"""
from __future__ import annotations

import math
import sys

import networkx as nx
import numpy as np
import pymetis
import pytest
import torch

from tl_degeneracy.interactions import modules as modules_module
from tl_degeneracy.interactions.graph import InteractionGraph
from tl_degeneracy.interactions.modules import cost_csr, cut_cost, cut_edges, edge_costs, find_modules
from tl_degeneracy.interactions.partition import (
    CostGraph,
    integer_weights,
    metis_bisection,
    rebalance,
    ufactor_for,
    weight_budget,
)


def same_partition(labels, truth):
    """Equal up to renaming the module labels."""
    pairs = set(zip(labels, truth))
    return len(pairs) == len(set(labels)) == len(set(truth))


def ragged_graph(seed=0, sizes=(3, 6, 2, 5), density=0.5):
    """Layers of unequal widths (as with a "rest" direction per node), about half the edges zero."""
    gen = torch.Generator().manual_seed(seed)
    edges = []
    for k_in, k_out in zip(sizes[:-1], sizes[1:]):
        E = torch.rand(k_out, k_in, generator=gen, dtype=torch.float64)
        edges.append(torch.where(torch.rand(k_out, k_in, generator=gen) < density, E, torch.zeros((), dtype=E.dtype)))
    return InteractionGraph("interaction", [f"n{l}" for l in range(len(sizes))], edges)


def dense(H: CostGraph) -> np.ndarray:
    A = np.zeros((H.n_vertices, H.n_vertices))
    A[H.rows, H.indices] = H.costs
    return A


# --------------------------------------------------------------------------- the CSR arrays

@pytest.mark.parametrize("sizes", [(3, 6, 2, 5), (4, 4), (1, 7, 1), (5, 5, 6, 6, 5)])
def test_csr_is_the_dense_cost_adjacency_without_zeros(sizes):
    graph = ragged_graph(sizes=sizes)
    eps = 0.3
    H = cost_csr(graph, eps)
    reference = edge_costs(graph.adjacency(), eps).numpy()  # the cost of every vertex pair, dense
    assert H.n_vertices == graph.n_vertices == sum(sizes)
    np.testing.assert_array_equal(dense(H), reference)
    assert (H.costs > 0).all() and H.n_edges == int(sum(int((E > eps).sum()) for E in graph.edges))
    assert (np.diff(H.rows) >= 0).all() and all((np.diff(H.indices[a:b]) > 0).all()
                                                   for a, b in zip(H.indptr[:-1], H.indptr[1:]))
    mask = np.random.default_rng(0).random(H.n_vertices) < 0.5
    expected = float(reference[mask][:, ~mask].sum())
    assert H.cut(mask) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert H.cut(mask) == pytest.approx(cut_cost(graph, mask.astype(int).tolist(), eps), rel=1e-12, abs=1e-15)


def test_subgraph_is_the_dense_submatrix():
    H = cost_csr(ragged_graph(1, sizes=(6, 7, 5, 6)), 0.2)
    keep = np.flatnonzero(np.random.default_rng(1).random(H.n_vertices) < 0.6)
    np.testing.assert_array_equal(dense(H.subgraph(keep)), dense(H)[np.ix_(keep, keep)])
    with pytest.raises(ValueError):
        H.subgraph(keep[::-1])


@pytest.mark.parametrize("seed", range(4))
def test_components_match_networkx(seed):
    rng = np.random.default_rng(seed)
    n = 300
    G = nx.gnm_random_graph(n, 260, seed=seed)  # sparse: many components, some isolated vertices
    if seed == 3:  # a long path numbered at random: label propagation needs its pointer jumps here
        order = rng.permutation(n)
        G = nx.Graph(list(zip(order[:-1].tolist(), order[1:].tolist())))
    A = np.zeros((n, n))
    for u, v in G.edges:
        A[u, v] = A[v, u] = 1.0 + rng.random()
    rows, cols = np.nonzero(A)
    H = CostGraph(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]), cols, A[rows, cols])
    labels = H.components()
    G.add_nodes_from(range(n))
    expected = np.empty(n, dtype=np.int64)
    for comp in nx.connected_components(G):
        expected[list(comp)] = min(comp)
    np.testing.assert_array_equal(labels, expected)


def test_the_most_expensive_cut_edges_are_the_head_of_the_full_list_ties_included():
    gen = torch.Generator().manual_seed(3)
    # costs on a coarse grid: many ties, which must still come out by (pair, i, j)
    edges = [torch.randint(0, 4, (k_out, k_in), generator=gen).to(torch.float64)
             for k_in, k_out in ((7, 9), (9, 6), (6, 8))]
    graph = InteractionGraph("pca", ["a", "b", "c", "d"], edges)
    labels = torch.randint(0, 3, (graph.n_vertices,), generator=gen).tolist()
    everything = cut_edges(graph, labels, 1.5)
    keys = [(-c.cost, c.pair, c.i, c.j) for c in everything]
    assert keys == sorted(keys) and len({c.cost for c in everything}) == 2  # E ∈ {2, 3}: two costs, many ties
    A = graph.adjacency().numpy()
    a = np.array(labels)
    assert len(everything) == int(((A > 1.5) & (a[:, None] != a[None, :])).sum()) // 2
    for limit in (0, 1, 5, 17, len(everything), len(everything) + 3):
        assert cut_edges(graph, labels, 1.5, limit=limit) == everything[:limit]
    result = find_modules(graph, eps=1.5, n_modules=3)
    assert result.n_cut_edges == len(cut_edges(graph, result.assignment, 1.5)) and result.cut == \
        cut_edges(graph, result.assignment, 1.5)[:1000]


# --------------------------------------------------------------------------- integer weights

def test_costs_and_integer_weights_over_600_decades():
    """E/ε from 1e-300 to 1e300 (and a hair above 1): every positive cost is exact in float64, becomes
    an integer ≥ 1, and the integers sum to at most the budget, far inside METIS's index type."""
    eps = 1.0
    ratios = [10.0 ** x for x in range(-300, 301, 5)] + [1 + 2 ** -52, 1 + 1e-12, 1 + 1e-6, math.nextafter(1.0, 0)]
    E = torch.tensor(ratios, dtype=torch.float64).reshape(1, -1) * eps
    C = edge_costs(E, eps)[0]
    expected = [0.5 * math.log1p(r - 1) if 1 < r < 2 else 0.5 * math.log(r) for r in ratios]
    for c, e, r in zip(C.tolist(), expected, ratios):
        assert (c > 0) == (r > 1) and c == pytest.approx(max(e, 0.0), rel=1e-12, abs=0)
    positive = C[C > 0].numpy()
    assert positive.min() < 1e-15 and positive.max() > 345  # the dynamic range METIS must hold: 3e18
    for bits in (64, 32):
        w = integer_weights(positive, bits)
        exact = positive * w.scale
        assert w.weights.min() >= 1  # no positive cost becomes 0
        assert int(w.weights.astype(object).sum()) <= w.budget == weight_budget(bits) < 2 ** (bits - 1)
        big = exact >= 1
        assert np.all(np.abs(w.weights[big] - exact[big]) <= 0.5) and np.all(w.weights[~big] == 1)
        assert w.resolution == pytest.approx(1 / w.scale) and w.resolution * positive.size < 1e-3 * positive.sum()
    # E/ε itself overflows float64 here: the cost is ½ (log E − log ε)
    tiny = 1e-300
    huge = edge_costs(torch.tensor([[1e10, 1e300]], dtype=torch.float64), tiny)[0]
    assert huge.tolist() == pytest.approx([0.5 * (math.log(1e10) - math.log(tiny)),
                                           0.5 * (math.log(1e300) - math.log(tiny))], rel=1e-14)
    with pytest.raises(ValueError):
        integer_weights(np.array([1.0, 0.0]))


def test_the_weights_steer_metis_to_the_cheapest_cut_across_the_range():
    """A ring of 24 vertices whose edge costs span 1e-16 … 690 nats: the cheapest balanced bisection cuts
    the two cheapest edges, opposite each other, which only works if those tiny costs stay tiny and nonzero."""
    n = 24
    costs = 0.5 * math.log(10.0) * np.linspace(50, 600, n)  # E/ε from 1e50 to 1e600 (ε = 1e-300)
    costs[0], costs[n // 2] = 0.5 * math.log1p(2 ** -52), 0.5 * math.log1p(1e-9)
    u = np.arange(n)
    v = (u + 1) % n
    rows, cols = np.concatenate([u, v]), np.concatenate([v, u])
    order = np.lexsort((cols, rows))
    H = CostGraph(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]), cols[order],
                  np.concatenate([costs, costs])[order])
    side, record = metis_bisection(H, [0.5], 12, 12, seed=0, runs=4, metis=pymetis)
    assert H.cut(side) == pytest.approx(costs[0] + costs[n // 2], rel=1e-12)
    assert side.sum() == 12 and record.resolution > 0 and record.runs == 4


# --------------------------------------------------------------------------- balance

@pytest.mark.parametrize(("m", "t", "lo", "hi"), [(100, 0.5, 40, 60), (101, 0.5, 50, 51), (90, 2 / 3, 54, 66),
                                                  (90, 1 / 3, 24, 36), (64, 0.5, 32, 32)])
def test_metis_sides_stay_within_the_bound(m, t, lo, hi):
    rng = np.random.default_rng(m)
    A = np.triu((rng.random((m, m)) < 0.1) * rng.lognormal(0, 2, (m, m)), 1)
    A = A + A.T
    rows, cols = np.nonzero(A)
    H = CostGraph(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))]), cols, A[rows, cols])
    assert ufactor_for(100, 0.5, 40, 60) == 200 and ufactor_for(m, t, lo, hi) >= 1
    for seed in range(3):
        side, record = metis_bisection(H, [t], lo, hi, seed=seed, runs=2, metis=pymetis)
        assert lo <= side.sum() <= hi and record.moved == abs(record.sizes_from_metis[0] - int(side.sum()))


def test_rebalance_moves_the_cheapest_vertices():
    # path 0-1-2-3-4-5 with costs 5, 1, 5, 5, 5; side {0, 1, 2, 3, 4} must lose two vertices
    costs = [5.0, 1.0, 5.0, 5.0, 5.0]
    u = np.arange(5)
    rows, cols = np.concatenate([u, u + 1]), np.concatenate([u + 1, u])
    w = np.concatenate([costs, costs])
    order = np.lexsort((cols, rows))
    H = CostGraph(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=6))]), cols[order], w[order])
    side = np.array([True, True, True, True, True, False])
    moved, count = rebalance(H, side, 2, 3)
    # moving raises the cut by (cost inside − cost across): vertex 4 by 0, vertex 0 by 5, vertices 1, 2 by 6
    assert count == 2 and moved.tolist() == [False, True, True, True, False, False]
    # too small: {0} must gain two; moving 1 in lowers the cut by 4, moving 5 raises it by 5, the rest by 6 or 10
    grown, count = rebalance(H, np.array([True, False, False, False, False, False]), 3, 4)
    assert count == 2 and grown.tolist() == [True, True, False, False, False, True]
    same, none = rebalance(H, side, 2, 5)
    assert none == 0 and same is side


# --------------------------------------------------------------------------- the search at scale

def planted_four_modules(n_nodes=12, width=256, eps=1e-4, seed=0):
    """``n_nodes`` × ``width`` directions in four equal modules (shuffled per node); inside a module
    E ~ U(0.5, 1.5), across modules E ≤ ε (free), except six known weak edges that join every pair of
    modules at strengths 1e-3 … 5e-2. Returns the graph, the true labels, and eq. 35's cost of cutting
    exactly the weak edges."""
    gen = torch.Generator().manual_seed(seed)
    truth = [torch.arange(4).repeat_interleave(width // 4)[torch.randperm(width, generator=gen)]
             for _ in range(n_nodes)]
    edges = []
    for a, b in zip(truth[:-1], truth[1:]):
        inside = 0.5 + torch.rand(width, width, generator=gen, dtype=torch.float64)
        below = eps * torch.rand(width, width, generator=gen, dtype=torch.float64)
        edges.append(torch.where(b[:, None] == a[None, :], inside, below))
    weak = [(0, 1, 1e-2), (1, 2, 3e-3), (2, 3, 5e-2), (3, 0, 2e-3), (0, 2, 1e-3), (1, 3, 4e-2)]
    for index, (p, q, strength) in enumerate(weak):
        pair = index % (n_nodes - 1)
        j = int((truth[pair] == p).nonzero()[0])
        i = int((truth[pair + 1] == q).nonzero()[0])
        edges[pair][i, j] = strength
    graph = InteractionGraph("interaction", [f"blocks.{l}.hook_resid_pre" for l in range(n_nodes)], edges)
    return graph, torch.cat(truth).tolist(), sum(0.5 * math.log(s / eps) for _, _, s in weak)


def test_planted_12_by_256_graph_with_four_modules_is_recovered_exactly():
    graph, truth, expected = planted_four_modules()
    result = find_modules(graph, eps=1e-4, n_modules=4)
    assert same_partition(result.assignment, truth)
    assert result.cut_cost == pytest.approx(expected, rel=1e-12) and result.n_cut_edges == 6
    assert result.module_sizes == [768] * 4 and result.search == "metis"
    # the weak edges join all four modules, and 3072 vertices are too many for Stoer–Wagner: METIS splits
    assert [b.method for b in result.bisections] == ["metis"] * 3
    assert all(b.metis is not None and b.metis.resolution < 1e-6 for b in result.bisections)
    assert sum(b.cost for b in result.bisections) == pytest.approx(expected, rel=1e-12)
    assert result.n_positive_edges == 11 * 4 * 64 * 64 + 6


# --------------------------------------------------------------------------- fallback

def test_without_pymetis_the_search_falls_back_to_kernighan_lin_and_says_so(monkeypatch):
    graph, truth, expected = planted_four_modules(n_nodes=3, width=16)
    with_metis = find_modules(graph, eps=1e-4, n_modules=4)
    monkeypatch.setitem(sys.modules, "pymetis", None)  # `import pymetis` now raises ImportError
    monkeypatch.setattr(modules_module, "_MIN_CUT_MAX_WORK", 0)  # no Stoer–Wagner: the fallback must do it
    with pytest.warns(RuntimeWarning, match="pymetis could not be imported"):
        fallback = find_modules(graph, eps=1e-4, n_modules=4)
    assert fallback.search == "kernighan_lin" and "pymetis could not be imported" in fallback.search_meaning
    assert {b.method for b in fallback.bisections} <= {"components", "kernighan_lin"}
    assert "kernighan_lin" in {b.method for b in fallback.bisections}
    assert all(b.metis is None for b in fallback.bisections)
    assert same_partition(fallback.assignment, truth) and fallback.assignment == with_metis.assignment
    assert fallback.cut_cost == pytest.approx(expected, rel=1e-12) == with_metis.cut_cost
    assert fallback.to_dict()["search"] == "kernighan_lin"
