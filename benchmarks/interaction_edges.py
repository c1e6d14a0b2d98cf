"""Edges of one layer pair (``resid_pre_l → resid_pre_{l+1}``) on a GPT-2-shaped model: our three
methods against the reference implementation's loop (issue 9).

RIB computes an edge matrix with one vector-Jacobian product per output direction *and* output
position (``d × T`` unbatched passes per pair). Ours (``tl_degeneracy.interactions.edges``):
- ``forward``: exact, one Jacobian-vector product per input direction (``d`` passes, vmapped),
  which yields every output direction and position at once (through the block alone: a
  ``resid_pre → resid_pre`` pair is one block);
- ``backward``: exact, the same ``d × T`` pull-backs as RIB but vmapped in chunks;
- ``probes``: 4 Rademacher probes over output positions (``4 d`` vmapped pull-backs), unbiased.

The loop is timed on ``--sample`` of its passes (interleaved with our methods, medians over
``--repeats``) and projected to its full count: at GPT-2 shape it takes hours. One basis (the
model's coordinates; the cost does not depend on the basis values).

    python benchmarks/interaction_edges.py              # GPT-2-small shape, 1 × 128 tokens
    python benchmarks/interaction_edges.py --quick
"""
from __future__ import annotations

import argparse
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
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=1, context=128, batches=1, repeats=3)
    parser.add_argument("--sample", type=int, default=None, help="loop passes timed (default 64)")
    parser.add_argument("--layer", type=int, default=0, help="the pair resid_pre_L → resid_pre_L+1")
    args = finish_args(parser.parse_args(argv))
    sample = args.sample or (16 if args.quick else 64)

    from tl_degeneracy.basis import fit_layer
    from tl_degeneracy.interactions.edges import (
        EdgeConfig,
        capture_nodes,
        pair_edges_backward,
        pair_edges_forward,
        pair_segment,
    )

    cfg = model_config(args.preset, args.layers)
    d, B, T = cfg["d_model"], args.batch_size, args.context
    model = build_model(args.preset, args.layers, seed=args.seed)
    tokens = random_tokens(B, T, cfg["d_vocab"], seed=args.seed)
    source, target = f"blocks.{args.layer}.hook_resid_pre", f"blocks.{args.layer + 1}.hook_resid_pre"
    eye = torch.eye(d, dtype=torch.float64)
    zero = torch.zeros(d, dtype=torch.float64)
    layers = [fit_layer(h, eye, None, zero, scaling="identity") for h in (source, target)]
    mask = torch.ones(B, T, dtype=torch.bool)

    def config(method: str, n_probes: int | None = None) -> EdgeConfig:
        return EdgeConfig(nodes=(source, target), bases=(("standard", tuple(layers)),), exact=method != "probes",
                          method=method, n_probes=n_probes or 4)  # type: ignore[arg-type]

    def graph() -> tuple[torch.Tensor, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
                captured[name] = act
                return act
            return hook

        model.run_with_hooks(tokens, fwd_hooks=[(source, capture(source)), (target, capture(target))])
        return captured[source], captured[target]

    def run_forward() -> float:
        start = time.perf_counter()
        forward = config("forward")
        with torch.no_grad():
            captured, calls = capture_nodes(model, tokens, {}, forward)
            f_in, f_out = captured[source], captured[target]
            segment, _ = pair_segment(model, tokens, {}, source, target, f_in, f_out, calls.get(0))
            pair_edges_forward(model, segment, f_in, [layers[1]], [layers[0]], mask, mask, forward, 0, 0)
        return time.perf_counter() - start

    def run_backward(method: str) -> float:
        start = time.perf_counter()
        with torch.enable_grad():
            f_in, f_out = graph()
            pair_edges_backward(f_out, f_in, [layers[1]], [layers[0]], mask, mask, config(method), 0, 0)
        return time.perf_counter() - start

    def run_rib_sample() -> float:
        """``sample`` unbatched pull-backs of (output coordinate, output position), as RIB loops."""
        with torch.enable_grad():
            f_in, f_out = graph()
            f_hat = f_in.detach().to(torch.float64)
            start = time.perf_counter()
            E = torch.zeros(d, d, dtype=torch.float64)
            for n in range(sample):
                i, t = n % d, (n // d) % T
                (g,) = torch.autograd.grad(f_out[:, t, i].sum(), f_in, retain_graph=True)
                E[i] += (g.to(torch.float64) * f_hat).sum(1).square().sum(0)
        return time.perf_counter() - start

    for p in model.parameters():
        p.requires_grad_(True)
    run_rib_sample()  # warm-up
    times: dict[str, list[float]] = {"forward": [], "backward": [], "probes": [], "rib_sample": []}
    for _ in range(args.repeats):
        times["rib_sample"].append(run_rib_sample())
        times["forward"].append(run_forward())
        times["probes"].append(run_backward("probes"))
        if not args.quick and args.preset == "gpt2":
            times["backward"].append(float("nan"))  # d × T vmapped passes: hours at this shape; not timed
        else:
            times["backward"].append(run_backward("backward"))
    med = {k: statistics.median(v) for k, v in times.items()}
    rib_total = med["rib_sample"] / sample * d * T
    result = {
        "benchmark": "interaction_edges", "run": describe_run(args, model), "pair": f"{source} -> {target}",
        "tokens": B * T, "d": d, "sample": sample,
        "seconds": {"forward_exact": med["forward"], "backward_exact": med["backward"], "probes_4": med["probes"],
                    "rib_loop_projected": rib_total},
        "ratio_forward_exact_vs_rib": med["forward"] / rib_total,
        "ratio_probes_vs_rib": med["probes"] / rib_total,
    }
    print(f"{d} directions x {T} positions, {B * T} tokens, one pair, one basis")
    print(f"RIB loop (projected from {sample} passes): {rib_total:9.1f} s")
    print(f"forward exact:                         {med['forward']:9.2f} s   ({med['forward'] / rib_total:.4f} x RIB)")
    print(f"backward exact (vmapped):              {med['backward']:9.2f} s")
    print(f"4 probes:                              {med['probes']:9.2f} s   ({med['probes'] / rib_total:.4f} x RIB)")
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
