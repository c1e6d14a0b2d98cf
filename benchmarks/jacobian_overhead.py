"""Cost of Jacobian Grams: ``collect(..., jacobians=JacobianConfig(n_probes=S))`` at every
``hook_resid_pre`` vs a plain forward + S plain backward passes, on a GPT-2-small-shaped
random model.

Acceptance figure: ``time_collect / time_baseline`` on the same tokens, target ≤ 0.90 (issue 11;
it was ≤ 1.15 before probes moved to the residual basis, ``readout.py``).

Timed on the same ``--batches`` × ``[batch_size, context]`` random tokens, interleaved over
``--repeats`` rounds after a warm-up, medians reported:
    collect         ``collect(model, tokens, "blocks.*.hook_resid_pre", batch_size=B,
                    jacobians=JacobianConfig(n_probes=S), progress=False)``, one call
    grad_resid0     per batch: ``logits = model(batch)`` (grad enabled), then S times
                    ``torch.autograd.grad((logits * v).sum(), resid_pre_0, retain_graph=True)``:
                    gradients to the first residual activation only, no weight grads (the
                    baseline of the acceptance figure)
    backward_w      per batch: the same forward, then S times ``(logits * v).sum().backward(
                    retain_graph=True)``, i.e. with weight gradients (the usual training cost)
The probes ``v`` of the baselines are Rademacher tensors drawn *before* timing (so the ratio
is conservative); collect draws its probes inside the timed call.

Breakdown items, over the same batches and interleaved with the above: forward with graph +
S backward passes from the logits to the 12 captured activations (the vocabulary-probe path),
probe drawing as collect draws them (``random_probes`` in the residual basis where the model
allows it), the (S + 1) × 12 float64 Grams (activation + Jacobian) and collect's per-call fixed
cost (``describe_model``).

    python benchmarks/jacobian_overhead.py --batch-size 1 --context 128 --probes 2 --batches 1 --repeats 3
    python benchmarks/jacobian_overhead.py --quick
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect_overhead import gram_lib  # noqa: E402
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

TARGET = 0.90  # issue 11: beat the naive baseline (was 1.15 in issue 3)


def rademacher(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float32).mul_(2).sub_(1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=2, context=128, batches=1, repeats=3)
    parser.add_argument("--probes", type=int, default=None, help="n_probes S (default 4; 2 with --quick)")
    args = finish_args(parser.parse_args(argv))
    if args.probes is None:
        args.probes = 2 if args.quick else 4
    S = args.probes

    import tl_degeneracy
    from tl_degeneracy.collection.probes import ProbeMap, random_probes
    from tl_degeneracy.collection.readout import find_readout
    from tl_degeneracy.generations import describe_model

    cfg = model_config(args.preset, args.layers)
    L, d, V, B, T = cfg["n_layers"], cfg["d_model"], cfg["d_vocab"], args.batch_size, args.context
    t0 = time.perf_counter()
    model = build_model(args.preset, args.layers, seed=args.seed)
    print(f"built the model in {time.perf_counter() - t0:.1f}s")
    print(describe_run(args, model))
    # The baselines need a graph from the activations; collect makes frozen parameters
    # require grad itself, so do the same here (a no-op when they already do).
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    hooks = resid_pre_hooks(L)
    tokens = random_tokens(args.batches * B, T, V, seed=args.seed)
    batches = list(tokens.split(B))
    n_tok = tokens.numel()
    gen = torch.Generator().manual_seed(123)
    probes = [rademacher((B, T, V), gen) for _ in range(S)]
    print(f"data: {args.batches} batches x [{B}, {T}] = {n_tok} tokens; n_probes S = {S}; hooks: {L} x "
          f"hook_resid_pre; {args.repeats} interleaved repeats (medians)")

    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[name] = act
            return act

        return hook

    def grad_resid0() -> None:
        for b in batches:
            with model.hooks(fwd_hooks=[(hooks[0], capture(hooks[0]))]):
                logits = model(b)
            for v in probes:
                torch.autograd.grad((logits * v).sum(), captured[hooks[0]], retain_graph=True)
            del logits
            captured.clear()

    def backward_w() -> None:
        for b in batches:
            model.zero_grad(set_to_none=True)
            logits = model(b)
            for v in probes:
                (logits * v).sum().backward(retain_graph=True)
            del logits
        model.zero_grad(set_to_none=True)

    last: dict[str, Any] = {}

    def run_collect() -> None:
        last["stats"] = tl_degeneracy.collect(model, tokens, "blocks.*.hook_resid_pre", batch_size=B,
                                              jacobians=tl_degeneracy.JacobianConfig(n_probes=S), progress=False)

    # breakdown items, over the same batches
    sub: dict[str, list[float]] = {"forward_with_graph": [], "S_backward_to_all_hooks": []}

    def fwd_bwd_all_hooks() -> None:
        """What collect does minus probe drawing, Grams and per-call cost (probes pre-drawn)."""
        t_f = t_b = 0.0
        for b in batches:
            captured.clear()
            start = time.perf_counter()
            with model.hooks(fwd_hooks=[(h, capture(h)) for h in hooks]):
                logits = model(b)
            t_f += time.perf_counter() - start
            inputs = [captured[h] for h in hooks]
            start = time.perf_counter()
            for v in probes:
                torch.autograd.grad(logits, inputs, grad_outputs=v, retain_graph=True)
            t_b += time.perf_counter() - start
            del logits, inputs
        captured.clear()
        sub["forward_with_graph"].append(t_f)
        sub["S_backward_to_all_hooks"].append(t_b)

    readout = find_readout(model)  # collect's probes live in the residual basis when this exists
    space = ProbeMap(V, lambda xi: xi) if readout is None else ProbeMap(readout.k, readout.apply)
    z_shape = (B, T, V if readout is None else d)

    def draw() -> None:
        for i, _ in enumerate(batches):
            g = torch.Generator().manual_seed(i)
            for _ in random_probes(torch.empty(z_shape), S, "rademacher", g, space):
                pass

    acts = [torch.randn(B, T, d) for _ in hooks]
    mask = torch.ones(B, T, dtype=torch.bool)

    def grams() -> None:
        for _ in batches:
            for _ in range(S + 1):
                gram_lib(acts, mask)

    print("warm-up ...")
    tl_degeneracy.collect(model, batches[0], "blocks.*.hook_resid_pre", batch_size=B,
                          jacobians=tl_degeneracy.JacobianConfig(n_probes=1), progress=False)
    with model.hooks(fwd_hooks=[(hooks[0], capture(hooks[0]))]):
        logits = model(batches[0])
    torch.autograd.grad((logits * probes[0]).sum(), captured[hooks[0]])
    del logits
    captured.clear()

    print("timing (all interleaved): collect, grad_resid0, backward_w and the breakdown items ...")
    timing = interleaved_medians({
        "collect": run_collect, "grad_resid0": grad_resid0, "backward_w": backward_w,
        "fwd_bwd_all_hooks": fwd_bwd_all_hooks, "probe_drawing": draw, "grams": grams,
        "fixed_per_call": lambda: describe_model(model),
    }, args.repeats, warmup=False)
    stats = last["stats"]
    assert stats.n_tokens == n_tok and stats.jacobian_hooks == hooks, (stats.n_tokens, stats.jacobian_hooks)
    import statistics

    med = {k: v["median"] for k, v in timing.items()}
    med.update({k: statistics.median(v) for k, v in sub.items()})
    nb = args.batches
    per_batch = {k: v / nb for k, v in med.items() if k != "fixed_per_call"}
    fixed = med["fixed_per_call"]
    unexplained = med["collect"] - med["fwd_bwd_all_hooks"] - med["probe_drawing"] - med["grams"] - fixed

    ratio = med["collect"] / med["grad_resid0"]
    ratio_w = med["collect"] / med["backward_w"]
    ratio_steady = (med["collect"] - fixed) / med["grad_resid0"]
    tps = {k: n_tok / med[k] for k in ("collect", "grad_resid0", "backward_w")}
    print()
    print(f"tokens/s  forward + {S} backward to resid_pre_0 (autograd.grad): {tps['grad_resid0']:9.1f}")
    print(f"tokens/s  forward + {S} .backward() with weight grads:          {tps['backward_w']:9.1f}")
    print(f"tokens/s  collect(jacobians=JacobianConfig(n_probes={S})), {L} hooks: {tps['collect']:9.1f}")
    print(f"RATIO time_collect / time_(forward + {S} x autograd.grad to resid_pre_0) = {ratio:.3f}   "
          f"(target <= {TARGET:.2f}: {'met' if ratio <= TARGET else 'MISSED'})")
    print(f"      time_collect / time_(forward + {S} x .backward() with weight grads) = {ratio_w:.3f}")
    print(f"      (time_collect - per-call fixed cost) / baseline = {ratio_steady:.3f}   "
          "(what a long run converges to)")
    spread = {k: f"{v['min']:.2f}-{v['max']:.2f}s" for k, v in timing.items()}
    print(f"      spread over repeats (min-max): {spread}")
    print()
    print(f"where the time goes, per batch of {B}x{T} tokens (medians of interleaved repeats, seconds):")
    rows = [
        ("baseline: forward + S autograd.grad to resid_pre_0", per_batch["grad_resid0"]),
        ("baseline: forward + S .backward() (weight grads)", per_batch["backward_w"]),
        (f"forward + S backward to all {L} hooks (as collect, no Grams)", per_batch["fwd_bwd_all_hooks"]),
        (f"  of which forward with graph, {L} capture hooks", per_batch["forward_with_graph"]),
        (f"  of which {S} x autograd.grad to the {L} captured activations", per_batch["S_backward_to_all_hooks"]),
        (f"drawing {S} Rademacher probes [{B},{T},{V}] (library)", per_batch["probe_drawing"]),
        (f"float64 Grams: ({S}+1) x {L} hooks (activation + Jacobian)", per_batch["grams"]),
        (f"per-call fixed cost (describe_model {fixed:.3f}s) / {nb} batches", fixed / nb),
        ("collect (measured)", per_batch["collect"]),
        ("collect - sum of the parts above: unexplained", unexplained / nb),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        share = 100.0 * value / per_batch["grad_resid0"]
        print(f"  {label:<{width}}  {value:8.3f}  ({share:5.1f}% of baseline)")

    result = {
        "benchmark": "jacobian_overhead",
        "ratio": ratio,
        "ratio_vs_backward_with_weight_grads": ratio_w,
        "ratio_without_fixed_cost": ratio_steady,
        "target": TARGET,
        "met": ratio <= TARGET,
        "tokens_per_s": tps,
        "per_batch_s": per_batch,
        "fixed_per_call_s": fixed,
        "unexplained_per_batch_s": unexplained / nb,
        "timing": timing,
        "config": {"preset": args.preset, "n_layers": L, "batch_size": B, "context": T, "batches": args.batches,
                   "repeats": args.repeats, "n_probes": S, "model_class": type(model).__name__},
        "env": environment(),
    }
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
