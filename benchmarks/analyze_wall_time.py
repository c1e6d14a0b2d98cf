"""Wall time of the whole ``analyze`` (what ``tl-degeneracy analyze`` runs) on the embedded model.

    python benchmarks/analyze_wall_time.py [--tokens 8192] [--quick] [--interactions]

Collection (activations, Jacobians, head and neuron sync), bases, degeneracy account,
plots and report.html, into a temporary folder; with ``--interactions`` also what
``analyze --interactions`` adds on its defaults (exact edges over 1024 tokens in three bases,
sparsity, modules over five ε, ablation curves on 1024 held-out tokens), timed per stage.
Prints a ``RESULT {json}`` line. Target (issue 9): defaults with ``--interactions`` under
5 minutes on a 2-core CPU.
"""
import argparse
import json
import tempfile
import time

import torch

from tl_degeneracy.analysis import analyze
from tl_degeneracy.default_model import default_text_dataset, load_default_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="1024 tokens")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--interactions", action="store_true", help="also the interaction graph (defaults)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = 1024 if args.quick else args.tokens
    start = time.perf_counter()
    model, data = load_default_model(), default_text_dataset()
    loaded = time.perf_counter()
    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        report = analyze(model, data, out, max_tokens=tokens, progress=False)
        done = time.perf_counter()
        if args.interactions:
            from tl_degeneracy.analysis import render
            from tl_degeneracy.analysis.interactions import interactions_analysis

            section = interactions_analysis(model, data, out, progress=False)
            stages["edges"] = section["edge_seconds"]
            stages["sparsity_modules_ablation"] = section["seconds"] - section["edge_seconds"]
            render(out)
    end = time.perf_counter()
    print(f"analyze on the embedded model: {report.n_tokens} tokens in {done - loaded:.1f} s "
          f"(+{loaded - start:.1f} s loading), {report.n_tokens / (done - loaded):.0f} tokens/s")
    if args.interactions:
        print(f"+ interactions: {end - done:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in stages.items())}); "
              f"total {end - start:.1f} s with loading (target < 300 s)")
    print("RESULT " + json.dumps({"benchmark": "analyze_wall_time", "tokens": report.n_tokens,
                                  "seconds": done - loaded, "load_seconds": loaded - start,
                                  "interactions_seconds": end - done if args.interactions else None,
                                  "stages": stages, "total_seconds": end - start}))


if __name__ == "__main__":
    main()
