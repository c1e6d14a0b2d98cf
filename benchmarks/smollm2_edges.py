"""SmolLM2-135M's interaction graph at LLM scale on this machine: wall time and peak RSS of a budgeted edge pass.

    python benchmarks/smollm2_edges.py --folder DIR [--tokens 512] [--top-k 64]
                                       [--bases interaction pca] [--rest-probes 8] [--memory-gib 1.5]
                                       [--threads 2] [--pairs N]

All 30 layer pairs (the 31 residual nodes ``blocks.l.hook_resid_pre`` and the last ``hook_resid_post``),
exact forward-mode edges among the top ``--top-k`` directions per node (by Λ for the interaction basis,
variance for PCA), each node's other directions in one rest vertex estimated by ``--rest-probes``
Rademacher probes; one sequence of ``--tokens`` tokens of the embedded text. The bases are read from
``--folder`` (a finished ``analyze`` of SmolLM2: ``basis.safetensors``, ``pca_basis.safetensors``; read only).
The cost estimate (passes, FLOPs, projected time from a timed calibration chunk) is printed first and
compared with the measured time. Peak RSS is the process's (``getrusage``), model and bases included.
Target (issue 20, a 2-core CPU): ≤ 20 min and ≤ 6 GB. Prints a ``RESULT {json}`` line.

glibc returns every freed block above 32 MB to the kernel, so each vmapped call's large temporaries
are page-faulted in afresh: ~40% of the CPU time of a pass went to the kernel here. Unless
``--no-malloc-tuning``, the script re-runs itself with ``MALLOC_MMAP_MAX_=0`` (large blocks from the
heap), a 16 GiB trim threshold and a 1 GiB top pad, so freed memory is reused (``MALLOC_TUNING``; the
same variables work for ``tl-degeneracy interactions``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

MALLOC_TUNING = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30), "MALLOC_TOP_PAD_": str(2**30)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True,
                        help="a SmolLM2 analysis with residual bases (read only), e.g. from analyze MODEL --stages "
                             "grams,jacobians --hooks 'blocks.*.hook_resid_pre' 'blocks.29.hook_resid_post'")
    parser.add_argument("--tokens", type=int, default=512, help="one sequence of this many tokens")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--bases", nargs="+", default=["interaction", "pca"], choices=["interaction", "pca"])
    parser.add_argument("--rest-probes", type=int, default=8)
    parser.add_argument("--memory-gib", type=float, default=1.5, help="memory for one vmapped call's passes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=None, help="only the first N layer pairs (a quick look)")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="run with glibc's default malloc settings")
    args = parser.parse_args()
    if not args.no_malloc_tuning and any(os.environ.get(k) != v for k, v in MALLOC_TUNING.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNING})  # read at start-up

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import load_smollm2

    from tl_degeneracy.basis.bases import InteractionBasis
    from tl_degeneracy.hook_names import residual_hooks
    from tl_degeneracy.interactions.edges import EdgeConfig, collect_edges, estimate_edge_cost
    from tl_degeneracy.interactions.graph import DirectionBudget
    from tl_degeneracy.interactions.sparsity import sparsity_table

    model, ids, load_seconds = load_smollm2(args.threads)
    files = {"interaction": "basis.safetensors", "pca": "pca_basis.safetensors"}
    bases = {name: InteractionBasis.load(Path(args.folder) / files[name]) for name in args.bases}
    nodes = residual_hooks(model)
    if args.pairs is not None:
        nodes = nodes[:args.pairs + 1]
    tokens = ids[:args.tokens].reshape(1, args.tokens)
    budget = DirectionBudget(top_k=args.top_k, rest_probes=args.rest_probes)
    config = EdgeConfig.build(model, bases, nodes, exact=True, batch_size=1, budget=budget,
                              chunk_budget_bytes=int(args.memory_gib * 2**30))
    load_before = _load()
    start = time.perf_counter()
    cost = estimate_edge_cost(model, config, (1, args.tokens), 1)
    estimate_seconds = time.perf_counter() - start
    print(cost.describe(), flush=True)
    start = time.perf_counter()
    graphs = collect_edges(model, tokens, bases, config=config, progress=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    load_after = _load()
    summary = {}
    for name, graph in graphs.items():
        rows = sparsity_table(graph)
        stderr = [s for s in graph.meta["rest_rel_stderr"] if s is not None]
        summary[name] = {
            "kept_per_node": sorted({len(d) for d in graph.directions}),
            "rest_per_node": sorted(set(graph.rest)),
            "rest_share_median": sorted(r["rest_share"] for r in rows)[len(rows) // 2],
            "rest_share_max": max(r["rest_share"] for r in rows),
            "rest_rel_stderr_max": max(stderr) if stderr else None,
            "gini_kept_median": sorted(r["gini"] for r in rows)[len(rows) // 2],
            "edges_99_kept_median": sorted(r["fractions"]["0.99"] for r in rows)[len(rows) // 2],
        }
    result = {
        "benchmark": "smollm2_edges", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "pairs": len(nodes) - 1, "tokens": args.tokens, "top_k": args.top_k, "bases": args.bases,
        "rest_probes": args.rest_probes, "memory_gib": args.memory_gib, "threads": args.threads,
        "cores": os.cpu_count(), "malloc": {k: os.environ.get(k) for k in MALLOC_TUNING},
        "load_seconds": round(load_seconds, 1), "estimate": cost.to_dict(),
        "estimate_seconds": round(estimate_seconds, 1), "wall_s": round(wall, 1),
        "projected_over_measured": None if cost.total_seconds is None else round(cost.total_seconds / wall, 2),
        "peak_rss_gb": round(peak / 1e9, 2),
        "process_cpu_s": {"user": round(usage.ru_utime, 1), "sys": round(usage.ru_stime, 1)},
        "load_before": load_before, "load_after": load_after,
        "graphs": summary, "targets": {"wall_s": 1200, "peak_rss_gb": 6.0},
    }
    print(f"edges: {wall:.0f} s ({wall / 60:.1f} min), peak RSS {peak / 1e9:.2f} GB, load average {load_before} "
          f"→ {load_after}; projected {cost.total_seconds or float('nan'):.0f} s")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
