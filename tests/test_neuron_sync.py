"""Synchronized MLP neurons: planted blocks, dead neurons, dense references."""
from __future__ import annotations

import pytest
import torch

from tl_degeneracy import NeuronSync, Stats, collect
from tl_degeneracy.generations import model_from_tl_state_dict
from tl_degeneracy.sync import neurons as ns
from tl_degeneracy.testing import random_tl_state_dict, tiny_config

D_MLP, VOCAB, CTX = 32, 23, 12
HOOK = "blocks.0.hook_resid_pre"


def build(seed: int = 0, edit=None, device=None, **cfg_overrides):
    cfg = tiny_config(d_mlp=D_MLP, d_vocab=VOCAB, n_ctx=CTX, **cfg_overrides)
    sd = random_tl_state_dict(cfg, seed)
    if edit is not None:
        edit(sd, cfg)
    return model_from_tl_state_dict(cfg, sd, dtype=torch.float64, device=device)


def tokens(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CTX), generator=torch.Generator().manual_seed(seed))


def plant(sd, cfg):
    """Layer 0: 1 duplicates 0, 2 is 0 scaled by 2.5; 5 and 9 dead; 10–12 always on (never 0)."""
    W, b = sd["blocks.0.mlp.W_in"], sd["blocks.0.mlp.b_in"]  # [d_model, d_mlp], [d_mlp]
    W[:, 1], b[1] = W[:, 0], b[0]
    W[:, 2], b[2] = 2.5 * W[:, 0], 2.5 * b[0]
    for j in (5, 9):
        W[:, j], b[j] = 0.0, -1.0
    W[:, 10:13] *= 0.1  # |w·x| < 1 on LayerNorm'd inputs (|x| = √d_model) ...
    b[10:13] = 1.0  # ... so p > 0 on every datapoint: r ≡ 1 for ReLU, preactivations independent


def dense_cost(model, toks, layer, mask):
    """c_ij = E[((r_i − r_j) p_j)²] / E[f_j²] straight from run_with_cache (the reference)."""
    _, cache = model.run_with_cache(toks.to(mask.device))
    p = cache[f"blocks.{layer}.mlp.hook_pre"][mask].to(torch.float64)
    f = cache[f"blocks.{layer}.mlp.hook_post"][mask].to(torch.float64)
    r = torch.where(p == 0, torch.ones_like(p), f / p)
    num = ((r[:, :, None] - r[:, None, :]) * p[:, None, :]).square().mean(0)
    return num / f.square().mean(0)[None, :]


@pytest.mark.models
def test_streamed_cost_matches_dense_reference(device):
    model = build(seed=2, device=device)  # GELU
    toks = tokens()
    positions = [0, 2, 5, -1]
    stats = collect(model, toks, HOOK, positions=positions, batch_size=5, observers=[NeuronSync()], progress=False)
    mask = torch.zeros(toks.shape, dtype=torch.bool, device=device)
    mask[:, [0, 2, 5, CTX - 1]] = True
    for layer in (0, 1):
        got = ns.neuron_sync_matrices(stats, layer)
        ref = dense_cost(model, toks, layer, mask)
        assert got.n == int(mask.sum())
        assert (got.cost - ref).abs().max() <= 1e-10 * ref.abs().max()
        _, cache = model.run_with_cache(toks.to(device))
        p = cache[f"blocks.{layer}.mlp.hook_pre"][mask]
        assert torch.allclose(got.preact_gram, p.T @ p / p.shape[0], rtol=1e-12, atol=1e-14)
        assert torch.equal(got.fires, (p > 0).sum(0))


@pytest.mark.models
def test_planted_relu_blocks_span_and_dead_neurons(tmp_path, device):
    model = build(edit=plant, act_fn="relu", device=device)
    stats = collect(model, tokens(), HOOK, observers=[NeuronSync()], batch_size=10, progress=False)
    result = ns.synchronized_neurons(stats, threshold=1e-3, model=model)
    layer0 = result.layers[0]
    assert layer0.dead == [5, 9]
    blocks = {tuple(b.neurons): b for b in layer0.blocks}
    assert set(blocks) == {(0, 1, 2), (10, 11, 12)}
    dup = blocks[(0, 1, 2)]
    assert dup.s_a == 1 and dup.worst_cost < 1e-12  # one preactivation up to positive scale
    on = blocks[(10, 11, 12)]
    assert on.s_a == 3 and on.worst_cost < 1e-12  # always-on neurons: synchronized, independent p
    d_live = D_MLP - 2
    assert layer0.d_live == d_live
    # Σ s_a²: 1 + 9 + one per remaining singleton.
    assert layer0.sum_s_squared == 1 + 9 + (d_live - 6)
    assert layer0.sum_s_squared_minus_d == 1 + 9 + (d_live - 6) - d_live
    assert layer0.added_freedoms == 9 - 3
    # The random second layer has nothing planted.
    assert result.layers[1].blocks == [] and result.layers[1].dead == []
    # Costs outside the planted blocks are far above the threshold.
    cost = ns.neuron_sync_matrices(stats, 0).cost
    live_random = [j for j in range(D_MLP) if j not in (0, 1, 2, 5, 9, 10, 11, 12)]
    sub = cost[live_random][:, live_random]
    off_diagonal = ~torch.eye(len(live_random), dtype=torch.bool, device=sub.device)
    assert torch.maximum(sub, sub.T)[off_diagonal].min() > 1e-2

    again = ns.SynchronizedNeurons.from_dict(result.to_dict())
    assert again == result
    stats.save(tmp_path / "n.safetensors")
    loaded = Stats.load(tmp_path / "n.safetensors")
    assert ns.synchronized_neurons(loaded, threshold=1e-3) == result


@pytest.mark.models
def test_gelu_duplicate_is_synchronized_but_rescaled_copy_is_not(device):
    # GELU's firing pattern Φ(p) is not scale invariant, unlike ReLU's step.
    model = build(edit=plant, act_fn="gelu", device=device)
    stats = collect(model, tokens(), HOOK, observers=[NeuronSync(layers=[0])], progress=False)
    result = ns.synchronized_neurons(stats, 0, threshold=1e-3)
    assert [b.neurons for b in result.layers[0].blocks if 0 in b.neurons] == [[0, 1]]
    assert result.layers[0].blocks[0].s_a == 1
    cost = ns.neuron_sync_matrices(stats, 0).cost
    assert cost[0, 1] < 1e-12 and cost[1, 0] < 1e-12
    assert min(cost[0, 2], cost[2, 0]) > 1e-3
    # p ≡ −1 never fires, but GELU(−1) ≈ −0.159 is an output: not dead (E[f²] is not ≈ 0). The two
    # constant neurons share r ≡ Φ(−1) and one linear part: a synchronized block of span 1.
    mats = ns.neuron_sync_matrices(stats, 0)
    assert mats.fires[5] == mats.fires[9] == 0
    assert result.layers[0].dead == []
    assert [b.neurons for b in result.layers[0].blocks if 5 in b.neurons] == [[5, 9]]
    assert next(b for b in result.layers[0].blocks if 5 in b.neurons).s_a == 1
    torch.testing.assert_close(mats.f2[5], torch.nn.functional.gelu(torch.tensor(-1.0, dtype=torch.float64)) ** 2)


@pytest.mark.models
def test_missing_statistics_say_how_to_collect():
    model = build()
    stats = collect(model, tokens(4), HOOK, progress=False)
    with pytest.raises(KeyError, match=r"observers=\[NeuronSync\(\)\]"):
        ns.synchronized_neurons(stats)
    with pytest.raises(ValueError, match="do not exist"):
        collect(model, tokens(4), HOOK, observers=[NeuronSync(layers=[7])], progress=False)
