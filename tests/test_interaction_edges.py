"""The interaction graph's edges (tl_degeneracy.interactions.edges) against dense references."""
from __future__ import annotations

import math

import pytest
import torch
from deep_linear import DeepLinear

import tl_degeneracy as tld
from tl_degeneracy.hook_names import bridge_resid_mid_partner
from tl_degeneracy.interactions import EdgeConfig, collect_edges, node_bases
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models


def _segment(model, tokens, source, target):
    """``x ↦ f_target`` with ``f_source`` replaced by ``x``: the model segment between two nodes.

    On a bridge ``hook_resid_mid`` is ``ln2.hook_in``: the replacement must reach the skip path
    too, which ``hook_mlp_out`` carries (as the splice does it).
    """
    partner = bridge_resid_mid_partner(model, source)

    def run(x):
        got = {}

        def replace(act, hook):
            got["delta"] = x - act
            return x

        def capture(act, hook):
            got["y"] = act
            return act

        hooks = [(source, replace), (target, capture)]
        if partner is not None:
            hooks.insert(1, (partner, lambda act, hook: act + got["delta"]))
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        return got["y"]

    return run


def dense_edges(model, tokens, source, target, in_layer, out_layer, out_positions=None):
    """E from the full segment Jacobian (``torch.func.jacrev``), one sequence at a time."""
    device = next(model.parameters()).device  # the reference is computed where the model lives
    C_out, C_in_pinv = out_layer.C.to(device), in_layer.C_pinv.to(device)
    E = torch.zeros(C_out.shape[0], C_in_pinv.shape[1], dtype=torch.float64, device=device)
    n = 0
    for row in tokens.to(device):
        row = row[None]
        _, cache = model.run_with_cache(row)
        f_in = cache[source].detach()
        J = torch.func.jacrev(_segment(model, row, source, target))(f_in)[0, :, :, 0]  # [T, d_out, T', d_in]
        f_hat = in_layer.transform(f_in[0])  # [T', k_in]
        A = torch.einsum("ia,tasb,bj->tisj", C_out, J, C_in_pinv)  # ∂f̂_out(t)_i / ∂f̂_in(s)_j
        a = torch.einsum("tisj,sj->tij", A, f_hat)
        ts = range(row.shape[1]) if out_positions is None else [p % row.shape[1] for p in out_positions]
        for t in ts:
            E += a[t].square()
            n += 1
    return (E / n).detach()


@pytest.fixture(scope="module")
def tiny_bases(tiny, tiny_tokens):
    nodes = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
             "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    stats = tld.collect(tiny, tiny_tokens, nodes, jacobians=True, progress=False)
    return node_bases(stats, nodes)


@pytest.fixture
def tiny_bases_on(device, request, per_device, tiny_on, tiny_tokens):
    """``tiny_bases`` fitted on ``device`` (once per session there)."""
    if device == "cpu":
        return request.getfixturevalue("tiny_bases")

    def build():
        nodes = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
                 "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
        return node_bases(tld.collect(tiny_on, tiny_tokens, nodes, jacobians=True, progress=False), nodes)

    return per_device("tiny_bases", device, build)


@pytest.mark.parametrize("nodes", [
    ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"],  # whole blocks: attention
    ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"],  # one MLP segment
], ids=["causal-attention", "mlp"])
@pytest.mark.parametrize("method", ["forward", "backward"])
def test_exact_edges_equal_the_dense_jacobian(tiny_on, tiny_tokens, tiny_bases_on, nodes, method):
    tiny, tiny_bases = tiny_on, tiny_bases_on
    tokens = tiny_tokens[:4]
    graphs = collect_edges(tiny, tokens, tiny_bases, nodes, exact=True, method=method, batch_size=3, progress=False)
    assert set(graphs) == {"interaction", "pca", "standard"}
    for name, graph in graphs.items():
        for l, (source, target) in enumerate(zip(nodes[:-1], nodes[1:])):
            ref = dense_edges(tiny, tokens, source, target, tiny_bases[name][source], tiny_bases[name][target])
            got, ref = graph.edges[l].cpu(), ref.cpu()
            assert got.shape == ref.shape
            assert ref.abs().max() > 0
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
            assert graph.n_datapoints[l] == tokens.numel()


def test_cross_position_terms_are_present(tiny_on, tiny_tokens, tiny_bases_on, device):
    """Attention edges differ from what a position-local (t' = t only) attribution would give."""
    tiny, tiny_bases = tiny_on, tiny_bases_on
    nodes = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    tokens = tiny_tokens[:2]
    source, target = nodes
    layer_in, layer_out = tiny_bases["standard"][source], tiny_bases["standard"][target]
    C_out, C_in_pinv = layer_out.C.to(device), layer_in.C_pinv.to(device)
    full = collect_edges(tiny, tokens, {"standard": tiny_bases["standard"]}, nodes, exact=True,
                         progress=False)["standard"].edges[0]
    full = full.to(device)  # graphs hold their edges on the host
    local = torch.zeros_like(full)
    for row in tokens.to(device):
        _, cache = tiny.run_with_cache(row[None])
        f_in = cache[source].detach()
        J = torch.func.jacrev(_segment(tiny, row[None], source, target))(f_in)[0, :, :, 0]
        f_hat = layer_in.transform(f_in[0])
        for t in range(row.shape[0]):
            local += (C_out @ J[t, :, t] @ C_in_pinv * f_hat[t][None]).square()
    local /= tokens.numel()
    assert (full - local).abs().max() > 1e-3 * full.abs().max()


def test_output_positions_restrict_the_datapoints(tiny_on, tiny_tokens, tiny_bases_on):
    tiny, tiny_bases = tiny_on, tiny_bases_on
    nodes = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    tokens = tiny_tokens[:3]
    graphs = collect_edges(tiny, tokens, {"interaction": tiny_bases["interaction"]}, nodes, exact=True,
                           positions={nodes[1]: [-1]}, progress=False)
    ref = dense_edges(tiny, tokens, *nodes, tiny_bases["interaction"][nodes[0]], tiny_bases["interaction"][nodes[1]],
                      out_positions=[-1])
    torch.testing.assert_close(graphs["interaction"].edges[0].cpu(), ref.cpu(), rtol=1e-10, atol=1e-12)
    assert graphs["interaction"].n_datapoints == [3]


def test_probe_estimator_is_unbiased_and_its_error_falls_like_one_over_sqrt_probes_times_sequences(tiny):
    """Relative RMS error against exact on the same data, over seeds: ∝ 1/sqrt(probes · sequences).

    CPU only: its bounds hold for the CPU generator's draws (12 seeds); CUDA draws other probes."""
    nodes = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    tokens = torch.randint(0, 23, (32, 12), generator=torch.Generator().manual_seed(3))
    stats = tld.collect(tiny, tokens, nodes, jacobians=True, progress=False)
    bases = {"interaction": tld.InteractionBasis.fit(stats, hooks=nodes)}
    table = []
    for probes, n_seq in [(1, 8), (4, 8), (16, 8), (4, 32)]:
        data = tokens[:n_seq]
        exact = collect_edges(tiny, data, bases, nodes, exact=True, batch_size=8, progress=False)
        E = exact["interaction"].edges[0]
        estimates = torch.stack([collect_edges(tiny, data, bases, nodes, n_probes=probes, seed=s, batch_size=8,
                                               progress=False)["interaction"].edges[0] for s in range(12)])
        rms = float(((estimates - E).square().mean(0).sum() / E.square().sum()).sqrt())
        bias = float((estimates.mean(0) - E).norm() / E.norm())
        table.append((probes, n_seq, rms, bias))
    print("\n probes  seqs  rel.RMS error  rel.|mean − exact|")
    for row in table:
        print(" {:6d} {:5d}   {:.4f}        {:.4f}".format(*row))
    base = table[0][2] * math.sqrt(1 * 8)
    for probes, n_seq, rms, bias in table:
        predicted = base / math.sqrt(probes * n_seq)
        assert 0.6 * predicted < rms < 1.6 * predicted, (probes, n_seq, rms, predicted)
        assert bias < 0.6 * rms  # the mean of 12 draws sits within ~1/sqrt(12) RMS of the truth
    # probes and sequences are interchangeable: 16 × 8 and 4 × 32 give the same error
    assert abs(table[2][2] / table[3][2] - 1) < 0.4


def test_deep_linear_edges_are_diagonal_in_the_interaction_basis(device):
    """Appendix A: in a deep linear network each layer's interaction-basis coordinates equal the
    next layer's up to sign, so every edge matrix is diagonal; PCA coordinates are not."""
    model = DeepLinear(dims=(8, 8, 8, 8), d_vocab=40, d_out=8, seed=1).to(device)
    nodes = ["hook_0", "hooks_after.0", "hooks_after.1", "hooks_after.2"]
    tokens = torch.randint(0, 40, (64, 1), generator=torch.Generator().manual_seed(0))
    stats = tld.collect(model, tokens, nodes, jacobians=tld.JacobianConfig(exact=True, output_positions=None),
                        progress=False)
    bases = node_bases(stats, nodes, kinds=("interaction", "pca"))
    graphs = collect_edges(model, tokens, bases, nodes, exact=True, progress=False)
    for E in graphs["interaction"].edges:
        assert E.shape == (8, 8)
        off = E - torch.diag(E.diagonal())
        assert off.sum() < 1e-8 * E.sum()
    pca_off = [float((E - torch.diag(E.diagonal())).sum() / E.sum()) for E in graphs["pca"].edges]
    assert min(pca_off) > 0.05, pca_off


def test_bad_edge_configurations_are_refused(tiny, tiny_bases):
    with pytest.raises(ValueError, match="at least two nodes"):
        EdgeConfig.build(tiny, tiny_bases, ["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="no layer at"):
        EdgeConfig.build(tiny, tiny_bases, ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z"])
    with pytest.raises(ValueError, match="n_probes"):
        EdgeConfig.build(tiny, tiny_bases, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], n_probes=0)
    with pytest.raises(ValueError, match="exact=True takes no n_probes"):
        EdgeConfig.build(tiny, tiny_bases, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], exact=True,
                         n_probes=4)
    with pytest.raises(ValueError, match="at least one basis"):
        EdgeConfig.build(tiny, {}, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"])


def test_edges_resume_and_identity(tiny_on, tiny_tokens, tiny_bases_on, tmp_path):
    """A checkpointed edge pass resumed equals an uninterrupted one; another basis is refused."""
    tiny, tiny_bases = tiny_on, tiny_bases_on
    nodes = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    bases = {"interaction": tiny_bases["interaction"]}
    full = collect_edges(tiny, tiny_tokens, bases, nodes, batch_size=2, progress=False)["interaction"].edges[0]
    ckpt = tmp_path / "edges.safetensors"

    class Stop(KeyboardInterrupt):
        pass

    def interrupted():
        for i in range(0, 10, 2):
            if i == 6:
                raise Stop
            yield tiny_tokens[i:i + 2]

    with pytest.raises(Stop):
        collect_edges(tiny, interrupted(), bases, nodes, batch_size=2, progress=False, checkpoint=ckpt)
    assert ckpt.exists()
    resumed = collect_edges(tiny, tiny_tokens, bases, nodes, batch_size=2, progress=False, checkpoint=ckpt,
                            resume=True)["interaction"].edges[0]
    torch.testing.assert_close(resumed.cpu(), full.cpu(), rtol=1e-12, atol=0)  # a resumed run sums on the CPU
    with pytest.raises(tld.CheckpointMismatchError, match="bases"):
        collect_edges(tiny, tiny_tokens, {"interaction": tiny_bases["pca"]}, nodes, batch_size=2, progress=False,
                      checkpoint=ckpt, resume=True)


def test_float32_model_gives_float64_edges_close_to_float64_model(tiny_tokens, device):
    nodes = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    m64, m32 = tiny_model(seed=2, device=device), tiny_model(seed=2, dtype=torch.float32, device=device)
    stats = tld.collect(m64, tiny_tokens, nodes, jacobians=True, progress=False)
    bases = node_bases(stats, nodes, kinds=("interaction",))
    E64 = collect_edges(m64, tiny_tokens[:4], bases, nodes, exact=True, progress=False)["interaction"].edges[0]
    E32 = collect_edges(m32, tiny_tokens[:4], bases, nodes, exact=True, progress=False)["interaction"].edges[0]
    assert E32.dtype == torch.float64
    torch.testing.assert_close(E32, E64, rtol=1e-3, atol=1e-5 * float(E64.max()))


def test_ablation_curves_end_points_and_a_manual_reference(tiny_on, tiny_tokens, tiny_bases_on, device):
    from tl_degeneracy.interactions import ablation_curves

    tiny, tiny_bases = tiny_on, tiny_bases_on
    hook = "blocks.1.hook_resid_pre"
    bases = {name: tiny_bases[name] for name in ("interaction", "pca", "standard")}
    curves = ablation_curves(tiny, tiny_tokens[:6], bases, [hook], batch_size=4, progress=False)
    by_name = {c.basis: c for c in curves}
    assert set(by_name) == {"interaction", "pca", "standard", "random"}
    at_zero = {name: c.behavioral_loss[0] for name, c in by_name.items()}
    assert all(c.k[0] == 0 for c in curves)
    for value in at_zero.values():  # k = 0 replaces the node by its mean, whatever the basis
        assert value == pytest.approx(at_zero["standard"], rel=1e-9)
    assert at_zero["standard"] > 0
    std = by_name["standard"]
    assert std.k[-1] == 16 and std.behavioral_loss[-1] < 1e-20 and abs(std.ce_increase[-1]) < 1e-12
    # one point by hand: keep PCA's top 4 directions, mean-ablate the rest
    layer = bases["pca"][hook]
    P = layer.C_pinv[:, :4] @ layer.C[:4]

    def project(act, hook):
        return layer.mean + (act - layer.mean) @ P.T

    tokens = tiny_tokens[:6].to(device)
    with torch.no_grad():
        z_star = tiny(tokens)
        z = tiny.run_with_hooks(tokens, fwd_hooks=[(hook, project)])
    expected = float((z - z_star).square().sum() / tokens.numel())
    i = by_name["pca"].k.index(4)
    assert by_name["pca"].behavioral_loss[i] == pytest.approx(expected, rel=1e-9)


def test_ablation_in_chunks_of_rows_equals_whole_batches(tiny, tiny_tokens, tiny_bases):
    """With a logit budget of one row per forward (and one k per forward), every sum is the one whole
    batches give: the clean float64 logits are never held for more than a chunk of rows."""
    from tl_degeneracy.interactions import ablation_curves

    hooks = ["blocks.1.hook_resid_pre"]
    bases = {name: tiny_bases[name] for name in ("interaction", "pca")}
    whole = ablation_curves(tiny, tiny_tokens[:6], bases, hooks, batch_size=6, progress=False)
    per_row = tiny_tokens.shape[1] * tiny.cfg.d_vocab  # float64 logit elements of one row
    chunked = ablation_curves(tiny, tiny_tokens[:6], bases, hooks, batch_size=6, progress=False, logit_budget=per_row)
    assert [(c.hook, c.basis, c.k) for c in chunked] == [(c.hook, c.basis, c.k) for c in whole]
    for a, b in zip(chunked, whole):
        assert a.meta["n_datapoints"] == b.meta["n_datapoints"] == 72
        assert a.meta["clean_ce"] == pytest.approx(b.meta["clean_ce"], rel=1e-12)
        assert a.behavioral_loss == pytest.approx(b.behavioral_loss, rel=1e-12, abs=1e-15)
        assert a.ce_increase == pytest.approx(b.ce_increase, rel=1e-9, abs=1e-12)
        assert max(b.behavioral_loss) > 0
