"""The degeneracy account against a dense Gauss–Newton matrix, planted low rank, missing stats.

The reference: the exact Gauss–Newton matrix of the MSE behavioral loss over every weight
matrix the account covers, ``H = 1/n Σ_x J_θ(x)ᵀ J_θ(x)`` (``n`` datapoints = sequence
positions, so its scale matches ``G ⊗ K``), built with ``torch.func.jacrev``. Each weight
matrix is perturbed through hooks (``out += in @ ΔW`` at the same hook pair the account
reads), so the reference is independent of how either TL generation stores its weights.

Run as a script to print the K-FAC vs exact comparison (docs/kfac_vs_exact.md).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jacrev

from tl_degeneracy import HeadSync, JacobianConfig, NeuronSync, collect
from tl_degeneracy.degeneracy import (
    DegeneracyReport,
    degeneracy_hooks,
    degeneracy_report,
    input_gram,
    norm_affine,
    weight_matrices,
)
from tl_degeneracy.generations import model_from_tl_state_dict
from tl_degeneracy.testing import random_tl_state_dict, tiny_config

SMALL = dict(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=11, n_ctx=6)


def build(seed: int = 0, edit=None, **cfg):
    cfg = tiny_config(**{**SMALL, **cfg})
    sd = random_tl_state_dict(cfg, seed)
    if edit is not None:
        edit(sd, cfg)
    return model_from_tl_state_dict(cfg, sd, dtype=torch.float64)


def tokens(model, n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (n, model.cfg.n_ctx), generator=torch.Generator().manual_seed(seed))


# -- dense reference -----------------------------------------------------------------------------

def dense_ggn(model, toks):
    """Exact GGN over the account's weight matrices, and each matrix's index range in it."""
    mats = weight_matrices(model)
    labels = [f"{w.layer}.{w.name}.{w.head}" for w in mats]
    zeros = {lab: torch.zeros(w.d_in, w.d_out, dtype=torch.float64) for lab, w in zip(labels, mats)}
    by_output: dict[str, list] = {}
    for lab, w in zip(labels, mats):
        by_output.setdefault(w.output_hook, []).append((lab, w))

    def forward(deltas, toks):
        inputs: dict[str, torch.Tensor] = {}

        def capture(name):
            def hook(act, hook):
                inputs[name] = act.reshape(*act.shape[:2], -1)  # hook_z: heads flattened

            return hook

        def contribution(entries, width):
            total = 0
            for lab, w in entries:
                x = inputs[w.input_hook]
                affine = None if w.input_norm is None else norm_affine(model, w.input_norm)
                if affine is not None:  # the matrix reads the normalisation's output: n ⊙ w + b
                    x = x * affine[0] + (0.0 if affine[1] is None else affine[1])
                if w.in_slice is not None:
                    x = x[..., w.in_slice[0]:w.in_slice[1]]
                y = x @ deltas[lab]
                if w.out_slice is not None:  # this head's columns of hook_q/k/v
                    y = F.pad(y, (w.out_slice[0], width - w.out_slice[1]))
                total = total + y
            return total

        def add(name):
            def hook(act, hook):
                flat = act.reshape(*act.shape[:2], -1)
                return (flat + contribution(by_output[name], flat.shape[-1])).reshape(act.shape)

            return hook

        in_hooks = list(dict.fromkeys(w.input_hook for w in mats))
        fwd = [(h, capture(h)) for h in in_hooks] + [(h, add(h)) for h in by_output if h != "logits"]
        with model.hooks(fwd_hooks=fwd):
            logits = model(toks)
        return logits + contribution(by_output["logits"], logits.shape[-1])

    # One sequence at a time: its outputs depend on no other sequence (J is block-sparse).
    T, V = toks.shape[1], model.cfg.d_vocab
    ggn = 0
    for seq in toks:
        J = jacrev(forward)(zeros, seq[None])
        flat = torch.cat([J[lab].reshape(T * V, -1) for lab in labels], dim=-1)
        ggn = ggn + flat.T @ flat
    ggn = ggn.detach() / toks.numel()
    ranges, start = [], 0
    for w in mats:
        ranges.append((start, start + w.d_in * w.d_out))
        start += w.d_in * w.d_out
    return ggn, ranges


def range_projector(matrix, rtol):
    eig, vec = torch.linalg.eigh(matrix)
    keep = vec[:, eig > rtol * eig.max()]
    return keep @ keep.T


def collect_all(model, toks, exact=False):
    # Probe estimates of K have exactly the null space of the exact K (g = Jᵀv ∈ range Jᵀ) once
    # the probes span the range: enough for the structural checks, and 8× cheaper here.
    jacobians = JacobianConfig(exact=True) if exact else JacobianConfig(n_probes=8)
    return collect(model, toks, degeneracy_hooks(model), jacobians=jacobians, batch_size=16,
                   observers=[HeadSync(), NeuronSync()], progress=False)


def block_G_K(model, stats, w):
    G = input_gram(model, stats, w)
    if w.output_hook == "logits":
        return G, torch.eye(w.d_out, dtype=torch.float64)
    K = stats.jacobian_gram(w.output_hook)
    if w.out_slice is not None:
        K = K[w.out_slice[0]:w.out_slice[1], w.out_slice[0]:w.out_slice[1]]
    return G, K


# -- tests ---------------------------------------------------------------------------------------

@pytest.mark.models
def test_counted_free_directions_are_exactly_free_in_the_dense_ggn():
    """Every G- or K-free direction the account counts is a null direction of the exact GGN."""
    model = build()
    toks = tokens(model, n=16)
    stats = collect_all(model, toks)
    report = degeneracy_report(model, stats, rtol=1e-9)
    ggn, ranges = dense_ggn(model, toks)
    scale = ggn.diagonal().max()
    for w, (a, b), acc in zip(weight_matrices(model), ranges, report.matrices):
        block = ggn[a:b, a:b]
        assert block.diagonal().sum() > 1e-6 * scale, f"{acc.label}: perturbation did not reach the output"
        G, K = block_G_K(model, stats, w)
        P = torch.kron(range_projector(G, 1e-9), range_projector(K, 1e-9))  # (d_in, d_out) row-major
        assert (block - P @ block @ P).abs().max() <= 1e-9 * block.abs().max(), acc.label
        # ...so the exact block's rank is at most the structural K-FAC rank.
        exact_rank = int((torch.linalg.eigvalsh(block) > 1e-10 * scale).sum())
        assert exact_rank <= acc.rank_G * acc.rank_K, acc.label
    # LayerNorm: hook_normalized is centred, but W_Q reads n ⊙ w + b: with a bias the true input is
    # full rank (G has no zero eigenvalue; biasless LayerNorm: test_layernorm_without_bias...), and
    # everything written to the residual stream is read through a LayerNorm (one zero eigenvalue of K
    # at hook_attn_out).
    q = report.matrix("W_Q", 0, 0)
    assert (q.rank_G, q.free_from_G) == (SMALL["d_model"], 0)
    o = report.matrix("W_O", 1, 1)
    assert (o.rank_K, o.free_from_K) == (SMALL["d_model"] - 1, SMALL["d_head"])
    u = report.matrix("W_U")
    assert u.rank_K == SMALL["d_vocab"] and u.free_from_K == 0  # MSE output Hessian = identity
    # Whole model: the exact rank is bounded by the K-FAC structural rank.
    total_exact = int((torch.linalg.eigvalsh(ggn) > 1e-10 * torch.linalg.eigvalsh(ggn).max()).sum())
    assert total_exact <= report.totals.nominal_weights - report.totals.free_combined
    assert report.totals.matrices_with_kfac == report.totals.matrices and not report.missing
    assert DegeneracyReport.from_json(report.to_json()) == report


@pytest.mark.models
def test_layernorm_without_bias_leaves_one_free_input_direction():
    """With b = 0 the reading matrices' input n ⊙ w lies in the hyperplane Σ f_i / w_i = 0: one zero
    eigenvalue of G, d_head free directions per head (d_out per MLP input) — and the dense GGN agrees."""
    def no_bias(sd, cfg):
        for key in list(sd):
            if key.endswith((".ln1.b", ".ln2.b")) or key == "ln_final.b":
                sd[key].zero_()

    model = build(edit=no_bias)
    toks = tokens(model, n=16)
    report = degeneracy_report(model, collect_all(model, toks), rtol=1e-9)
    q = report.matrix("W_Q", 0, 0)
    assert (q.rank_G, q.free_from_G) == (SMALL["d_model"] - 1, SMALL["d_head"])
    assert report.matrix("W_in", 1).free_from_G == SMALL["d_mlp"]
    ggn, ranges = dense_ggn(model, toks)
    a, b = ranges[[i for i, w in enumerate(weight_matrices(model)) if (w.layer, w.name, w.head) == (0, "W_Q", 0)][0]]
    exact = int((torch.linalg.eigvalsh(ggn[a:b, a:b]) > 1e-10 * ggn.diagonal().max()).sum())
    assert exact <= q.nominal - q.free_from_G


def low_rank_embedding(r):
    def edit(sd, cfg):
        sd["embed.W_E"][:, r:] = 0.0
        sd["pos_embed.W_pos"][:, r:] = 0.0

    return edit


@pytest.mark.models
def test_planted_low_rank_input_gives_exactly_d_out_times_missing_dims():
    r, d, dh = 5, SMALL["d_model"], SMALL["d_head"]
    model = build(edit=low_rank_embedding(r), normalization_type=None, act_fn="relu")
    toks = tokens(model, n=16)
    stats = collect(model, toks, degeneracy_hooks(model), jacobians=JacobianConfig(n_probes=2), progress=False)
    report = degeneracy_report(model, stats)
    for name in ("W_Q", "W_K", "W_V"):
        for h in range(SMALL["n_heads"]):
            acc = report.matrix(name, 0, h)
            assert acc.input_hook == "blocks.0.hook_resid_pre"  # no LayerNorm: the residual stream
            assert acc.rank_G == r and acc.free_from_G == dh * (d - r)
            # with a full-rank K, the K-FAC count sees exactly the same deficit
            assert acc.rank_K == dh and acc.kfac_rank == dh * r
    # Attention writes into the missing dimensions, so the MLP input is full rank again.
    assert report.matrix("W_in", 0).free_from_G == 0
    # Without LayerNorm nothing projects out the all-ones direction: K at attn_out is full rank.
    assert report.matrix("W_O", 0, 0).free_from_K == 0


@pytest.mark.models
def test_missing_statistics_are_named_and_the_rest_is_counted():
    def copy_qk(sd, cfg):
        for n in ("W_Q", "W_K", "b_Q", "b_K"):
            sd[f"blocks.0.attn.{n}"][1] = sd[f"blocks.0.attn.{n}"][0]

    model = build(edit=copy_qk)
    toks = tokens(model, n=8)
    stats = collect(model, toks, ["blocks.0.ln1.hook_normalized", "blocks.0.mlp.hook_post"],
                    observers=[HeadSync()], progress=False)
    report = degeneracy_report(model, stats)
    q = report.matrix("W_Q", 0, 1)
    assert q.free_from_G == 0 and q.rank_K is None and q.kfac_rank is None  # LayerNorm bias: full-rank input
    assert any("blocks.0.attn.hook_q" in m and "jacobians=True" in m for m in q.missing)
    assert report.matrix("W_in", 1).rank_G is None
    assert any("observers=[NeuronSync()]" in m for m in report.missing)
    assert not any("synchronized heads" in m for m in report.missing)
    assert (report.head_threshold, report.neuron_threshold) == (0.05, None)
    # W_U's K is the output Hessian of the behavioural loss: without Jacobians no loss was chosen,
    # so it is reported missing (not guessed), as is G at ln_final.
    u = report.matrix("W_U")
    assert u.rank_K is None and u.rank_G is None
    assert any("no Jacobians were collected" in m for m in u.missing)
    assert any("ln_final.hook_normalized" in m for m in u.missing)
    assert report.totals.matrices_with_kfac == 0
    # Synchronized heads are counted from what was collected: one pair, full-rank W_V.
    assert report.totals.synchronized_head_freedoms == 2 * SMALL["d_head"] ** 2
    assert report.per_layer["0"].synchronized_head_freedoms == 2 * SMALL["d_head"] ** 2
    assert DegeneracyReport.from_dict(report.to_dict()) == report
    assert not any("checksum" in n for n in report.notes)
    other = degeneracy_report(build(seed=5), stats)
    assert any("checksum" in n for n in other.notes)


# -- the comparison written to docs/kfac_vs_exact.md ----------------------------------------------

def comparison(model, toks, taus=(1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2)) -> str:
    stats = collect_all(model, toks, exact=True)
    ggn, ranges = dense_ggn(model, toks)
    eig = torch.linalg.eigvalsh(ggn)
    top = float(eig.max())
    blocks = [torch.linalg.eigvalsh(ggn[a:b, a:b]) for a, b in ranges]
    cfg = model.cfg
    # GL(d_head) of W_QK and W_OV per head, restricted to the subgroup fixing the (unperturbed) biases.
    generic = 2 * (cfg.d_head**2 - cfg.d_head) * cfg.n_heads * cfg.n_layers
    rows = ["| τ (eps = τ·λ_max) | exact GGN rank | Σ exact block ranks | K-FAC #{g·k > eps} | "
            f"K-FAC − {generic} head symmetries | nominal − paper's G∪K count (rtol = τ) |",
            "|---|---|---|---|---|---|"]
    for tau in taus:
        eps = tau * top
        rep = degeneracy_report(model, stats, eps=eps, rtol=tau)
        rows.append(f"| {tau:g} | {int((eig > eps).sum())} | {sum(int((e > eps).sum()) for e in blocks)} | "
                    f"{rep.totals.kfac_rank} | {rep.totals.kfac_rank - generic} | "
                    f"{rep.totals.nominal_weights - rep.totals.free_combined} |")
    rep = degeneracy_report(model, stats, eps=1e-8 * top, rtol=1e-8)
    per = ["| matrix | nominal | exact block rank | K-FAC rank | rank_G·rank_K |", "|---|---|---|---|---|"]
    for acc, e in zip(rep.matrices, blocks):
        per.append(f"| {acc.label} | {acc.nominal} | {int((e > 1e-8 * top).sum())} | {acc.kfac_rank} | "
                   f"{acc.rank_G * acc.rank_K} |")
    head = (f"{type(model).__name__}, config {dict((k, getattr(model.cfg, k)) for k in SMALL)}, "
            f"normalization {model.cfg.normalization_type}, act_fn {model.cfg.act_fn}; "
            f"{toks.shape[0]} sequences × {toks.shape[1]} positions; {rep.totals.nominal_weights} weight parameters; "
            f"λ_max(GGN) = {top:.4g}")
    return "\n".join([head, "", *rows, "", "Per matrix at τ = 1e-8:", "", *per])


if __name__ == "__main__":
    for seed, extra in ((0, {}), (0, dict(normalization_type=None, act_fn="relu"))):
        m = build(seed, **extra)
        print(comparison(m, tokens(m)))
        print()
