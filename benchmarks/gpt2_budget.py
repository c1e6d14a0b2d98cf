"""The 1M-token analysis budget on a GPT-2-small-shaped model (issue 11).

The run it projects: 1,000,000 tokens at context 1024; ``G`` at every residual hook point
(``hook_resid_pre`` of each block and the final ``hook_resid_post``) and ``mlp.hook_post``,
``M`` with 4 random probes per batch at every residual hook point, head synchronisation at
every layer, then the interaction basis at every residual hook point. One ``collect`` pass
does all of the streaming; the fit is a separate stage.

It measures ``--tokens`` of it (CPU default: 2 sequences of 1024; the whole million where a
GPU makes that affordable), prints tokens/s of each stage, peak host (and device) memory and
the projected wall time of the full million, and writes a JSON row (``--json``). The model
is ``gpt2`` from the hub where it is reachable (``--pretrained``), else random weights of the
same shapes.

    python benchmarks/gpt2_budget.py                       # CPU: 2048 tokens measured, projected
    python benchmarks/gpt2_budget.py --device cuda --dtype bfloat16 --tokens 1000000
    python benchmarks/gpt2_budget.py --quick               # 2-layer small model, seconds
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_shaped import build_model, emit_result, environment, model_config, random_tokens  # noqa: E402

FULL_TOKENS = 1_000_000
GOAL_SECONDS, GOAL_DEVICE_GB = 15 * 60, 20.0  # on one H100 (the goal)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-layer small model, 2 × 64 tokens")
    parser.add_argument("--tokens", type=int, default=None, help="tokens to measure (default: 2 × context)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default 1024)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 1 on CPU, 8 on GPU)")
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--pretrained", action="store_true", help="load gpt2 from the hub (needs network)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage-sequences", type=int, default=8,
                        help="sequences each stage is timed on alone, for the breakdown (default 8)")
    parser.add_argument("--json", default=None, help="also write the result row to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tl_degeneracy as tld

    preset = "small" if args.quick else "gpt2"
    context = args.context or (64 if args.quick else 1024)
    on_gpu = args.device.startswith("cuda")
    batch_size = args.batch_size or (8 if on_gpu else 1)
    tokens_measured = args.tokens or 2 * context
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.pretrained:
        model = tld.loading.load_pretrained("gpt2", dtype=dtype, device=args.device)
        vocab = int(model.cfg.d_vocab)
    else:
        cfg = model_config(preset)
        model = build_model(preset, dtype=dtype).to(args.device)
        vocab = cfg["d_vocab"]
    build_s = time.perf_counter() - t0
    L = int(model.cfg.n_layers)
    residual = tld.residual_hooks(model)
    hooks = residual + [tld.act_name("post", l) for l in range(L)]
    n_seq = max(1, -(-tokens_measured // context))
    tokens = random_tokens(n_seq, context, vocab, seed=0)
    print(f"{type(model).__name__}, {L} layers, d_model {model.cfg.d_model}, {args.dtype} on {args.device}; "
          f"measuring {n_seq * context} tokens (context {context}, batch {batch_size}); built in {build_s:.1f}s",
          flush=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    # Stage 1: the streaming pass (G everywhere, M at the residual stream, head sync).
    jac = tld.JacobianConfig(n_probes=args.probes)
    # Warm-up (one sequence, untimed): first-call costs of kernels, LAPACK and the read-out check.
    warm = tld.collect(model, tokens[:1], hooks, jacobians=jac, jacobian_hooks=residual, observers=[tld.HeadSync()],
                       batch_size=1, progress=False)
    tld.InteractionBasis.fit(warm, hooks=residual)
    sync()
    start = time.perf_counter()
    stats = tld.collect(model, tokens, hooks, jacobians=jac, jacobian_hooks=residual, observers=[tld.HeadSync()],
                        batch_size=batch_size, progress=False)
    sync()
    collect_s = time.perf_counter() - start
    # The streaming pass by stage, each alone on the first sequences (as a breakdown of the pass above).
    stage_seq = tokens[: max(1, min(n_seq, args.stage_sequences))]
    stages = {
        f"G at {len(hooks)} hooks": dict(hooks=hooks),
        f"G+M at {len(residual)} residual hooks ({args.probes} probes)": dict(hooks=residual, jacobians=jac),
        "head sync (all layers)": dict(hooks=residual[:1], observers=[tld.HeadSync()]),
    }
    stage_rates: dict[str, float] = {}
    for name, options in stages.items():
        sync()
        start = time.perf_counter()
        tld.collect(model, stage_seq, batch_size=batch_size, progress=False, **options)
        sync()
        stage_rates[name] = round(stage_seq.numel() / (time.perf_counter() - start), 1)
    # Stage 2: the interaction basis at every residual hook point.
    start = time.perf_counter()
    basis = tld.InteractionBasis.fit(stats, hooks=residual)
    fit_s = time.perf_counter() - start
    n_tok = stats.n_tokens
    per_s = n_tok / collect_s
    projected = FULL_TOKENS / per_s + fit_s
    host_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    device_peak_gb = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    result = {
        "benchmark": "gpt2_budget", "device": args.device, "device_name": torch.cuda.get_device_name() if on_gpu
        else "cpu", "dtype": args.dtype, "preset": "gpt2 (hub)" if args.pretrained else preset,
        "context": context, "batch_size": batch_size, "probes": args.probes, "tokens_measured": n_tok,
        "probe_space": stats.run.jacobians["probe_space"] if stats.run and stats.run.jacobians else None,
        "collect_tokens_per_s": round(per_s, 1),
        "stage_tokens_per_s": stage_rates, "collect_s": round(collect_s, 2), "fit_s": round(fit_s, 2),
        "projected_1M_s": round(projected, 1), "projected_1M_h": round(projected / 3600, 2),
        "host_peak_gb": round(host_peak_gb, 2), "device_peak_gb": None if device_peak_gb is None
        else round(device_peak_gb, 2), "basis_dims": {h: basis[h].k for h in residual[:2]},
        "goal": f"H100: < {GOAL_SECONDS // 60} min and < {GOAL_DEVICE_GB:g} GB device memory",
        "environment": environment(),
    }
    print(f"collect (G at {len(hooks)} hooks, M at {len(residual)} with {args.probes} probes, head sync): "
          f"{per_s:,.0f} tokens/s ({collect_s:.1f}s for {n_tok} tokens)")
    for name, rate in stage_rates.items():
        print(f"  stage alone, {name}: {rate:,.0f} tokens/s")
    print(f"interaction basis at {len(residual)} hooks: {fit_s:.2f}s")
    print(f"projected for {FULL_TOKENS:,} tokens: {projected / 60:,.1f} min; peak host {host_peak_gb:.2f} GB"
          + ("" if device_peak_gb is None else f", peak device {device_peak_gb:.2f} GB"))
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
