"""Top-k examples and histograms of basis directions (``DirectionExamples``) against brute force.

Brute force: every datapoint's coordinates from one ``run_with_cache`` over all the data, sorted by
(value descending, datapoint id ascending) — the tie rule — per direction and sign; windows cut from
the token tensor; histograms by ``searchsorted`` on the bin edges. The streamed pass must equal it
exactly, over several batches, after merging rank-like groups of batches in any order, and after a
checkpoint/resume.
"""
from __future__ import annotations

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.basis.bases import InteractionBasis
from tl_degeneracy.collection.accumulators import TopKAccumulator, datapoint_ids
from tl_degeneracy.collection.observers import BatchView
from tl_degeneracy.dashboards import EXAMPLES, DirectionExamples, HistogramBins
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
N_ROWS, T, BATCH = 10, 12, 3


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 23, (N_ROWS, T), generator=torch.Generator().manual_seed(seed))  # tiny d_vocab


@pytest.fixture(scope="module")
def setting():
    model = tiny_model(seed=3)
    tokens = _tokens()
    stats = tld.collect(model, tokens, HOOKS, jacobians=True, batch_size=BATCH, progress=False)
    bases = {"interaction": [InteractionBasis.fit(stats)[h] for h in HOOKS],
             "pca": [InteractionBasis.fit_kind("pca", stats)[h] for h in HOOKS]}
    observer = DirectionExamples.build(bases, n_directions=5, n_examples=7, before=3, after=2, stats=stats)
    streamed = tld.collect(model, tokens, [], observers=[observer], batch_size=BATCH, progress=False)
    return model, tokens, stats, bases, observer, streamed


def _brute_force(model, tokens, layer, idx, observer, scales):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == layer.hook)
    coords = layer.encode(cache[layer.hook].to(torch.float64))[..., list(idx)]  # [N, T, D]
    rows = torch.arange(N_ROWS)
    ids = torch.cat([datapoint_ids(int(b), len(rows[rows // BATCH == b]), T) for b in range(-(-N_ROWS // BATCH))])
    a, flat_ids = coords.reshape(-1, len(idx)), ids.reshape(-1)
    padded_tokens = torch.nn.functional.pad(tokens, (observer.before, observer.after), value=-1)
    padded = torch.nn.functional.pad(coords.permute(0, 2, 1), (observer.before, observer.after), value=torch.nan)
    expected = []
    for i in range(len(idx)):
        for sign in (1.0, -1.0):
            v = sign * a[:, i]
            keys = sorted(range(len(v)), key=lambda n: (-float(v[n]), int(flat_ids[n])))[: observer.n_examples]
            b, t = [n // T for n in keys], [n % T for n in keys]
            expected.append({
                "values": v[keys], "ids": flat_ids[keys],
                "records": torch.stack([padded_tokens[bb, tt:tt + observer.width] for bb, tt in zip(b, t)]),
                "window": torch.stack([padded[bb, i, tt:tt + observer.width] for bb, tt in zip(b, t)]),
            })
    edges = observer.bins.edges()
    s = torch.tensor(scales, dtype=torch.float64)
    counts = torch.zeros(len(idx), 2, observer.bins.n_bins, dtype=torch.int64)
    for i in range(len(idx)):
        r = a[:, i].abs() / s[i]
        bins = torch.searchsorted(edges, r, right=True)  # 0 below the first edge, len(edges) at/above the last
        for sign_index, chosen in ((0, a[:, i] >= 0), (1, a[:, i] < 0)):
            counts[i, sign_index] = torch.bincount(bins[chosen], minlength=observer.bins.n_bins)
    return expected, counts, a


def test_streamed_examples_equal_brute_force(setting):
    model, tokens, stats, bases, observer, streamed = setting
    for (name, layers), dirs, scales in zip(observer.bases, observer.directions, observer.scales):
        for layer, idx, s in zip(layers, dirs, scales):
            top = streamed.accumulator(EXAMPLES, f"{name}:{layer.hook}")
            hist = streamed.accumulator(EXAMPLES, f"{name}:{layer.hook}#histogram")
            expected, counts, a = _brute_force(model, tokens, layer, idx, observer, s)
            for row, want in enumerate(expected):
                for field in ("values", "ids", "records"):
                    assert torch.equal(top.tensors[field][row], want[field].to(top.tensors[field])), (name, row, field)
                torch.testing.assert_close(top.tensors["window"][row], want["window"], equal_nan=True, rtol=0, atol=0)
            assert torch.equal(hist.tensors["counts"], counts)
            torch.testing.assert_close(hist.tensors["s2"], a.square().sum(0), rtol=1e-12, atol=0)
            assert int(hist.tensors["n"]) == N_ROWS * T


def test_directions_are_the_most_important_and_scales_the_coordinate_rms(setting):
    model, tokens, _, _, observer, _ = setting
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in HOOKS)
    for (_, layers), dirs, scales in zip(observer.bases, observer.directions, observer.scales):
        for layer, idx, s in zip(layers, dirs, scales):
            assert list(idx) == torch.argsort(layer.importance, descending=True)[:5].tolist()
            # the RMS from the sums equals the RMS of the coordinates themselves over the same data
            coords = layer.encode(cache[layer.hook].to(torch.float64))[..., list(idx)]
            rms = coords.reshape(-1, len(idx)).square().mean(0).sqrt()
            torch.testing.assert_close(torch.tensor(s, dtype=torch.float64), rms, rtol=1e-8, atol=1e-10)


def test_rank_groups_merge_exactly_in_any_order(setting):
    """Batches split like two ranks (even / odd), each group merged, then the groups: the one-pass result."""
    model, tokens, _, _, observer, streamed = setting
    resolved = observer.resolve(model)
    groups: list[dict] = [{}, {}]
    for b in range(-(-N_ROWS // BATCH)):
        rows = tokens[b * BATCH:(b + 1) * BATCH]
        with torch.no_grad():
            _, cache = model.run_with_cache(rows, names_filter=lambda n: n in resolved.hooks())
        mask = torch.ones(rows.shape, dtype=torch.bool)
        for key, acc in resolved.compute(dict(cache.items()), mask, BatchView(rows, b)):
            group = groups[b % 2]
            group[key] = acc if key not in group else group[key].add_(acc)
    for first, second in ((0, 1), (1, 0)):
        for key, one_pass in streamed.accumulators.items():
            merged = groups[first][key].copy().add_(groups[second][key])
            if key[1].endswith("#histogram"):  # counts exactly; float64 sums up to their summation order
                assert torch.equal(merged.tensors["counts"], one_pass.tensors["counts"]), key
                torch.testing.assert_close(merged.tensors["s2"], one_pass.tensors["s2"], rtol=1e-13, atol=0)
            else:
                assert merged == one_pass, key


def test_topk_tie_rule_and_padding():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    ids = torch.tensor([[5, 9, 2, 1, 4]])
    records = torch.arange(5)[None, :, None]
    top = TopKAccumulator.select(values, ids, records, 3)
    assert top.tensors["values"].tolist() == [[3.0, 3.0, 3.0]] and top.tensors["ids"].tolist() == [[2, 4, 9]]
    assert top.tensors["records"][0, :, 0].tolist() == [2, 4, 1]  # records travel with their entries
    padded = TopKAccumulator.select(values[:, :2], ids[:, :2], records[:, :2], 4)
    assert padded.tensors["ids"].tolist() == [[9, 5, -1, -1]] and padded.tensors["values"][0, 2] == -torch.inf
    # merging is "top k of both", whatever the order
    a = TopKAccumulator.select(values[:, :3], ids[:, :3], records[:, :3], 3)
    b = TopKAccumulator.select(values[:, 3:], ids[:, 3:], records[:, 3:], 3)
    assert a.copy().add_(b) == b.copy().add_(a) == top


def test_histogram_bins_put_edges_in_the_bin_above():
    bins = HistogramBins(lo=-1, hi=1, per_decade=1)
    r = torch.tensor([0.0, 0.05, 0.1, 0.5, 1.0, 9.99, 10.0, 1e6], dtype=torch.float64)
    assert bins.index(r).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert bins.n_bins == 4 and bins.bin_of_edge(1.0) == 2


def test_padding_positions_are_never_examples():
    model = tiny_model(seed=3)
    tokens = _tokens(1)[:4]
    attention = torch.ones_like(tokens)
    attention[0, :5] = 0  # left padding in the first row
    stats = tld.collect(model, tokens, HOOKS[:1], progress=False)
    basis = InteractionBasis.fit_kind("pca", stats)
    obs = DirectionExamples.build({"pca": [basis[HOOKS[0]]]}, n_directions=3, n_examples=40, stats=stats)
    got = tld.collect(model, [{"tokens": tokens, "attention_mask": attention}], [], observers=[obs], progress=False)
    top = got.accumulator(EXAMPLES, f"pca:{HOOKS[0]}")
    positions = top.tensors["ids"] & 0xFFFF
    rows = (top.tensors["ids"] >> 16) & 0xFFFF
    valid = top.tensors["ids"] >= 0
    assert not ((rows == 0) & (positions < 5) & valid).any()
    assert int(got.accumulator(EXAMPLES, f"pca:{HOOKS[0]}#histogram").tensors["n"]) == 4 * T - 5
