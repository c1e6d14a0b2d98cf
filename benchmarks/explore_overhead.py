"""What the direction dashboards cost next to the analysis they explore.

    python benchmarks/explore_overhead.py [--model default|smollm2] [--tokens 8192] [--repeats 3] [--threads 2]

One analysis folder is made first (``analyze`` on the defaults: every stage). Then, interleaved over
``--repeats`` rounds (medians reported, the load average beside them):

- ``analysis``: the analysis's collection pass again (``collect`` with its ``RunConfig``);
- ``examples``: the explore pass, ``DirectionExamples`` of the interaction basis and PCA (32 directions each,
  20 examples per sign) at every hook with bases;
- ``forward``: the same pass with an observer that does nothing (the forward the examples need anyway).

``examples − forward`` is the accumulator's own cost; the bases only exist once the analysis has run, so
the explore pass is a second pass over the data by construction, and ``examples / analysis`` is its whole
cost. Target (issue 19): the accumulator's overhead ≤ 10% of the analysis. Prints ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tl_degeneracy.analysis import analyze
from tl_degeneracy.analysis.pipeline import AnalysisConfig, collection_config, read_request
from tl_degeneracy.basis.bases import InteractionBasis
from tl_degeneracy.collection.accumulators import AdditiveAccumulator
from tl_degeneracy.collection.grams import collect
from tl_degeneracy.collection.observers import Observer
from tl_degeneracy.collection.stats import Stats
from tl_degeneracy.dashboards import DirectionExamples
from tl_degeneracy.default_model import default_text_dataset, load_default_model


class Count(AdditiveAccumulator):
    fields = ("n",)
    kind = "benchmark_count"


@dataclass(frozen=True)
class Nothing(Observer):
    """Reads the same hooks and only counts datapoints: the forward pass alone."""

    kind: ClassVar[str] = "nothing"
    hook_names: tuple[str, ...] = ()

    def hooks(self) -> list[str]:
        return list(self.hook_names)

    def compute(self, cache, mask, batch=None) -> dict:
        return {(self.kind, "n"): Count({"n": mask.sum().to(torch.int64)})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "smollm2"], default="default")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        from tl_degeneracy.loading import load_pretrained
        from tl_degeneracy.testing.hf_models import smollm2_folder

        model = load_pretrained(str(smollm2_folder()))
    else:
        model = load_default_model()
    data = default_text_dataset()
    times: dict[str, list[float]] = {"analysis": [], "examples": [], "forward": []}
    with tempfile.TemporaryDirectory() as out:
        analyze(model, data, out, max_tokens=args.tokens, progress=False, threads=args.threads)
        config: AnalysisConfig = read_request(out)["config"]
        run = collection_config(model, config)
        stats = Stats.load(f"{out}/stats.safetensors", groups=["activations"])
        bases = {"interaction": InteractionBasis.load(f"{out}/basis.safetensors"),
                 "pca": InteractionBasis.load(f"{out}/pca_basis.safetensors")}
        hooks = [h for h in bases["interaction"].hooks if h in bases["pca"].layers]
        layers = {name: [b[h] for h in hooks] for name, b in bases.items()}
        observer = DirectionExamples.build(layers, n_directions=32, n_examples=20, stats=stats)
        same = {"context": run.context, "batch_size": run.batch_size, "max_tokens": args.tokens, "progress": False}
        passes: dict[str, Any] = {
            "analysis": lambda: collect(model, data, config=run, max_tokens=args.tokens, progress=False),
            "examples": lambda: collect(model, data, [], observers=[observer], **same),
            "forward": lambda: collect(model, data, [], observers=[Nothing(tuple(hooks))], **same),
        }
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            for name, run_pass in passes.items():
                start = time.perf_counter()
                run_pass()
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "tokens": args.tokens, "threads": args.threads, "repeats": args.repeats,
              "batch_size": run.batch_size, "hooks": len(hooks), "median_s": median,
              "accumulator_overhead": (median["examples"] - median["forward"]) / median["analysis"],
              "explore_pass_over_analysis": median["examples"] / median["analysis"],
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
