"""Direction budgets: top-k / mass per node, the rest vertex, pooled forward-mode passes, the cost estimate.

The references are the full graph's exact edges (themselves tested against ``jacrev`` in
test_interaction_edges.py): with every direction kept a budgeted pass must return them; with fewer,
its kept block must be their kept block and its rest row and column their sums over the rest.
"""
from __future__ import annotations

import json
import statistics

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.interactions import collect_edges, node_bases, sparsity_table
from tl_degeneracy.interactions.edges import (
    EdgeConfig,
    capture_nodes,
    estimate_edge_cost,
    forward_jobs,
    pair_segment,
)
from tl_degeneracy.interactions.graph import DirectionBudget, InteractionGraph, load_graphs, save_graphs
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models
NODES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
TOKENS = torch.randint(0, 23, (6, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def bases(model):
    stats = tld.collect(model, TOKENS, NODES, jacobians=True, progress=False)
    return node_bases(stats, NODES)


@pytest.fixture(scope="module")
def full(model, bases):
    return collect_edges(model, TOKENS, bases, NODES, exact=True, batch_size=3, progress=False)


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- which directions are kept --------------------------------------------------------------------

def test_selection_by_top_k_and_by_mass():
    importance = f64([1.0, 5.0, 3.0, 0.5, 0.5, 0.0])  # total 10; sorted 5, 3, 1, 0.5, 0.5, 0
    assert DirectionBudget(top_k=2).select(importance) == [1, 2]  # ascending: the basis's own order
    assert DirectionBudget(mass=0.8).select(importance) == [1, 2]  # 5 + 3 = 8 reaches 80% exactly
    assert DirectionBudget(mass=0.81).select(importance) == [0, 1, 2]
    assert DirectionBudget(top_k=2, mass=0.95).select(importance) == [1, 2]  # the smaller set
    assert DirectionBudget(top_k=4).select(importance) == [0, 1, 2, 3]  # a tie: the first in the basis's order
    assert DirectionBudget(mass=1.0).select(importance) == [0, 1, 2, 3, 4]  # a zero-importance direction is not needed
    assert DirectionBudget(top_k=100).select(importance) == list(range(6))
    assert DirectionBudget().keeps_all and not DirectionBudget(top_k=100).keeps_all


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k"), (dict(mass=0.0), "mass"), (dict(mass=1.5), "mass"), (dict(rest="bogus"), "rest"),
    (dict(rest_probes=0), "rest_probes"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DirectionBudget(**kwargs)


# -- the acceptance tests: every direction, and the kept block plus the rest -----------------------

@pytest.mark.parametrize("budget", [DirectionBudget(top_k=16), DirectionBudget(mass=1.0, rest="exact"),
                                    DirectionBudget()], ids=["top_k=d", "mass=1", "none"])
def test_keeping_every_direction_gives_the_full_graph(model, bases, full, budget):
    graphs = collect_edges(model, TOKENS, bases, NODES, exact=True, batch_size=3, budget=budget, progress=False)
    for name, graph in graphs.items():
        assert graph.rest == [0, 0, 0]
        for got, ref in zip(graph.edges, full[name].edges):
            assert got.shape == ref.shape and float(ref.abs().max()) > 0
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def _expected(E, kept_out, kept_in):
    """The budgeted matrix by hand: the kept block, then the rest column, the rest row and rest → rest."""
    rest_out = [i for i in range(E.shape[0]) if i not in kept_out]
    rest_in = [j for j in range(E.shape[1]) if j not in kept_in]
    out = torch.zeros(len(kept_out) + 1, len(kept_in) + 1, dtype=torch.float64)
    for r, i in enumerate(kept_out):
        for c, j in enumerate(kept_in):
            out[r, c] = E[i, j]
        out[r, -1] = sum(E[i, j] for j in rest_in)
    for c, j in enumerate(kept_in):
        out[-1, c] = sum(E[i, j] for i in rest_out)
    out[-1, -1] = sum(E[i, j] for i in rest_out for j in rest_in)
    return out


@pytest.mark.parametrize("method, budget", [
    ("forward", DirectionBudget(top_k=5, rest="exact")),
    ("forward", DirectionBudget(top_k=14, rest_probes=8)),  # a rest of 1-2 directions: computed exactly
    ("backward", DirectionBudget(mass=0.9)),  # the backward pass sees every input direction: rest exact
], ids=["forward-top5-exact-rest", "forward-small-rest", "backward-mass"])
def test_kept_block_is_the_full_block_and_the_rest_carries_the_remainder(model, bases, full, method, budget):
    tokens = TOKENS if method == "forward" else TOKENS[:2]  # T x d backward passes: fewer sequences
    if method != "forward":
        full = collect_edges(model, tokens, bases, NODES, exact=True, batch_size=3, progress=False)
    graphs = collect_edges(model, tokens, bases, NODES, exact=True, method=method, batch_size=3, budget=budget,
                           progress=False)
    for name, graph in graphs.items():
        layers = [bases[name][h] for h in NODES]
        for l, layer in enumerate(layers):
            ranked = torch.argsort(layer.importance, descending=True, stable=True).tolist()
            assert graph.directions[l] == sorted(graph.directions[l])
            assert set(graph.directions[l]) == set(ranked[:len(graph.directions[l])])  # the most important ones
            assert graph.rest[l] == layer.k - len(graph.directions[l]) > 0
        for l, (got, E) in enumerate(zip(graph.edges, full[name].edges)):
            ref = _expected(E, graph.directions[l + 1], graph.directions[l])
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
            assert float(got.sum()) == pytest.approx(float(E.sum()), rel=1e-10)  # no mass dropped or added
        assert set(graph.meta["rest_estimate"]) == {"exact"}


def test_rest_probes_are_unbiased_with_an_honest_standard_error(model, bases, full):
    """Over seeds, the probe estimate of the rest column averages to the exact one; the reported
    standard error matches the spread of the seeds' estimates. The kept block is exact every time."""
    nodes, name = NODES[:2], "pca"
    budget = DirectionBudget(top_k=4, rest_probes=4)  # a rest of 12 directions, 4 probes each
    exact = _expected(full[name].edges[0], list(range(4)), list(range(4)))
    rest_col, errors = [], []
    for seed in range(16):
        graph = collect_edges(model, TOKENS, {name: bases[name]}, nodes, exact=True, batch_size=3, budget=budget,
                              seed=seed, progress=False)[name]
        assert graph.directions[0] == [0, 1, 2, 3] and graph.meta["rest_estimate"] == ["probes"]
        E = graph.edges[0]
        torch.testing.assert_close(E[:, :-1], exact[:, :-1], rtol=1e-10, atol=1e-12)  # kept + rest row: exact
        rest_col.append(float(E[:, -1].sum()))
        errors.append(graph.meta["rest_rel_stderr"][0] * rest_col[-1])
    truth = float(exact[:, -1].sum())
    spread = statistics.stdev(rest_col)
    assert spread > 1e-3 * truth  # the probes do vary between seeds
    assert abs(statistics.mean(rest_col) - truth) < 4 * spread / len(rest_col) ** 0.5
    # the reported error is the seeds' spread (a 4-probe standard deviation averages ~0.92 of the true one;
    # an error off by sqrt(4) would land at 0.5 or 2)
    assert 0.7 < statistics.mean(errors) / spread < 1.4


def test_passes_are_pooled_and_rest_probes_used_only_where_they_save_passes(model, bases):
    budget = DirectionBudget(top_k=5, rest_probes=4)
    config = EdgeConfig.build(model, bases, NODES, exact=True, budget=budget)
    for l in range(2):
        jobs = forward_jobs(config, l)
        ks = [bases[name][NODES[l]].k for name in config.basis_names]
        assert len(jobs) == sum(5 + 4 for _ in ks)  # 5 kept directions and 4 probes for a rest of 10-11
        assert [j.b for j in jobs] == sorted(j.b for j in jobs)  # basis by basis, one pool
    small = EdgeConfig.build(model, bases, NODES, exact=True, budget=DirectionBudget(top_k=13, rest_probes=4))
    assert len(forward_jobs(small, 0)) == sum(bases[name][NODES[0]].k for name in small.basis_names)
    # the run identity names the budget; without one it is what it always was
    assert config.to_dict()["budget"] == budget.to_dict()
    assert "budget" not in EdgeConfig.build(model, bases, NODES, exact=True, budget=DirectionBudget()).to_dict()


# -- the segment each pass runs through -------------------------------------------------------------

def test_a_whole_block_runs_alone_and_gives_the_model_segments_derivative(model):
    from torch.func import jvp

    nodes = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid",
             "blocks.1.hook_resid_post"]
    stats = tld.collect(model, TOKENS, nodes, jacobians=True, progress=False)
    config = EdgeConfig.build(model, node_bases(stats, nodes, kinds=("pca",)), nodes, exact=True)
    tokens = TOKENS[:2]
    with torch.no_grad():
        captured, calls = capture_nodes(model, tokens, {}, config)
        kinds = []
        for l, (a, b) in enumerate(zip(nodes[:-1], nodes[1:])):
            segment, kind = pair_segment(model, tokens, {}, a, b, captured[a], captured[b], calls.get(l))
            kinds.append(kind)
            tangent = torch.randn(captured[a].shape, generator=torch.Generator().manual_seed(l), dtype=torch.float64)
            got = jvp(segment, (captured[a],), (tangent,))[1]
            ref = jvp(pair_segment(model, tokens, {}, a, b, captured[a], captured[b], None)[0], (captured[a],),
                      (tangent,))[1]
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    assert kinds == ["block", "model", "model"]  # resid_pre → resid_pre is a block; half blocks are not


def test_a_block_call_that_ignores_its_input_is_caught(monkeypatch):
    """A block path right at the data point but blind to the replacement (a hook that does not reach the
    computation) must fall back to the model segment: it is checked once off the data point."""
    from tl_degeneracy.interactions import edges

    fresh = tiny_model(seed=0)  # never checked in this process
    a, b = NODES[:2]
    stats = tld.collect(fresh, TOKENS, NODES, jacobians=True, progress=False)
    config = EdgeConfig.build(fresh, node_bases(stats, NODES, kinds=("pca",)), NODES, exact=True)
    with torch.no_grad():
        captured, calls = capture_nodes(fresh, TOKENS[:2], {}, config)
    real = edges.block_segment

    def blind(model, l, source, call):
        frozen = real(model, l, source, call)(captured[a])
        return lambda x: frozen

    monkeypatch.setattr(edges, "block_segment", blind)
    assert pair_segment(fresh, TOKENS[:2], {}, a, b, captured[a], captured[b], calls.get(0))[1] == "model"
    monkeypatch.setattr(edges, "block_segment", real)
    assert pair_segment(fresh, TOKENS[:2], {}, a, b, captured[a], captured[b], calls.get(0))[1] == "block"


# -- the cost estimate ------------------------------------------------------------------------------

def test_cost_estimate_counts_passes_and_flops_that_scale_with_the_batch(model, bases):
    budget = DirectionBudget(top_k=5, rest_probes=4)
    config = EdgeConfig.build(model, bases, NODES, exact=True, budget=budget)
    one = estimate_edge_cost(model, config, (1, 12), n_batches=3)
    two = estimate_edge_cost(model, config, (2, 12), n_batches=3)
    assert one.passes == (27, 27) and one.total_passes == 3 * 54 and one.segments == ("block", "block")
    assert one.total_flops > 0 and one.total_seconds > 0 and "load average" in one.calibration
    assert two.total_flops / one.total_flops == pytest.approx(2.0, rel=0.05)  # every product is linear in the rows
    text = one.describe()
    assert "162 forward-mode passes" in text and "projected" in text and "TFLOP" in text
    json.dumps(one.to_dict())
    # the chunk follows the memory budget
    tight = EdgeConfig.build(model, bases, NODES, exact=True, budget=budget, chunk_budget_bytes=1)
    assert estimate_edge_cost(model, tight, (1, 12), 1, calibrate=False).chunk == 1
    backward = EdgeConfig.build(model, bases, NODES, exact=True, method="backward")
    assert estimate_edge_cost(model, backward, (2, 12), 1, calibrate=False).passes == (12 * 16, 12 * 16)


# -- the graph format, sparsity and plots with rest vertices ---------------------------------------

def budgeted_graph():
    """Three nodes: 2 kept + a rest of 3, 1 kept + a rest of 2, 2 kept and no rest."""
    edges = [f64([[4.0, 2.0, 6.0], [1.0, 1.0, 2.0]]), f64([[3.0, 1.0], [0.0, 2.0]])]
    return InteractionGraph("interaction", ["a", "b", "c"], edges, [10, 10], {"budget": {"top_k": 2}},
                            directions=[[0, 4], [1], [0, 1]], rest=[3, 2, 0])


def test_graph_names_its_rest_vertices_and_round_trips(tmp_path):
    graph = budgeted_graph()
    assert graph.sizes == [3, 2, 2] and graph.rest_vertices() == [2, 4]
    assert graph.rest_index(0) == 2 and graph.rest_index(2) is None
    assert [graph.direction(0, j) for j in range(3)] == [0, 4, None]
    assert graph.kept_block(0).tolist() == [[4.0, 2.0]] and graph.rest_mass(0) == 10.0
    assert graph.kept_block(1).tolist() == [[3.0], [0.0]] and graph.rest_mass(1) == 3.0
    save_graphs({"interaction": graph}, tmp_path / "g.safetensors", {"run": None})
    back = load_graphs(tmp_path / "g.safetensors")["interaction"]
    assert back.directions == graph.directions and back.rest == graph.rest and back.meta["budget"] == {"top_k": 2}
    for a, b in zip(back.edges, graph.edges):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="kept directions"):
        InteractionGraph("x", ["a", "b"], [f64([[1.0, 2.0]])], directions=[[0, 1], [0]], rest=[1, 0])
    with pytest.raises(ValueError, match="must name its kept directions"):
        InteractionGraph("x", ["a", "b"], [f64([[1.0, 2.0]])], rest=[1, 0])


def test_sparsity_is_measured_among_kept_directions_with_the_rest_share_beside():
    rows = sparsity_table(budgeted_graph())
    json.dumps(rows)
    first, second = rows
    assert (first["k_in"], first["k_out"], first["n_edges"], first["rest_in"], first["rest_out"]) == (2, 1, 2, 3, 2)
    assert first["total"] == 16.0 and first["rest_share"] == pytest.approx(10 / 16)
    assert first["fractions"]["0.5"] == 0.5 and first["gini"] == pytest.approx(1 / 6)  # over [4, 2] alone
    assert (second["k_in"], second["k_out"], second["rest_in"], second["rest_out"]) == (1, 2, 2, 0)
    assert second["rest_share"] == pytest.approx(3 / 6)


def test_plots_draw_rest_vertices(tmp_path):
    from tl_degeneracy.interactions.plots import plot_layered_graph, plot_lorenz

    graph = budgeted_graph()
    assert plot_layered_graph(graph, tmp_path / "g.png", modules=[0, 1, 1, 0, 1, 0, 1]).stat().st_size > 5_000
    assert plot_lorenz({"interaction": graph}, tmp_path / "l.png").stat().st_size > 5_000
