"""Module search at SmolLM2/GPT-2 scale (issue 20): ``find_modules`` on a synthetic 13 × 768 graph.

The graph: ``--nodes`` × ``--width`` directions (GPT-2 small's 13 residual nodes × 768 by default)
in ``--planted`` modules of equal size, shuffled per node. With ``z ~ N(0, 1)`` per edge,
``E = exp(z)`` inside a module and ``E = ε · exp(spread · z)`` across, ε = ``--eps`` (absolute): an edge
across modules costs ``½ · spread · z`` when ``z > 0``, so about half of them cost something, every
module is joined to every other, no zero-cost packing exists and METIS does the work. Of the
12 × 768² = 7.1 M edges about 4.0 M cost more than 0 (the goal asks for ≥ 3 M).

- ``--spread 0.05`` (default, timed): clearly modular. The planted modules are the cheapest eight
  and should come out whole.
- ``--hard-spread 1`` (quality only): weakly modular. Cutting between two layers (≈ 0.33 M edges of
  one pair) is then cheaper than cutting every cross edge, and the best partitions mix the two.

Timed, as medians of ``--repeats`` interleaved rounds after a warm-up: ``find_modules`` with 2 and
with 8 modules, the whole call (costs, CSR arrays, components, METIS runs, the float64 cost, the
cut edges). Timed once, for the breakdown: the cost CSR, the components, one METIS bisection, and
``module_sweep``'s random baseline (200 random partitions into the eight modules' sizes, per ε).
For the choice of our recursion over METIS's own k-way, on both graphs: METIS's direct k-way call
and its one-call recursive bisection on the same integer weights with ``ufactor`` = 1000 β, their
costs recomputed in float64 next to ours and the planted partition's.
"kept whole" is the fraction of vertices whose module holds most of their planted module (1.0:
every planted module lies inside one found module; for eight modules, exact recovery).

Goals (2 CPU cores): bisection ≤ 5 s, 8 modules ≤ 15 s.

    python benchmarks/module_search.py             # 13 × 768, 3 repeats, 2 threads
    python benchmarks/module_search.py --quick     # 4 × 128: seconds
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_shaped import emit_result, interleaved_medians  # noqa: E402

from tl_degeneracy.interactions.graph import InteractionGraph  # noqa: E402
from tl_degeneracy.interactions.modules import (  # noqa: E402
    DEFAULT_BALANCE,
    cost_csr,
    cut_cost,
    find_modules,
    random_partition_costs,
)
from tl_degeneracy.interactions.partition import integer_weights, metis_bisection  # noqa: E402

GOALS = {"bisection": 5.0, "eight_way": 15.0}


def planted_graph(nodes: int, width: int, planted: int, eps: float, spread: float,
                  seed: int) -> tuple[InteractionGraph, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    truth = [torch.arange(planted).repeat_interleave(width // planted)[torch.randperm(width, generator=gen)]
             for _ in range(nodes)]
    edges = []
    for a, b in zip(truth[:-1], truth[1:]):
        z = torch.randn(width, width, generator=gen, dtype=torch.float64)
        edges.append(torch.where(b[:, None] == a[None, :], torch.exp(z), eps * torch.exp(spread * z)))
    graph = InteractionGraph("synthetic", [f"blocks.{l}.hook_resid_pre" for l in range(nodes)], edges)
    return graph, torch.cat(truth).numpy()


def kept_whole(labels: Any, truth: np.ndarray) -> float:
    """Fraction of vertices in the found module that holds most of their planted module."""
    labels = np.asarray(labels)
    return float(sum(np.bincount(labels[truth == p]).max() for p in np.unique(truth)) / len(truth))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed_once(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def metis_one_call(graph: InteractionGraph, truth: np.ndarray, eps: float, k: int, recursive: bool,
                   seed: int) -> dict[str, Any]:
    """METIS partitioning all vertices into k parts in one call (no exact steps, no trimming)."""
    import pymetis

    H = cost_csr(graph, eps)
    w = integer_weights(H.costs)
    options = pymetis.Options(ufactor=max(1, round(1000 * DEFAULT_BALANCE)), seed=seed)
    adjacency = pymetis.CSRAdjacency(H.indptr, H.indices)
    seconds, (_, parts) = timed_once(lambda: pymetis.part_graph(k, adjacency=adjacency, eweights=w.weights,
                                                                options=options, recursive=recursive))
    labels = np.asarray(parts)
    return {"seconds": round(seconds, 3), "cut_cost": cut_cost(graph, labels.tolist(), eps),
            "kept_whole": kept_whole(labels, truth), "module_sizes": np.bincount(labels, minlength=k).tolist()}


def compare_eight_way(graph: InteractionGraph, truth: np.ndarray, eps: float, args: argparse.Namespace,
                      ours: Any | None = None) -> dict[str, Any]:
    """Our recursion against METIS's own k-way and recursive calls, and the planted partition."""
    if ours is None:
        seconds, ours = timed_once(lambda: find_modules(graph, eps=eps, n_modules=8, restarts=args.restarts,
                                                        seed=args.seed))
    else:
        seconds = None
    out = {"planted_cost": cut_cost(graph, truth.tolist(), eps),
           "ours": {"seconds": None if seconds is None else round(seconds, 3), "cut_cost": ours.cut_cost,
                    "kept_whole": kept_whole(ours.assignment, truth), "module_sizes": ours.module_sizes},
           "metis_kway_one_call": metis_one_call(graph, truth, eps, 8, False, args.seed),
           "metis_recursive_one_call": metis_one_call(graph, truth, eps, 8, True, args.seed)}
    for name in ("ours", "metis_kway_one_call", "metis_recursive_one_call"):
        r = out[name]
        time_text = "" if r["seconds"] is None else f"{r['seconds']:.2f} s, "
        print(f"  {name}: {time_text}cut cost {r['cut_cost']:.6g} (planted {out['planted_cost']:.6g}), kept whole "
              f"{r['kept_whole']:.3f}, sizes {min(r['module_sizes'])} … {max(r['module_sizes'])}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 × 128 directions (seconds; checks the script)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default 13; 4 with --quick)")
    parser.add_argument("--width", type=int, default=None, help="directions per node (default 768; 128 with --quick)")
    parser.add_argument("--planted", type=int, default=8, help="planted modules (default 8)")
    parser.add_argument("--eps", type=float, default=1e-3, help="the loss scale ε, absolute (default 1e-3)")
    parser.add_argument("--spread", type=float, default=0.05, help="log-spread of cross edges, timed graph")
    parser.add_argument("--hard-spread", type=float, default=1.0, help="log-spread of cross edges, hard graph")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--restarts", type=int, default=8, help="METIS runs per split (default 8)")
    parser.add_argument("--random", type=int, default=20, help="random partitions for the baseline (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write the result dict to this file")
    args = parser.parse_args(argv)
    nodes = args.nodes or (4 if args.quick else 13)
    width = args.width or (128 if args.quick else 768)
    torch.set_num_threads(args.threads)  # the costs are torch ops; METIS and numpy run on one core
    load_start = load()

    eps = args.eps
    graph, truth = planted_graph(nodes, width, args.planted, eps, args.spread, args.seed)
    n_pos = cost_csr(graph, eps).n_edges
    print(f"graph: {nodes} nodes × {width} directions ({graph.n_vertices} vertices), {args.planted} planted "
          f"modules, spread {args.spread:g}: {sum(E.numel() for E in graph.edges):,} edges, {n_pos:,} with "
          f"E > ε = {eps:g}; torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {load_start}", flush=True)

    results: dict[str, Any] = {}
    runs = {"bisection": lambda: find_modules(graph, eps=eps, n_modules=2, restarts=args.restarts, seed=args.seed),
            "eight_way": lambda: find_modules(graph, eps=eps, n_modules=8, restarts=args.restarts, seed=args.seed)}
    timing = interleaved_medians(runs, args.repeats)
    found = {}
    for name in runs:
        found[name] = result = runs[name]()
        seconds, random = timed_once(lambda r=result: random_partition_costs(graph, eps, r.module_sizes,
                                                                             n=args.random, seed=args.seed))
        results[name] = {
            "median_s": round(timing[name]["median"], 3), "times_s": [round(t, 3) for t in timing[name]["all"]],
            "goal_s": GOALS[name], "met": timing[name]["median"] <= GOALS[name],
            "cut_cost": result.cut_cost, "kept_whole": kept_whole(result.assignment, truth),
            "random_mean": float(random.costs.mean()), "random_min": float(random.costs.min()),
            "random_seconds": round(seconds, 3), "module_sizes": result.module_sizes,
            "n_cut_edges": result.n_cut_edges, "n_positive_edges": result.n_positive_edges,
            "splits": [{"method": b.method, "sizes": list(b.sizes), "cost": b.cost,
                        "resolution": b.metis.resolution if b.metis else None,
                        "moved": b.metis.moved if b.metis else None} for b in result.bisections]}
        r = results[name]
        print(f"{name}: median {r['median_s']:.2f} s (goal ≤ {r['goal_s']:.0f} s: {'met' if r['met'] else 'MISSED'}), "
              f"rounds {r['times_s']}; cut cost {r['cut_cost']:.6g}, kept whole {r['kept_whole']:.3f}, "
              f"random mean {r['random_mean']:.6g} over {args.random} ({seconds:.2f} s); sizes "
              f"{min(r['module_sizes'])} … {max(r['module_sizes'])}; methods {[s['method'] for s in r['splits']]}; "
              f"moved {[s['moved'] for s in r['splits']]}; METIS resolution {r['splits'][0]['resolution']:.3g} nats",
              flush=True)

    # the parts of one call, once each
    import pymetis

    parts: dict[str, float] = {}
    parts["cost_csr"], H = timed_once(lambda: cost_csr(graph, eps))
    parts["components"], _ = timed_once(H.components)
    bounds = (int(0.4 * H.n_vertices), int(0.6 * H.n_vertices))
    parts["one_metis_run"], _ = timed_once(lambda: metis_bisection(H, [0.5], *bounds, seed=args.seed, runs=1,
                                                                   metis=pymetis))
    parts["random_200_of_8"], _ = timed_once(lambda: random_partition_costs(graph, eps, found["eight_way"].module_sizes,
                                                                            n=200, seed=args.seed))
    results["parts_s"] = {k: round(v, 3) for k, v in parts.items()}
    print("parts (once each): " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()), flush=True)

    print(f"eight modules, spread {args.spread:g} (the timed graph):", flush=True)
    results["compare_modular"] = compare_eight_way(graph, truth, eps, args, ours=found["eight_way"])
    hard, hard_truth = planted_graph(nodes, width, args.planted, eps, args.hard_spread, args.seed)
    print(f"eight modules, spread {args.hard_spread:g} (weakly modular):", flush=True)
    results["compare_hard"] = compare_eight_way(hard, hard_truth, eps, args)

    out = {"benchmark": "module_search", "nodes": nodes, "width": width, "vertices": graph.n_vertices,
           "planted": args.planted, "eps": eps, "spread": args.spread, "hard_spread": args.hard_spread,
           "positive_edges": n_pos, "threads": args.threads, "cpu_count": os.cpu_count(), "restarts": args.restarts,
           "repeats": args.repeats, "pymetis": pymetis.version, "loadavg_start": load_start, "loadavg_end": load(),
           **results}
    print(f"load average at the end {out['loadavg_end']}", flush=True)
    emit_result(out, args)
    return out


if __name__ == "__main__":
    main()
