"""Exact ``M`` at the last position of a 128-token context: vocabulary vs residual basis (issue 11).

Exact mode needs one backward pass per component of the output's Hessian factor: ``d_vocab``
(50257 for GPT-2) with vocabulary probes, ``k = rank(W_U) ≤ d_model`` (768) when probes live
in the residual basis (``readout.py``), which also skips the unembedding's backward pass.

Timing a full vocabulary run would take hours on a CPU, so both paths are timed the same way:
one forward with the graph, then ``--sample`` exact probes of each path (chunked as ``collect``
chunks them, Grams included), interleaved over ``--repeats`` rounds; the per-probe medians are
projected to the full probe counts. ``--full`` also times the whole residual-basis run through
``collect`` (the number a user waits for).

    python benchmarks/exact_jacobian.py                  # GPT-2-small shape, 64 probes sampled per path
    python benchmarks/exact_jacobian.py --quick
"""
from __future__ import annotations

import argparse
import itertools
import statistics
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
    finish_args,
    model_config,
    random_tokens,
    resid_pre_hooks,
)

TARGET = 1 / 30  # new time / today's time


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=1, context=128, batches=1, repeats=3)
    parser.add_argument("--sample", type=int, default=None, help="exact probes timed per path (default 64)")
    parser.add_argument("--full", action="store_true", help="also time the whole residual-basis run via collect")
    args = finish_args(parser.parse_args(argv))
    sample = args.sample or (16 if args.quick else 64)

    import tl_degeneracy as tld
    from tl_degeneracy.collection.accumulators import GramAccumulator
    from tl_degeneracy.collection.batch_pass import chunked, probe_chunk_size
    from tl_degeneracy.collection.probes import ProbeMap, exact_probes
    from tl_degeneracy.collection.readout import find_readout
    from tl_degeneracy.forward import batched_vjp

    cfg = model_config(args.preset, args.layers)
    L, V, B, T = cfg["n_layers"], cfg["d_vocab"], args.batch_size, args.context
    model = build_model(args.preset, args.layers, seed=args.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    print(describe_run(args, model))
    hooks = resid_pre_hooks(L)
    tokens = random_tokens(B, T, V, seed=args.seed)
    readout = find_readout(model)
    assert readout is not None, "this model's logits should be a linear read-out"
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[name] = act
            return act
        return hook

    with model.hooks(fwd_hooks=[(h, capture(h)) for h in [*hooks, readout.hook]]):
        logits = model(tokens)
    inputs = [captured[h] for h in hooks]
    paths = {
        "vocabulary": (logits[:, -1:], ProbeMap(V, lambda xi: xi)),
        "residual": (captured[readout.hook][:, -1:], ProbeMap(readout.k, readout.apply, columns=readout.factor.T)),
    }
    totals = {"vocabulary": V, "residual": readout.k}
    jac = tld.JacobianConfig(exact=True)

    def run(path: str) -> None:
        z, space = paths[path]
        probes = itertools.islice(exact_probes(z, space), sample)
        for chunk in chunked(probes, probe_chunk_size(jac, z, inputs)):
            for g in batched_vjp(z, inputs, chunk):
                assert g is not None
                GramAccumulator.from_batch(g.flatten(3).reshape(-1, g.shape[-1]))

    run("vocabulary"), run("residual")  # warm-up
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(args.repeats):
        for path in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            start = time.perf_counter()
            run(path)
            times[path].append(time.perf_counter() - start)
        print(f"  round {r + 1}: " + ", ".join(f"{p} {times[p][-1]:.2f}s / {sample} probes" for p in paths))
    per_probe = {p: statistics.median(ts) / sample for p, ts in times.items()}
    projected = {p: per_probe[p] * totals[p] for p in paths}
    ratio = projected["residual"] / projected["vocabulary"]
    result: dict[str, Any] = {
        "benchmark": "exact_jacobian", "shape": cfg, "batch": B, "context": T, "output_positions": [-1],
        "hooks": len(hooks), "sample": sample, "probes_full": totals, "per_probe_s": per_probe,
        "projected_s": projected, "ratio_new_over_today": ratio, "target": TARGET, "met": ratio <= TARGET,
        "speedup": 1 / ratio,
    }
    print(f"vocabulary basis (today): {V} passes × {per_probe['vocabulary'] * 1e3:.1f} ms = "
          f"{projected['vocabulary'] / 60:.1f} min projected")
    print(f"residual basis:           {readout.k} passes × {per_probe['residual'] * 1e3:.1f} ms = "
          f"{projected['residual'] / 60:.2f} min projected")
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"RATIO new / today = {ratio:.4f} (1/{1 / ratio:.0f}; target ≤ 1/30: {verdict})")
    if args.full:
        start = time.perf_counter()
        tld.collect(model, tokens, hooks, jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]),
                    progress=False)
        result["full_residual_collect_s"] = time.perf_counter() - start
        print(f"whole residual-basis exact run through collect: {result['full_residual_collect_s']:.1f}s")
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
