"""The package's jaxtyping annotations are right: checked at run time with beartype.

Each check runs in a fresh interpreter where ``jaxtyping.install_import_hook`` wraps every
function of ``tl_degeneracy`` in a beartype check before the package is imported: a wrong
shape is refused, and a whole analysis (collect, bases, splice, synchronisation, degeneracy
account) runs through the checked functions without one type-check error.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import sys
from jaxtyping import install_import_hook
with install_import_hook("tl_degeneracy", "beartype.beartype"):
    import tl_degeneracy as tld
    import tl_degeneracy.collection.accumulators, tl_degeneracy.linalg, tl_degeneracy.positions
import torch
from jaxtyping import TypeCheckError
from beartype.roar import BeartypeException
CHECK_ERRORS = (TypeCheckError, BeartypeException)
assert "tl_degeneracy.collection.stats" in sys.modules
"""


def _beartype_available() -> None:
    probe = subprocess.run([sys.executable, "-c", "import beartype, jaxtyping"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"beartype/jaxtyping not importable in {sys.executable}: {probe.stderr.strip()[-300:]}")


def _run_checked(body: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    _beartype_available()
    code = PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_hook_checks_the_package(tmp_path):
    """A wrong-rank tensor is refused by the annotation check, before any of the function's code."""
    result = _run_checked(cwd=tmp_path, body="""
        from tl_degeneracy.collection.accumulators import GramAccumulator
        from tl_degeneracy.linalg import gram_rank, matrix_rank, symmetric_eigh
        from tl_degeneracy.positions import position_mask

        def refused(fn, *args, **kwargs):
            try:
                fn(*args, **kwargs)
            except CHECK_ERRORS as exc:
                return str(exc)
            raise AssertionError(f"{fn.__qualname__} accepted {[getattr(a, 'shape', a) for a in args]}")

        msg = refused(GramAccumulator.from_batch, torch.zeros(2, 3, 4))    # [n, d] expected
        assert "from_batch" in msg, msg
        refused(GramAccumulator.from_batch, torch.zeros(5))                # rank 1
        refused(GramAccumulator.from_batch, torch.zeros(5, 3, dtype=torch.long))  # Float expected
        refused(gram_rank, torch.zeros(3, 4, dtype=torch.float64))         # "d d": not square
        refused(symmetric_eigh, torch.zeros(2, 3, dtype=torch.float64))
        refused(matrix_rank, torch.zeros(3, dtype=torch.float64))
        refused(position_mask, None, 2, 5, attention_mask=torch.ones(5, dtype=torch.bool))  # [batch, pos] expected
        # the right shapes pass
        acc = GramAccumulator.from_batch(torch.randn(7, 3))
        assert acc.n == 7 and acc.dim == 3
        assert matrix_rank(torch.randn(5, 3, dtype=torch.float64)) == 3
        print("OK")
    """)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "OK" in result.stdout


@pytest.mark.models
def test_a_whole_analysis_passes_the_checks(tmp_path):
    result = _run_checked(cwd=tmp_path, body="""
        from tl_degeneracy import HeadSync, JacobianConfig, NeuronSync, Stats, collect
        from tl_degeneracy.basis import InteractionBasis
        from tl_degeneracy.basis.splice import splice
        from tl_degeneracy.testing import tiny_model

        torch.set_num_threads(1)
        model = tiny_model(seed=0)
        tokens = torch.randint(0, 23, (10, 12), generator=torch.Generator().manual_seed(0))
        hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]

        stats = collect(model, tokens, hooks, jacobians=JacobianConfig(n_probes=3), batch_size=4,
                        observers=[HeadSync(), NeuronSync()], progress=False)
        assert stats.gram(hooks[0]).shape == (16, 16) and stats.jacobian_gram(hooks[2]).shape == (16, 16)
        stats.covariance(hooks[1]); stats.mean(hooks[1])

        basis = InteractionBasis.fit(stats, hooks=hooks[:2])
        layer = basis["blocks.1.hook_resid_pre"]
        f = torch.randn(3, 5, 16, dtype=torch.float64)
        f_hat = layer.transform(f)
        assert f_hat.shape == (3, 5, layer.k)
        assert layer.inverse(f_hat).shape == f.shape
        assert layer.transform(torch.randn(16, dtype=torch.float64)).shape == (layer.k,)
        InteractionBasis.fit(stats, hooks=hooks[:2], scaling="pca")

        with splice(model, basis):
            logits = model(tokens)
        assert logits.shape == (10, 12, 23)

        # padding masks, a position selection, the KL loss, exact mode, a hook output
        mask = torch.ones(10, 12, dtype=torch.bool)
        mask[:, 9:] = False
        batches = [{"tokens": tokens[i:i + 5], "attention_mask": mask[i:i + 5]} for i in (0, 5)]
        collect(model, batches, hooks[:2], jacobians=JacobianConfig(n_probes=2, loss="kl"), positions=[-1, 3],
                progress=False)
        collect(model, tokens[:2, :4], hooks[:1], jacobians=JacobianConfig(exact=True, output_positions=[-1]),
                progress=False)
        collect(model, tokens, hooks[:1], jacobians=JacobianConfig(output="blocks.1.hook_resid_pre", n_probes=2),
                progress=False)
        InteractionBasis.fit_local(model, tokens, hooks[:2], jacobians=JacobianConfig(n_probes=2))

        heads = tld.synchronized_heads(stats, model=model)
        tld.head_sync_matrices(stats, 0)
        neurons = tld.synchronized_neurons(stats, model=model)
        tld.neuron_sync_matrices(stats, 1)
        full = collect(model, tokens, tld.degeneracy_hooks(model), jacobians=True,
                       observers=[HeadSync(), NeuronSync()], progress=False)
        report = tld.degeneracy_report(model, full, heads=heads, neurons=neurons)
        assert report.totals is not None
        # thresholds that make blocks, so the block code paths (worst_within, value ranks, span_dim) run
        loose_heads = tld.synchronized_heads(stats, threshold=1.0, model=model)
        assert loose_heads.blocks
        loose_neurons = tld.synchronized_neurons(stats, threshold=1e6, model=model)
        assert any(layer.blocks for layer in loose_neurons.layers.values())
        tld.head_sync_matrices(stats, 1).metric("squared")
        # the KL loss's Hessian stands in for K at the unembedding
        kl = collect(model, tokens[:4], tld.degeneracy_hooks(model), jacobians=JacobianConfig(n_probes=1, loss="kl"),
                     progress=False)
        assert tld.degeneracy_report(model, kl).behavioral_loss == "kl"
        # the interaction graph: edges (all three methods), sparsity, modules, ablation
        from tl_degeneracy.interactions import (ablation_curves, collect_edges, find_modules, lorenz_curve,
                                                node_bases, sparsity_table)

        nodes = hooks[:2]
        bases = node_bases(stats, nodes)
        for kw in ({"exact": True}, {"exact": True, "method": "backward"}, {"n_probes": 2}):
            graphs = collect_edges(model, tokens[:4], bases, nodes, batch_size=2, progress=False, **kw)
        sparsity_table(graphs["pca"]); lorenz_curve(graphs["pca"].edges[0])
        find_modules(graphs["interaction"], eps_rtol=1e-3)
        ablation_curves(model, tokens[:4], bases, nodes[:1], progress=False)
        # Stats algebra and disk
        halves = [collect(model, t, hooks[:1], progress=False) for t in (tokens[:5], tokens[5:])]
        both = halves[0] + halves[1]
        halves[0].merge(halves[1])
        both.save("stats_checked.safetensors")
        assert Stats.load("stats_checked.safetensors").gram(hooks[0]).shape == (16, 16)
        print("OK")
    """)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    assert "OK" in result.stdout
