"""Synchronized attention heads: planted structure, dense references, streaming invariants."""
from __future__ import annotations

import pytest
import torch

from tl_degeneracy import HeadSync, Stats, collect
from tl_degeneracy.generations import model_from_tl_state_dict
from tl_degeneracy.sync import heads as hs
from tl_degeneracy.testing import random_tl_state_dict, tiny_config

N_HEADS, D_HEAD, D_MODEL, VOCAB, CTX = 4, 4, 16, 23, 12


def build(seed: int = 0, edit=None, device=None, **cfg_overrides):
    cfg = tiny_config(n_heads=N_HEADS, d_head=D_HEAD, d_model=D_MODEL, d_vocab=VOCAB, n_ctx=CTX, **cfg_overrides)
    sd = random_tl_state_dict(cfg, seed)
    if edit is not None:
        edit(sd, cfg)
    return model_from_tl_state_dict(cfg, sd, dtype=torch.float64, device=device)


def tokens(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CTX), generator=torch.Generator().manual_seed(seed))


def copy_qk_head0_into_head1(sd, cfg):
    for name in ("W_Q", "W_K", "b_Q", "b_K"):
        sd[f"blocks.0.attn.{name}"][1] = sd[f"blocks.0.attn.{name}"][0]


def dense_head_stats(model, toks, layer, mask):
    """D_hh' and mean TV straight from run_with_cache (the reference)."""
    _, cache = model.run_with_cache(toks.to(mask.device))
    A = cache[f"blocks.{layer}.attn.hook_pattern"].to(torch.float64)  # [b, h, q, k]
    rows = A.permute(0, 2, 1, 3)[mask]  # [n, h, k]
    diff = rows[:, :, None, :] - rows[:, None, :, :]
    return diff.square().sum(-1).mean(0), 0.5 * diff.abs().sum(-1).mean(0)


# -- no model --------------------------------------------------------------------------------------

def test_accumulator_matches_dense_and_is_chunk_invariant(monkeypatch, device):
    g = torch.Generator().manual_seed(0)
    pattern = torch.softmax(torch.randn(3, 5, 7, 7, generator=g, dtype=torch.float64), -1).to(device)
    mask = (torch.rand(3, 7, generator=g) > 0.3).to(device)
    pattern.permute(0, 2, 1, 3)[~mask] = float("nan")  # rows outside the mask (padding) may be NaN
    whole = hs.HeadSyncAccumulator.from_batch(pattern, mask)
    monkeypatch.setattr(hs, "_CHUNK_ELEMENTS", 3 * 5 * 7 * 2)  # two query rows per chunk
    chunked = hs.HeadSyncAccumulator.from_batch(pattern, mask)
    for field in ("gram", "tv"):
        assert torch.allclose(whole.tensors[field], chunked.tensors[field], rtol=1e-13, atol=0)
    rows = pattern.permute(0, 2, 1, 3)[mask]
    assert int(whole.tensors["n"]) == rows.shape[0]
    assert torch.allclose(whole.tensors["gram"], torch.einsum("nhk,ngk->hg", rows, rows), rtol=1e-13, atol=0)
    tv = 0.5 * (rows[:, :, None] - rows[:, None]).abs().sum(-1).sum(0)
    assert torch.allclose(whole.tensors["tv"], tv, rtol=1e-13, atol=1e-15)


def test_blocks_components_vs_complete_linkage():
    # 0–1 and 1–2 close, 0–2 far: a chain. 3 alone.
    d = torch.tensor([[0, .01, .09, .5], [.01, 0, .02, .5], [.09, .02, 0, .5], [.5, .5, .5, 0]], dtype=torch.float64)
    assert hs.blocks_below(d, 0.05, "components") == [[0, 1, 2]]
    assert hs.worst_within(d, [0, 1, 2]) == pytest.approx(0.09)
    assert hs.blocks_below(d, 0.05, "complete") == [[0, 1]]
    assert hs.blocks_below(d, 0.001) == []
    assert hs.blocks_below(d, 1.0) == [[0, 1, 2, 3]]


# -- models ----------------------------------------------------------------------------------------

@pytest.mark.models
def test_planted_pair_is_exactly_that_pair_and_matches_dense_reference(device):
    model = build(edit=copy_qk_head0_into_head1, device=device)
    toks = tokens()
    positions = torch.zeros(CTX, dtype=torch.bool)
    positions[[0, 3, 4, 7, 11]] = True  # a position subset: the datapoint mask must be honoured
    stats = collect(model, toks, "blocks.0.hook_resid_pre", positions=positions, batch_size=7,
                    observers=[HeadSync()], progress=False)
    for layer in (0, 1):
        got = hs.head_sync_matrices(stats, layer)
        D, TV = dense_head_stats(model, toks, layer, positions.expand(toks.shape[0], CTX).to(device))
        assert got.n == toks.shape[0] * int(positions.sum())
        assert (got.distance - D).abs().max() <= 1e-10 * D.abs().max()
        assert (got.tv - TV).abs().max() <= 1e-10 * TV.abs().max()

    result = hs.synchronized_heads(stats, threshold=0.05, model=model)
    assert [(b.layer, b.heads) for b in result.blocks] == [(0, [0, 1])]
    assert result.blocks[0].worst_distance < 1e-12
    assert hs.head_sync_matrices(stats, 0).distance[0, 1] < 1e-12
    # Other pairs are far from synchronized: the threshold has room on both sides.
    tv0 = hs.head_sync_matrices(stats, 0).tv
    assert tv0[~torch.eye(N_HEADS, dtype=torch.bool, device=tv0.device)].sort().values[2] > 0.1
    assert result.freedoms_per_layer == {0: 2 * D_HEAD**2, 1: 0}
    assert result.meaning and result.threshold == 0.05
    again = hs.SynchronizedHeads.from_dict(result.to_dict())
    assert again == result


@pytest.mark.models
def test_random_model_has_no_synchronized_pair(device):
    model = build(seed=3, device=device)
    stats = collect(model, tokens(), "blocks.0.hook_resid_pre", observers=[HeadSync()], progress=False)
    result = hs.synchronized_heads(stats, threshold=0.05)
    assert result.blocks == [] and result.total_freedoms == 0
    for metric in ("tv", "squared"):
        assert hs.synchronized_heads(stats, threshold=0.02, metric=metric).blocks == []


def attend_to_first_token(sd, cfg):
    """Layer 0, every head: the query is a constant c·e_0 and only position 0's key has a k_0 component.

    Residual coordinate ``e`` is 1 at position 0 and 0 elsewhere (no LayerNorm in this model),
    so score(q, 0) = c/√d_head and score(q, k>0) = 0: attention ≈ 1 on the first token.
    """
    e = 0
    sd["embed.W_E"][:, e] = 0.0
    sd["pos_embed.W_pos"][:, e] = 0.0
    sd["pos_embed.W_pos"][0, e] = 1.0
    sd["blocks.0.attn.W_Q"].zero_()
    sd["blocks.0.attn.b_Q"].zero_()
    sd["blocks.0.attn.b_Q"][:, 0] = 80.0
    sd["blocks.0.attn.W_K"][:, :, 0] = 0.0
    sd["blocks.0.attn.W_K"][:, e, 0] = 1.0
    sd["blocks.0.attn.b_K"][:, 0] = 0.0


@pytest.mark.models
def test_all_heads_attending_to_first_token_form_one_block(device):
    model = build(edit=attend_to_first_token, normalization_type=None, device=device)
    toks = tokens()
    _, cache = model.run_with_cache(toks.to(device))
    assert cache["blocks.0.attn.hook_pattern"][..., 0].min() > 1 - 1e-9  # the construction works
    stats = collect(model, toks, "blocks.0.hook_resid_pre", observers=[HeadSync(layers=[0])], progress=False)
    result = hs.synchronized_heads(stats, threshold=0.01, model=model)
    assert [(b.layer, b.heads) for b in result.blocks] == [(0, list(range(N_HEADS)))]
    assert result.blocks[0].worst_distance < 1e-9
    # 4 heads with full-rank W_V: (Σr)² − Σr² = 2·d_head² per pair, 6 pairs.
    assert result.freedoms_per_layer[0] == 6 * 2 * D_HEAD**2


@pytest.mark.models
def test_value_rank_adjusts_the_freedoms(device):
    def plant(sd, cfg):
        copy_qk_head0_into_head1(sd, cfg)
        sd["blocks.0.attn.W_V"][1][:, 0] = sd["blocks.0.attn.W_V"][1][:, 1]  # rank d_head − 1

    model = build(edit=plant, device=device)
    stats = collect(model, tokens(8), "blocks.0.hook_resid_pre", observers=[HeadSync()], progress=False)
    adjusted = hs.synchronized_heads(stats, model=model)
    assert adjusted.blocks[0].value_ranks == [D_HEAD, D_HEAD - 1]
    assert adjusted.freedoms_per_layer[0] == 2 * D_HEAD * (D_HEAD - 1)
    assumed = hs.synchronized_heads(stats)  # no model: d_head from the stats' metadata
    assert assumed.freedoms_per_layer[0] == 2 * D_HEAD**2


@pytest.mark.models
def test_streamed_sums_merge_save_and_load(tmp_path, device):
    model = build(edit=copy_qk_head0_into_head1, device=device)
    toks = tokens(12)
    whole = collect(model, toks, "blocks.0.hook_resid_pre", observers=[HeadSync()], progress=False)
    a = collect(model, toks[:5], "blocks.0.hook_resid_pre", observers=[HeadSync()], progress=False)
    b = collect(model, toks[5:], "blocks.0.hook_resid_pre", observers=[HeadSync()], progress=False)
    merged = a + b
    for layer in (0, 1):
        x, y = hs.head_sync_matrices(whole, layer), hs.head_sync_matrices(merged, layer)
        assert torch.allclose(x.gram, y.gram, rtol=1e-12, atol=0) and x.n == y.n
    whole.save(tmp_path / "s.safetensors")
    loaded = Stats.load(tmp_path / "s.safetensors", device=device)
    assert isinstance(loaded.accumulators[("head_sync", "blocks.0.attn.hook_pattern")], hs.HeadSyncAccumulator)
    assert torch.equal(hs.head_sync_matrices(loaded, 0).tv, hs.head_sync_matrices(whole, 0).tv)
    with pytest.raises(KeyError, match=r"observers=\[HeadSync\(\)\]"):
        hs.head_sync_matrices(collect(model, toks, "blocks.0.hook_resid_pre", progress=False), 0)
