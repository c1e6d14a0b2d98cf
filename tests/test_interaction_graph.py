"""Interaction-graph analytics: sparsity (fractions, Gini, Lorenz), the eq. 35 module search, plots.

Hand-computed small matrices for the sparsity measures; planted block-diagonal graphs (modules
with random positive weights inside, zeros across) for the module search, where the answer and
its cost are known exactly. No TransformerLens model is touched.
"""
from __future__ import annotations

import json
import math
import sys

import matplotlib.image
import pytest
import torch

from tl_degeneracy.interactions import modules as modules_module
from tl_degeneracy.interactions.graph import InteractionGraph
from tl_degeneracy.interactions.modules import (
    cut_cost,
    cut_scale,
    edge_costs,
    find_modules,
    module_sweep,
    random_partition_costs,
)
from tl_degeneracy.interactions.plots import plot_ablation, plot_layered_graph, plot_lorenz
from tl_degeneracy.interactions.sparsity import edge_fraction, edge_fractions, gini, lorenz_curve, sparsity_table

T = torch.tensor


def f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


# --------------------------------------------------------------------------- sparsity

def test_uniform_matrix():
    E = torch.ones(2, 2, dtype=torch.float64)
    assert edge_fractions(E) == {"0.5": 0.5, "0.9": 1.0, "0.99": 1.0}
    assert gini(E) == pytest.approx(0.0, abs=1e-15)
    x, y = lorenz_curve(E)
    assert torch.allclose(x, f64([0, 0.25, 0.5, 0.75, 1])) and torch.allclose(y, x)


def test_ten_equal_edges_reach_ninety_percent_despite_rounding():
    # 0.1 summed nine times is 0.8999999999999999 < 0.9 · 0.9999999999999999: the rounding slack decides
    assert edge_fraction(torch.full((10,), 0.1, dtype=torch.float64), 0.9) == 0.9


def test_one_nonzero_edge():
    E = torch.zeros(3, 4, dtype=torch.float64)
    E[1, 2] = 5.0
    assert edge_fractions(E) == {"0.5": 1 / 12, "0.9": 1 / 12, "0.99": 1 / 12}
    assert gini(E) == pytest.approx(11 / 12, abs=1e-15)
    x, y = lorenz_curve(E)
    assert torch.equal(y, f64([0] * 12 + [1]))


def test_two_edges_and_a_hand_computed_four():
    # [1, 3]: G = (b − a) / (2(a + b)) = 1/4; the largest edge alone carries 75% ≥ 50%
    E = f64([[1.0, 3.0]])
    assert gini(E) == pytest.approx(0.25, abs=1e-15)
    assert edge_fractions(E) == {"0.5": 0.5, "0.9": 1.0, "0.99": 1.0}
    x, y = lorenz_curve(E)
    assert torch.allclose(x, f64([0, 0.5, 1])) and torch.allclose(y, f64([0, 0.25, 1]))
    # [[4, 3], [2, 1]], ΣE = 10: largest-first sums 4, 7, 9, 10; G = 2·(1+4+9+16)/40 − 5/4 = 1/4
    E = f64([[4.0, 3.0], [2.0, 1.0]])
    assert edge_fractions(E) == {"0.5": 0.5, "0.9": 0.75, "0.99": 1.0}
    assert gini(E) == pytest.approx(0.25, abs=1e-15)


def test_gini_is_one_minus_twice_the_lorenz_area():
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (1, 2), (30, 30)]:
        E = torch.rand(shape, generator=gen, dtype=torch.float64) ** 4
        x, y = lorenz_curve(E)
        area = float(torch.trapezoid(y, x))
        assert gini(E) == pytest.approx(1 - 2 * area, abs=1e-12)
        assert bool((y <= x + 1e-12).all()) and bool((y[1:] >= y[:-1]).all())


def test_zero_and_empty_matrices_are_sane():
    for E in (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)):
        assert edge_fractions(E) == {"0.5": 0.0, "0.9": 0.0, "0.99": 0.0}
        assert gini(E) == 0.0
        x, y = lorenz_curve(E)
        assert torch.equal(x, y) and not bool(torch.isnan(y).any())
    with pytest.raises(ValueError, match=">= 0"):
        gini(f64([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="finite"):
        edge_fraction(f64([[1.0, float("nan")]]), 0.5)


def test_sparsity_table_rows():
    graph = InteractionGraph("pca", ["a", "b", "c"],
                             [f64([[4.0, 3.0], [2.0, 1.0]]), torch.zeros(3, 2, dtype=torch.float64)])
    rows = sparsity_table(graph)
    json.dumps(rows)
    assert [(r["source"], r["target"], r["n_edges"], r["k_in"], r["k_out"]) for r in rows] == [
        ("a", "b", 4, 2, 2), ("b", "c", 6, 2, 3)]
    assert rows[0]["total"] == 10.0 and rows[0]["gini"] == pytest.approx(0.25)
    assert rows[0]["fractions"] == {"0.5": 0.5, "0.9": 0.75, "0.99": 1.0}
    assert rows[1]["total"] == 0.0 and rows[1]["gini"] == 0.0 and rows[0]["basis"] == "pca"


# --------------------------------------------------------------------------- modules

def planted(a_sizes, b_sizes, seed=0, free=(0, 0, 0)):
    """Three nodes; node l holds a_l directions of module A, b_l of module B and ``free[l]`` unconnected
    ones, shuffled. Weights U(0.5, 1.5) inside a module, 0 across. Returns the graph and the truth
    (0 = A, 1 = B, 2 = free) per vertex."""
    gen = torch.Generator().manual_seed(seed)
    truth_by_node = []
    for a, b, f in zip(a_sizes, b_sizes, free):
        t = torch.tensor([0] * a + [1] * b + [2] * f)
        truth_by_node.append(t[torch.randperm(len(t), generator=gen)])
    edges = []
    for t_in, t_out in zip(truth_by_node[:-1], truth_by_node[1:]):
        same = (t_out[:, None] == t_in[None, :]) & (t_out[:, None] < 2)
        E = 0.5 + torch.rand(len(t_out), len(t_in), generator=gen, dtype=torch.float64)
        edges.append(torch.where(same, E, torch.zeros((), dtype=torch.float64)))
    graph = InteractionGraph("interaction", ["n0", "n1", "n2"], edges)
    return graph, torch.cat(truth_by_node).tolist()


def same_partition(labels, truth):
    """Equal up to renaming the module labels."""
    pairs = set(zip(labels, truth))
    return len(pairs) == len(set(labels)) == len(set(truth))


def test_planted_modules_are_found_at_zero_cost():
    graph, truth = planted([4, 4, 4], [4, 4, 4])
    result = find_modules(graph, 1e-3)
    assert same_partition(result.assignment, truth)
    assert result.cut_cost == 0.0 and result.cut == [] and result.optimal
    assert result.module_sizes == [12, 12] and result.assignment[0] == 0
    assert [b.method for b in result.bisections] == ["components"] and result.search == "metis"
    assert result.eps == pytest.approx(1e-3 * max(float(E.max()) for E in graph.edges)) and result.eps_rtol == 1e-3
    assert [len(m) for m in result.by_node()] == [8, 8, 8]
    json.dumps(result.to_dict())


def test_weak_cross_edge_is_the_only_cut_and_costs_what_eq35_says():
    graph, truth = planted([4, 4, 4], [4, 4, 4], seed=1)
    # a weak edge from a module-A direction of node 0 to a module-B direction of node 1
    j = next(d for d in range(8) if truth[d] == 0)
    i = next(d for d in range(8) if truth[8 + d] == 1)
    E_c, eps = 1e-2, 1e-4
    graph.edges[0][i, j] = E_c
    result = find_modules(graph, eps=eps)
    assert same_partition(result.assignment, truth)
    assert [(c.pair, c.i, c.j) for c in result.cut] == [(0, i, j)]
    assert abs(result.cut_cost - 0.5 * math.log(E_c / eps)) < 1e-12
    assert result.bisections[0].method == "min_cut" and result.optimal
    assert result.eps == eps and result.eps_rtol == pytest.approx(eps / max(float(E.max()) for E in graph.edges))
    assert abs(cut_cost(graph, truth, eps) - 0.5 * math.log(E_c / eps)) < 1e-12


def weak_link(seed, a_to_b=True, strength=1e-2):
    """``planted`` 4 + 4 per node with one weak edge between the modules, node 0 → node 1."""
    graph, truth = planted([4, 4, 4], [4, 4, 4], seed=seed)
    j = next(d for d in range(8) if truth[d] == (0 if a_to_b else 1))
    i = next(d for d in range(8) if truth[8 + d] == (1 if a_to_b else 0))
    graph.edges[0][i, j] = strength
    return graph, truth


def test_metis_alone_finds_the_weak_edge(monkeypatch):
    monkeypatch.setattr(modules_module, "_MIN_CUT_MAX_WORK", 0)  # no Stoer–Wagner: METIS must do it
    graph, truth = weak_link(seed=2, a_to_b=False)
    result = find_modules(graph, eps=1e-4, balance=0.0, seed=3)
    assert result.bisections[0].method == "metis" and not result.optimal and result.search == "metis"
    assert same_partition(result.assignment, truth)
    assert abs(result.cut_cost - 0.5 * math.log(1e-2 / 1e-4)) < 1e-12
    record = result.to_dict()["bisections"][0]["metis"]
    assert record["runs"] == 8 and record["resolution"] > 0 and record["moved"] == 0


def test_kernighan_lin_fallback_finds_the_weak_edge_without_pymetis(monkeypatch):
    monkeypatch.setattr(modules_module, "_MIN_CUT_MAX_WORK", 0)
    monkeypatch.setitem(sys.modules, "pymetis", None)  # `import pymetis` raises ImportError
    graph, truth = weak_link(seed=2, a_to_b=False)
    with pytest.warns(RuntimeWarning, match="pymetis could not be imported"):
        result = find_modules(graph, eps=1e-4, balance=0.0, seed=3)
    assert result.bisections[0].method == "kernighan_lin" and not result.optimal
    assert result.search == "kernighan_lin" and "pymetis could not be imported" in result.search_meaning
    assert same_partition(result.assignment, truth)
    assert abs(result.cut_cost - 0.5 * math.log(1e-2 / 1e-4)) < 1e-12


def _graph_case(name):
    """The graphs of this file's module tests, by name, with the arguments they are searched with."""
    if name == "planted":
        return planted([4, 4, 4], [4, 4, 4])[0], {"eps_rtol": 1e-3}
    if name == "weak_link":
        return weak_link(seed=1)[0], {"eps": 1e-4}
    if name == "weak_link_exact_halves":
        return weak_link(seed=2, a_to_b=False)[0], {"eps": 1e-4, "balance": 0.0, "seed": 3}
    if name in ("unbalanced", "unbalanced_exact_halves"):
        return planted([5, 5, 4], [3, 3, 4])[0], {"eps_rtol": 1e-3, "balance": 0.2 if name == "unbalanced" else 0.0}
    if name == "free_vertices":
        return planted([5, 5, 4], [2, 2, 2], free=(2, 1, 1))[0], {"eps_rtol": 1e-3}
    if name == "too_unequal":
        return planted([6, 6, 6], [2, 2, 2])[0], {"eps_rtol": 1e-3}
    if name == "four_modules":
        return four_modules()[0], {"eps_rtol": 1e-3, "n_modules": 4}
    if name == "by_hand":
        return InteractionGraph("pca", ["a", "b"], [f64([[1.0, 0.5], [0.25, 2.0]])]), {}
    if name == "all_zero":
        return InteractionGraph("random", ["a", "b", "c"], [torch.zeros(3, 4, dtype=torch.float64),
                                                            torch.zeros(2, 3, dtype=torch.float64)]), {}
    if name == "random_comparison":
        graph, _ = planted([4, 4, 4], [4, 4, 4], seed=4)
        graph.edges[1][0, 0] = max(float(graph.edges[1][0, 0]), 1e-2)
        return graph, {"eps": 1e-4}
    assert name.startswith("sweep_")
    return weak_link(seed=6)[0], {"eps_rtol": float(name.removeprefix("sweep_"))}


GRAPH_CASES = ["planted", "weak_link", "weak_link_exact_halves", "unbalanced", "unbalanced_exact_halves",
               "free_vertices", "too_unequal", "four_modules", "by_hand", "all_zero", "random_comparison",
               *(f"sweep_{r:g}" for r in (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 2e-2, 1e-1))]


@pytest.mark.parametrize("stoer_wagner", [True, False])
@pytest.mark.parametrize("name", GRAPH_CASES)
def test_metis_search_equals_the_kernighan_lin_search_on_every_module_test_graph(monkeypatch, name, stoer_wagner):
    """The search before METIS (components, Stoer–Wagner, Kernighan–Lin: today's fallback) and the search
    with METIS give the same modules on every graph of these tests; without Stoer–Wagner, every split
    that is not a zero-cost packing is METIS's or KL's alone, and they still agree."""
    if not stoer_wagner:
        monkeypatch.setattr(modules_module, "_MIN_CUT_MAX_WORK", 0)
    graph, kwargs = _graph_case(name)
    metis = find_modules(graph, **kwargs)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "pymetis", None)
        with pytest.warns(RuntimeWarning, match="pymetis could not be imported"):
            kl = find_modules(graph, **kwargs)
    assert (metis.search, kl.search) == ("metis", "kernighan_lin")
    assert metis.assignment == kl.assignment and metis.module_sizes == kl.module_sizes
    assert metis.cut_cost == pytest.approx(kl.cut_cost, rel=1e-12, abs=1e-15)
    heuristic = {b.method for b in metis.bisections} - {"components", "min_cut"}
    assert heuristic <= {"metis"} and ({b.method for b in kl.bisections} - {"components", "min_cut"}) <= \
        {"kernighan_lin"}
    if not stoer_wagner and metis.cut_cost > 0:
        assert heuristic == {"metis"}  # METIS itself found these modules


def test_unbalanced_components_within_the_bound():
    graph, truth = planted([5, 5, 4], [3, 3, 4])  # 14 : 10 of 24; β = 0.2 allows 10 … 14
    result = find_modules(graph, 1e-3, balance=0.2)
    assert same_partition(result.assignment, truth) and result.cut_cost == 0.0
    assert sorted(result.module_sizes) == [10, 14] and result.bisections[0].allowed == (10, 14)
    # β = 0 forces 12 : 12, so a module must be cut
    exact = find_modules(graph, 1e-3, balance=0.0)
    assert exact.module_sizes == [12, 12] and exact.cut_cost > 0


def test_free_vertices_balance_a_zero_cut():
    graph, truth = planted([5, 5, 4], [2, 2, 2], free=(2, 1, 1))  # components 14 and 6, four free
    result = find_modules(graph, 1e-3, balance=0.2)
    assert result.cut_cost == 0.0 and sorted(result.module_sizes) == [10, 14]
    module_of_a = {label for label, t in zip(result.assignment, truth) if t == 0}
    module_of_rest = {label for label, t in zip(result.assignment, truth) if t != 0}
    assert len(module_of_a) == 1 and module_of_rest.isdisjoint(module_of_a)


def test_components_too_unequal_to_pack_are_cut_within_the_bound():
    graph, _ = planted([6, 6, 6], [2, 2, 2])  # 18 : 6 does not fit 10 … 14
    result = find_modules(graph, 1e-3, balance=0.2)
    assert result.cut_cost > 0 and 10 <= min(result.module_sizes) <= max(result.module_sizes) <= 14
    assert result.bisections[0].method in ("min_cut", "metis")


def four_modules():
    """Three nodes of 12 directions, four modules of 3 directions per node, zeros across."""
    gen = torch.Generator().manual_seed(5)
    truth_by_node = [torch.arange(4).repeat_interleave(3)[torch.randperm(12, generator=gen)] for _ in range(3)]
    zero = torch.zeros((), dtype=torch.float64)
    edges = [torch.where(t_out[:, None] == t_in[None, :], 0.5 + torch.rand(12, 12, generator=gen, dtype=torch.float64),
                         zero) for t_in, t_out in zip(truth_by_node[:-1], truth_by_node[1:])]
    return InteractionGraph("standard", ["a", "b", "c"], edges), torch.cat(truth_by_node).tolist()


def test_four_planted_modules():
    graph, truth = four_modules()
    result = find_modules(graph, 1e-3, n_modules=4)
    assert same_partition(result.assignment, truth)
    assert result.cut_cost == 0.0 and result.module_sizes == [9, 9, 9, 9] and len(result.bisections) == 3


def test_cut_cost_by_hand_and_monotone_in_eps():
    graph = InteractionGraph("pca", ["a", "b"], [f64([[1.0, 0.5], [0.25, 2.0]])])
    # vertices: a0, a1, b0, b1; modules {a0, b0} and {a1, b1} cut E[0, 1] = 0.5 and E[1, 0] = 0.25
    eps = 0.3
    assert cut_cost(graph, [0, 1, 0, 1], eps) == pytest.approx(0.5 * math.log(0.5 / 0.3), abs=1e-15)
    assert cut_cost(graph, [0, 0, 0, 0], eps) == 0.0
    costs = [cut_cost(graph, [0, 1, 1, 0], e) for e in (1e-6, 1e-3, 0.1, 0.6, 5.0)]
    assert all(a > b for a, b in zip(costs, costs[1:-1])) and costs[-1] == 0.0
    assert torch.equal(edge_costs(torch.zeros(2, 2, dtype=torch.float64), 0.0), torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError):
        cut_scale(graph, eps=0.0)


def test_all_zero_graph():
    graph = InteractionGraph("random", ["a", "b", "c"], [torch.zeros(3, 4, dtype=torch.float64),
                                                         torch.zeros(2, 3, dtype=torch.float64)])
    result = find_modules(graph)
    assert result.cut_cost == 0.0 and result.eps == 0.0 and result.eps_rtol == 1e-3
    assert sorted(result.module_sizes) == [4, 5]
    json.dumps(result.to_dict())


def test_random_partitions_cost_more_than_the_found_one():
    graph, truth = planted([4, 4, 4], [4, 4, 4], seed=4)
    graph.edges[1][0, 0] = max(float(graph.edges[1][0, 0]), 1e-2)  # at most a weak link, maybe inside a module
    result = find_modules(graph, eps=1e-4)
    rand = random_partition_costs(graph, result.eps, result.module_sizes, n=300, seed=0, found=result.cut_cost)
    assert float(rand.costs.min()) > result.cut_cost and rand.quantile == 0.0
    # the batched cost is the same function as cut_cost
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 12 + [1] * 12)[torch.randperm(24, generator=gen)]
    one = random_partition_costs(graph, result.eps, [12, 12], n=1, seed=7)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(7))
    assert float(one.costs[0]) == pytest.approx(cut_cost(graph, torch.tensor([0] * 12 + [1] * 12)[perm], 1e-4),
                                                rel=1e-12)
    assert cut_cost(graph, labels, 1e-4) > 0
    summary = rand.to_dict()
    json.dumps(summary)
    assert summary["n"] == 300 and summary["min"] <= summary["mean"] <= summary["max"]


def test_sweep_follows_the_weak_edge_and_is_monotone():
    """As ε grows every edge's cost ½ log(E/ε) falls, so for a fixed partition the cost and the number of
    costly edges cannot grow. With one weak link E_c (every other edge ≥ 0.5 > max ε of the grid), the
    optimum is that link: ½ log(E_c/ε) while ε < E_c, then 0 — and the search is exact on this graph."""
    graph, truth = planted([4, 4, 4], [4, 4, 4], seed=6)
    j = next(d for d in range(8) if truth[d] == 0)
    i = next(d for d in range(8) if truth[8 + d] == 1)
    E_c = 1e-2
    graph.edges[0][i, j] = E_c
    top = max(float(E.max()) for E in graph.edges)
    grid = [1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 2e-2, 1e-1]
    rows = module_sweep(graph, grid, n_random=50)
    json.dumps(rows)
    costs = [r["cut_cost"] for r in rows]
    expected = [max(0.0, 0.5 * math.log(E_c / (rtol * top))) for rtol in grid]
    assert costs == pytest.approx(expected, abs=1e-12)
    assert all(a >= b for a, b in zip(costs, costs[1:]))
    positives = [r["n_positive_edges"] for r in rows]
    assert all(a >= b for a, b in zip(positives, positives[1:]))
    means = [r["random"]["mean"] for r in rows]  # same seed: the same random partitions at every ε
    assert all(a >= b for a, b in zip(means, means[1:]))
    assert all(r["random"]["min"] > r["cut_cost"] for r in rows)
    assert [r["eps_rtol"] for r in rows] == grid and all(r["eps"] == pytest.approx(g * top) for r, g in zip(rows, grid))


# --------------------------------------------------------------------------- plots

def pixel_variance(path) -> float:
    image = matplotlib.image.imread(str(path))
    return float(image[..., :3].var())


def test_plots_are_non_blank(tmp_path):
    graph, truth = planted([4, 4, 4], [4, 4, 4])
    graph.edges[0][0, 0] = 1e-2
    result = find_modules(graph, eps=1e-4)
    zero = InteractionGraph("pca", ["n0", "n1", "n2"], [torch.zeros(8, 8, dtype=torch.float64),
                                                        torch.zeros(8, 8, dtype=torch.float64)])
    single = InteractionGraph("standard", ["only"], [])
    paths = [
        plot_layered_graph(graph, tmp_path / "graph_modules.png", modules=result, top=50),
        plot_layered_graph(graph, tmp_path / "graph_labels.png", modules=truth),
        plot_layered_graph(graph, tmp_path / "graph.png"),
        plot_layered_graph(zero, tmp_path / "zero.png"),
        plot_layered_graph(single, tmp_path / "single.png"),
        plot_lorenz({"interaction": graph, "pca": zero}, tmp_path / "lorenz.png"),
        plot_lorenz({}, tmp_path / "lorenz_empty.png"),
        plot_ablation([
            {"hook": "blocks.0.hook_resid_pre", "basis": "interaction", "k": [1, 2, 4],
             "behavioral_loss": [1.0, 0.1, 0.0], "ce_increase": [0.5, 0.05, -0.001]},
            {"hook": "blocks.0.hook_resid_pre", "basis": "pca", "k": [1, 2, 4], "behavioral_loss": [2.0, 0.5, 0.01],
             "ce_increase": [0.9, None, float("nan")]},
            {"hook": "blocks.1.hook_resid_pre", "basis": "random", "k": [1, 8, 64], "behavioral_loss": [3.0, 1.0, 0.5],
             "ce_increase": [1.0, 0.5, 0.1]},
        ], tmp_path / "ablation.png"),
        plot_ablation([], tmp_path / "ablation_empty.png"),
    ]
    for path in paths:
        assert path.exists() and pixel_variance(path) > 1e-4, path.name
    # the graph plot draws edges: it differs from the plot of the all-zero graph beyond its dots
    assert pixel_variance(tmp_path / "graph.png") > pixel_variance(tmp_path / "zero.png")
