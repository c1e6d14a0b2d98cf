"""The edge pass under ``torchrun --nproc_per_node 2`` (gloo) equals one process (to 1e-12).

This file is also the worker: ``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/test_edges_distributed.py BASES_DIR OUT CHECKPOINT`` runs ``edge_pass`` on every rank; each rank takes
every second batch (the stream driver), the sums are all-reduced, and rank 0 saves the graphs.
The pass is forward mode with a direction budget whose rest vertices are estimated by probes (seeded
by batch index, so ranks must not change them); the stream driver is the same for every method.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.collection.options import StreamOptions
from tl_degeneracy.collection.stream import stream
from tl_degeneracy.interactions.edges import EdgeConfig, graphs_from_stats, node_bases
from tl_degeneracy.interactions.graph import DirectionBudget, load_graphs, save_graphs
from tl_degeneracy.testing import tiny_model

pytestmark = [pytest.mark.models, pytest.mark.slow]  # two fresh processes import torch: ~20 s on 2 cores
NODES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
TOKENS = torch.randint(0, 23, (16, 12), generator=torch.Generator().manual_seed(5))
PASSES = {"budget": dict(exact=True, budget=DirectionBudget(top_k=5, rest_probes=3))}


def edge_pass(bases_dir: Path, which: str, checkpoint: Path | None = None) -> tuple[dict, object]:
    """One edge pass over 8 batches of 2 sequences; the graphs and the summed statistics."""
    model = tiny_model(seed=0)
    bases = {name: tld.InteractionBasis.load(bases_dir / f"{name}.safetensors") for name in ("interaction", "pca")}
    config = EdgeConfig.build(model, bases, NODES, batch_size=2, **PASSES[which])
    stats = stream(model, TOKENS, config, StreamOptions(progress=False, checkpoint=checkpoint), desc="edges")
    return graphs_from_stats(stats, config), stats


def _worker(bases_dir: str, out: str, checkpoint: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        for which in PASSES:
            graphs, stats = edge_pass(Path(bases_dir), which, Path(f"{checkpoint}.{which}.safetensors"))
            if torch.distributed.get_rank() == 0:
                save_graphs(graphs, Path(f"{out}.{which}.safetensors"), {"world": stats.progress.world_size,
                                                                          "n_batches": stats.n_batches})
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def bases_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    stats = tld.collect(tiny_model(seed=0), TOKENS, NODES, jacobians=True, progress=False)
    for name, basis in node_bases(stats, NODES, kinds=("interaction", "pca")).items():
        basis.save(folder / f"{name}.safetensors")
    return folder


def test_torchrun_two_processes_give_the_one_process_edges(bases_dir, tmp_path):
    out, ckpt = tmp_path / "graphs", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(bases_dir), str(out), str(ckpt)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for which in PASSES:
        one, _ = edge_pass(bases_dir, which)
        two = load_graphs(Path(f"{out}.{which}.safetensors"))
        # each rank summed its own 4 of the 8 batches (its checkpoint is written before the all-reduce)
        for rank in (0, 1):
            assert tld.Stats.load(Path(f"{ckpt}.{which}.rank{rank}.safetensors")).n_batches == 4
        for name in ("interaction", "pca"):
            assert two[name].nodes == one[name].nodes and two[name].n_datapoints == one[name].n_datapoints
            assert two[name].directions == one[name].directions and two[name].rest == one[name].rest
            for a, b in zip(two[name].edges, one[name].edges):
                assert a.shape == b.shape and float(b.abs().max()) > 0
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
            basis = tld.InteractionBasis.load(bases_dir / f"{name}.safetensors")
            assert two[name].rest == [basis[h].k - 5 for h in NODES]
            assert one[name].meta["rest_estimate"] == ["probes", "probes"]
            assert two[name].meta["rest_rel_stderr"] == pytest.approx(one[name].meta["rest_rel_stderr"], rel=1e-12)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
