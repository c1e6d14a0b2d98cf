"""Wall time of the whole ``analyze`` (what ``tl-degeneracy analyze`` runs) on the embedded model.

    python benchmarks/analyze_wall_time.py [--tokens 8192] [--quick]

Collection (activations, Jacobians, head and neuron sync), bases, degeneracy account,
plots and report.html, into a temporary folder; prints a ``RESULT {json}`` line.
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = 1024 if args.quick else args.tokens
    start = time.perf_counter()
    model, data = load_default_model(), default_text_dataset()
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = analyze(model, data, out, max_tokens=tokens, progress=False)
    done = time.perf_counter()
    print(f"analyze on the embedded model: {report.n_tokens} tokens in {done - loaded:.1f} s "
          f"(+{loaded - start:.1f} s loading), {report.n_tokens / (done - loaded):.0f} tokens/s")
    print("RESULT " + json.dumps({"benchmark": "analyze_wall_time", "tokens": report.n_tokens,
                                  "seconds": done - loaded, "load_seconds": loaded - start}))


if __name__ == "__main__":
    main()
