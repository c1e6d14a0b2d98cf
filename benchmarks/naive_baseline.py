"""Throughput of ``tl_degeneracy.collect`` vs the naive way: ``run_with_cache`` + dense Grams.

Same model (GPT-2-small-shaped random), same tokens, Grams at every ``hook_resid_pre``:
    collect          ``collect(model, tokens, "blocks.*.hook_resid_pre", batch_size=B, progress=False)``
    naive_streaming  per batch ``_, cache = model.run_with_cache(batch, names_filter=hooks)``, then
                     ``S += x.double().T @ x.double()``, ``s += x.sum(0)`` per hook (full forward,
                     the cache holds every hook's activations at once)
    naive_dense      cache every batch, concatenate per hook at the end, one dense Gram per hook
                     (what the tests' dense reference does; memory grows with the data)
Interleaved over ``--repeats`` rounds after a warm-up; medians. The Grams of all three are
checked to agree (relative 1e-10), so the comparison is like for like.

    python benchmarks/naive_baseline.py --batch-size 2 --context 256 --batches 3 --repeats 3
    python benchmarks/naive_baseline.py --quick
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_shaped import (  # noqa: E402
    add_common_args,
    build_model,
    describe_run,
    emit_result,
    environment,
    finish_args,
    interleaved_medians,
    model_config,
    random_tokens,
    resid_pre_hooks,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=2, context=256, batches=3, repeats=3)
    args = finish_args(parser.parse_args(argv))

    import tl_degeneracy

    cfg = model_config(args.preset, args.layers)
    L, d, B, T = cfg["n_layers"], cfg["d_model"], args.batch_size, args.context
    t0 = time.perf_counter()
    model = build_model(args.preset, args.layers, seed=args.seed)
    print(f"built the model in {time.perf_counter() - t0:.1f}s")
    print(describe_run(args, model))
    hooks = resid_pre_hooks(L)
    tokens = random_tokens(args.batches * B, T, cfg["d_vocab"], seed=args.seed)
    batches = list(tokens.split(B))
    n_tok = tokens.numel()
    print(f"data: {args.batches} batches x [{B}, {T}] = {n_tok} tokens; {L} x hook_resid_pre; "
          f"{args.repeats} interleaved repeats (medians)")

    out: dict[str, Any] = {}

    def run_collect() -> None:
        stats = tl_degeneracy.collect(model, tokens, "blocks.*.hook_resid_pre", batch_size=B, progress=False)
        out["collect"] = {h: stats.gram(h) for h in hooks}

    def naive_streaming() -> None:
        S = {h: torch.zeros(d, d, dtype=torch.float64) for h in hooks}
        s = {h: torch.zeros(d, dtype=torch.float64) for h in hooks}
        n = 0
        with torch.no_grad():
            for b in batches:
                _, cache = model.run_with_cache(b, names_filter=hooks)
                for h in hooks:
                    x = cache[h].reshape(-1, d).double()
                    S[h] += x.T @ x
                    s[h] += x.sum(0)
                n += b.numel()
                del cache
        out["naive_streaming"] = {h: S[h] / n for h in hooks}

    def naive_dense() -> None:
        acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        with torch.no_grad():
            for b in batches:
                _, cache = model.run_with_cache(b, names_filter=hooks)
                for h in hooks:
                    acts[h].append(cache[h].reshape(-1, d).clone())
                del cache
        grams = {}
        for h in hooks:
            x = torch.cat(acts[h]).double()
            grams[h] = (x.T @ x) / x.shape[0]
        out["naive_dense"] = grams

    print("warm-up ...")
    with torch.no_grad():
        model.run_with_cache(batches[0], names_filter=hooks)
    tl_degeneracy.collect(model, batches[0], "blocks.*.hook_resid_pre", batch_size=B, progress=False)
    print("timing collect / naive_streaming / naive_dense ...")
    timing = interleaved_medians({"collect": run_collect, "naive_streaming": naive_streaming,
                                  "naive_dense": naive_dense}, args.repeats, warmup=False)

    worst = 0.0
    for name in ("naive_streaming", "naive_dense"):
        for h in hooks:
            ref = out[name][h]
            worst = max(worst, float((out["collect"][h] - ref).norm() / ref.norm()))
    tps = {k: n_tok / v["median"] for k, v in timing.items()}
    speedup = {k: timing[k]["median"] / timing["collect"]["median"] for k in ("naive_streaming", "naive_dense")}
    print()
    for k in ("collect", "naive_streaming", "naive_dense"):
        print(f"tokens/s  {k:<16} {tps[k]:10.1f}   (median {timing[k]['median']:.3f}s, "
              f"spread {timing[k]['min']:.2f}-{timing[k]['max']:.2f}s)")
    print(f"SPEEDUP of collect: {speedup['naive_streaming']:.3f}x vs run_with_cache + per-batch Gram, "
          f"{speedup['naive_dense']:.3f}x vs cache-everything + dense Gram")
    print(f"Grams agree: max relative Frobenius difference {worst:.2e}")
    if worst > 1e-10:
        raise SystemExit(f"collect and the naive baseline disagree ({worst:.2e}); the comparison is void")

    result = {
        "benchmark": "naive_baseline",
        "ratio": timing["collect"]["median"] / timing["naive_streaming"]["median"],
        "speedup_vs_naive_streaming": speedup["naive_streaming"],
        "speedup_vs_naive_dense": speedup["naive_dense"],
        "max_rel_diff": worst,
        "tokens_per_s": tps,
        "timing": timing,
        "config": {"preset": args.preset, "n_layers": L, "batch_size": B, "context": T, "batches": args.batches,
                   "repeats": args.repeats, "model_class": type(model).__name__},
        "env": environment(),
    }
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
