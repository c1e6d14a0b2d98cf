"""Real architectures at toy size: grouped-query attention, gated (SwiGLU) MLPs, RMSNorm, rotary positions,
tied embeddings (SmolLM2's Llama architecture), and a BERT encoder — loaded from Hugging Face folders the
way a user's model is, on both TransformerLens generations.

- head synchronisation with GQA: a planted synchronized pair across key/value heads is found (and adds no
  freedom), a pair sharing one adds ``r·d_model``; the freedom formula against the dense rank of the
  attention's bilinear map;
- gated-MLP neuron synchronisation: a planted pair of identical gates is synchronized, a shut gate is dead;
- the account: ``W_gate`` and ``W_in`` (up) counted, K/V per key/value head, nominal = the model's
  trainable parameter count (tied embeddings once), on GPT-2-, Llama- and BERT-style models.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import jacrev

import tl_degeneracy as tld
from tl_degeneracy.degeneracy import weight_matrices
from tl_degeneracy.generations import installed_generation, trainable_parameter_count
from tl_degeneracy.sync.heads import block_freedoms, kv_head_of
from tl_degeneracy.testing import random_tl_state_dict, tiny_config, tiny_model
from tl_degeneracy.testing.hf_models import LLAMA, tiny_hf_folder, tiny_hf_model

pytestmark = pytest.mark.models
D, DH, H, KV, D_MLP = LLAMA["hidden_size"], LLAMA["head_dim"], 4, 2, LLAMA["intermediate_size"]


def tokens(n: int = 24, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, LLAMA["vocab_size"], (n, T), generator=torch.Generator().manual_seed(seed))


def plant(state: dict[str, torch.Tensor], config) -> None:
    """Layer 0: query heads 0 and 2 (key/value heads 0 and 1) attend alike — both KV heads get one key map
    and the two query heads one query map. Layer 1: query heads 0 and 1 (both on KV head 0) alike.
    MLP layer 0: gates 0 and 1 identical; gate 5 shut (silu(0) = 0 on every input)."""
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    state[k][DH:2 * DH] = state[k][:DH]
    state[q][2 * DH:3 * DH] = state[q][:DH]
    q1 = "model.layers.1.self_attn.q_proj.weight"
    state[q1][DH:2 * DH] = state[q1][:DH]
    gate = "model.layers.0.mlp.gate_proj.weight"
    state[gate][1] = state[gate][0]
    state[gate][5] = 0.0


@pytest.fixture(scope="module")
def planted():
    model = tiny_hf_model("llama", seed=0, edit=plant, edit_id="sync-pairs-and-shut-gate")
    stats = tld.collect(model, tokens(), tld.input_hooks(model), jacobians=tld.JacobianConfig(n_probes=4),
                        jacobian_hooks=tld.output_hooks(model), observers=[tld.HeadSync(), tld.NeuronSync()],
                        batch_size=8, progress=False)
    return model, stats


def test_the_model_is_llama_shaped(planted):
    model, _ = planted
    cfg = model.cfg
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.gated_mlp) == (H, KV, True)
    assert cfg.normalization_type.startswith("RMS") and cfg.positional_embedding_type == "rotary"


def test_gqa_head_sync_finds_the_planted_pairs_only(planted):
    model, stats = planted
    heads = tld.synchronized_heads(stats, threshold=1e-6, model=model)
    assert [(b.layer, b.heads) for b in heads.blocks] == [(0, [0, 2]), (1, [0, 1])]
    across, shared = heads.blocks
    assert across.kv_heads == [0, 1] and across.worst_distance < 1e-9
    assert across.freedoms == 0  # each KV head also serves an unsynchronized head: nothing can be traded
    assert shared.kv_heads == [0, 0] and shared.value_ranks == [DH, DH]
    assert shared.freedoms == DH * D  # O_0 → O_0 + Δ, O_1 → O_1 − Δ on the shared values
    assert heads.freedoms_per_layer == {0: 0, 1: DH * D}
    assert "grouped-query" in heads.rank_source
    m = tld.head_sync_matrices(stats, 1)  # the other pairs: far above the threshold (random heads attend
    off = [m.tv[i, j] for i, j in itertools.combinations(range(H), 2) if (i, j) != (0, 1)]  # almost uniformly)
    assert min(off) > 1e-3


def test_gated_neuron_sync_finds_the_planted_gate_pair_and_the_shut_gate(planted):
    model, stats = planted
    neurons = tld.synchronized_neurons(stats, threshold=1e-9, model=model)
    layer = neurons.layers[0]
    assert layer.dead == [5] and neurons.layers[1].dead == []
    assert [b.neurons for b in layer.blocks] == [[0, 1]]
    block = layer.blocks[0]
    assert block.s_a == 2 and block.worst_cost < 1e-12  # different up-projections: span 2
    assert layer.added_freedoms == 2 ** 2 - 2
    assert neurons.layers[1].blocks == []
    mats = tld.neuron_sync_matrices(stats, 0)
    assert mats.f2[5] == 0 and mats.fires[5] == 0  # silu(0) = 0: never open


def test_gated_neuron_sync_streams_the_dense_cost(planted):
    """c_ij = E[((r_i − r_j) p_j)²] / E[f_j²] with p = up-projection and r = silu(gate), from run_with_cache."""
    model, stats = planted
    _, cache = model.run_with_cache(tokens())
    gate = cache["blocks.1.mlp.hook_pre"].reshape(-1, D_MLP).to(torch.float64)
    up = cache["blocks.1.mlp.hook_pre_linear"].reshape(-1, D_MLP).to(torch.float64)
    f = cache["blocks.1.mlp.hook_post"].reshape(-1, D_MLP).to(torch.float64)
    torch.testing.assert_close(f, torch.nn.functional.silu(gate) * up, rtol=1e-10, atol=1e-12)
    r = torch.nn.functional.silu(gate)
    ref = ((r[:, :, None] - r[:, None, :]) * up[:, None, :]).square().mean(0) / f.square().mean(0)[None, :]
    ref.fill_diagonal_(0.0)
    torch.testing.assert_close(tld.neuron_sync_matrices(stats, 1).cost, ref, rtol=1e-8, atol=1e-12)


def test_the_account_covers_gated_mlps_and_kv_heads(planted):
    model, stats = planted
    report = tld.degeneracy_report(model, stats)
    names = [(m.layer, m.matrix, m.head) for m in report.matrices if m.layer == 0]
    assert names.count((0, "W_K", 0)) == 1 and (0, "W_K", KV) not in names and (0, "W_Q", H - 1) in names
    gate, up, down = report.matrix("W_gate", 0), report.matrix("W_in", 0), report.matrix("W_out", 0)
    assert (gate.output_hook, up.output_hook, down.input_hook) == (
        "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post")
    assert gate.nominal == up.nominal == down.nominal == D * D_MLP
    assert gate.kfac_rank is not None and up.kfac_rank is not None
    # the shut gate 5: its output column and its up-projection row are free (G at hook_post, K at pre_linear)
    assert down.free_from_G >= D and up.free_from_K >= D
    per_layer = 2 * H * D * DH + 2 * KV * D * DH + 3 * D * D_MLP  # Q, O per query head; K, V per KV head; MLP
    assert report.totals.nominal_weights == 2 * per_layer + D * LLAMA["vocab_size"]
    assert not report.missing


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_nominal_count_is_the_trainable_parameter_count(arch, tiny_tokens):
    if arch == "gpt2":
        cfg = tiny_config()
        model = tiny_model(seed=0)
        state = random_tl_state_dict(cfg, 0)
        # TL 4.x's native unembedding keeps b_U as a buffer (used, not trainable)
        expected = sum(v.numel() for v in state.values()) - (state["unembed.b_U"].numel()
                                                             if installed_generation() == 4 else 0)
    else:
        if arch == "bert" and installed_generation() == 3:
            pytest.skip("TL 3.x loads encoders as HookedEncoder, which load_pretrained does not use")
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        folder = tiny_hf_folder(arch)
        hf = (AutoModelForCausalLM if arch == "llama" else AutoModelForMaskedLM).from_pretrained(str(folder))
        expected = sum(p.numel() for p in hf.parameters())  # tied embedding and head once
        model = tiny_hf_model(arch)
        if installed_generation() == 3:  # HookedTransformer adds its own (zero) biases: its parameters too
            expected += sum(p.numel() for name, p in model.named_parameters()
                            if name.split(".")[-1].lstrip("_").startswith("b_") and not bool(p.any()))
    stats = tld.collect(model, tiny_tokens % 23, ["blocks.0.hook_resid_pre"], progress=False)
    report = tld.degeneracy_report(model, stats)
    assert report.totals.nominal_model == trainable_parameter_count(model) == expected


def test_tied_embeddings_count_once_on_both_generations():
    model = tiny_hf_model("llama")
    V = LLAMA["vocab_size"]
    total = sum(p.numel() for p in model.parameters())
    if installed_generation() == 3:
        assert torch.equal(model.W_U, model.W_E.T) and model.W_U.data_ptr() != model.W_E.data_ptr()
        assert trainable_parameter_count(model) == total - V * D
    else:
        assert model.W_U.data_ptr() == model.W_E.data_ptr()
        assert trainable_parameter_count(model) == total


# -- the freedom formula against the dense rank of the attention's bilinear map ---------------------


def _nullity(kv_head: list[int], same: list[list[int]], d: int = 6, dh: int = 2, T: int = 5, n_seq: int = 6) -> int:
    """Null directions of (V_g, O_h) ↦ Σ_h A_h X V_{g(h)} O_h over several sequences; heads in a group of
    ``same`` share their attention pattern."""
    gen = torch.Generator().manual_seed(0)
    n_heads, n_kv = len(kv_head), max(kv_head) + 1
    X = torch.randn(n_seq, T, d, generator=gen, dtype=torch.float64)
    patterns = [torch.softmax(torch.randn(n_seq, T, T, generator=gen, dtype=torch.float64), -1)
                for _ in range(n_heads)]
    for group in same:
        for h in group[1:]:
            patterns[h] = patterns[group[0]]
    V = torch.randn(n_kv, d, dh, generator=gen, dtype=torch.float64)
    O = torch.randn(n_heads, dh, d, generator=gen, dtype=torch.float64)

    def f(V: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
        return sum(patterns[h] @ X @ V[kv_head[h]] @ O[h] for h in range(n_heads))  # type: ignore[return-value]

    JV, JO = jacrev(f, argnums=(0, 1))(V, O)
    J = torch.cat([JV.reshape(n_seq * T * d, -1), JO.reshape(n_seq * T * d, -1)], dim=1)
    s = torch.linalg.svdvals(J)
    return J.shape[1] - int((s > 1e-9 * s[0]).sum())


@pytest.mark.parametrize("n_kv, block", [(4, [0, 1]), (4, [0, 1, 2]), (2, [0, 2]), (2, [0, 1]), (2, [0, 1, 2]),
                                         (2, [0, 1, 2, 3]), (1, [0, 1]), (1, [0, 1, 2, 3])])
def test_block_freedoms_equal_the_dense_nullity_increase(n_kv, block):
    d, dh = 6, 2
    kv_head = kv_head_of(4, n_kv)
    generic = _nullity(kv_head, [])
    assert generic == n_kv * dh * dh  # one GL(d_head) per key/value head
    extra = _nullity(kv_head, [block]) - generic
    assert extra == block_freedoms(block, kv_head, [dh] * n_kv, d)


def test_weight_matrices_of_a_gpt2_model_are_unchanged():
    model = tiny_model(seed=0)
    names = [w.name for w in weight_matrices(model) if w.layer == 0]
    assert names.count("W_in") == 1 and "W_gate" not in names
