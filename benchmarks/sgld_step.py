"""Cost of one SGLD step of ``tl_degeneracy.llc`` vs one forward+backward training step on the
same minibatch, on a GPT-2-small-shaped random model (every parameter sampled).

Acceptance figure (issue 10): ``time_sgld / time_train`` per step, target ≤ 1.2.

Timed on the same ``[batch_size, context]`` random tokens, ``--batches`` steps per round,
interleaved over ``--repeats`` rounds after a warm-up, medians reported:
    train   per step: ``logits = model(tokens)``, next-token cross-entropy, ``loss.backward()``,
            ``torch.optim.SGD.step()`` (lr 1e-12) and ``zero_grad()``
    sgld    ``sgld_step`` (the body of ``run_chain``'s loop) with the chain's position in the
            model: the forward, the behavioural loss ½‖z − z*‖² against the cached ``z*``,
            ``autograd.grad`` to every parameter, the Leimkuhler–Matthews update with fresh
            Gaussian noise for every parameter (drawn in place into a kept buffer)
Breakdown (interleaved too): ``run_chain(target, chain, [], until=step + batches)`` (adds the
per-call cost of loading the chain's position and writing θ* back: two parameter copies per
call, amortised over a chain's steps), the forward + behavioural loss + backward alone, and
drawing the noise (one Gaussian per parameter, in place).

    python benchmarks/sgld_step.py                                  # GPT-2 shape, 2 x 128 tokens
    python benchmarks/sgld_step.py --quick                          # 2-layer small model, seconds
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
)

TARGET = 1.2


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=2, context=128, batches=2, repeats=3)
    args = finish_args(parser.parse_args(argv))

    from tl_degeneracy.llc import LLCConfig, ParamSubset
    from tl_degeneracy.llc.estimate import build_target
    from tl_degeneracy.llc.sampler import Chain, Integrator, Slots, run_chain, sgld_step

    cfg = model_config(args.preset, args.layers)
    t0 = time.perf_counter()
    model = build_model(args.preset, args.layers, seed=args.seed).to(args.device)
    print(f"built the model in {time.perf_counter() - t0:.1f}s")
    print(describe_run(args, model))
    tokens = random_tokens(args.batch_size, args.context, cfg["d_vocab"], seed=args.seed).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"minibatch [{args.batch_size}, {args.context}]; {args.batches} steps per round, {args.repeats} rounds")

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-12)

    def train() -> None:
        for _ in range(args.batches):
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     tokens[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    config = LLCConfig(eps=1e-3, gamma=100.0, step_size=1e-12)
    target = build_target(model, tokens, config, ParamSubset())
    chain = Chain(scale=0, index=0, t=1e3, gamma=100.0, step_size=1e-12, integrator=Integrator.LEIMKUHLER_MATTHEWS,
                  n_steps=10**9, burn_in=0, seed=args.seed)

    def sgld_run_chain() -> None:
        run_chain(target, chain, [], until=chain.step + args.batches)

    slots = Slots(target)
    stepping = Chain(scale=0, index=1, t=1e3, gamma=100.0, step_size=1e-12,
                     integrator=Integrator.LEIMKUHLER_MATTHEWS, n_steps=10**9, burn_in=0, seed=args.seed + 1)
    context = target.grads_for_slots()
    params = context.__enter__()

    def sgld() -> None:
        for _ in range(args.batches):
            sgld_step(target, params, slots, stepping, [])

    def loss_and_grad() -> None:
        for _ in range(args.batches):
            torch.autograd.grad(target.loss(0), params)

    buffers = [torch.empty_like(p) for p in model.parameters()]
    gen = torch.Generator(device=args.device).manual_seed(0)

    def noise() -> None:
        for _ in range(args.batches):
            for b in buffers:
                b.normal_(generator=gen)

    timing = interleaved_medians({"train": train, "sgld": sgld, "sgld_run_chain": sgld_run_chain,
                                  "forward_loss_backward": loss_and_grad, "noise": noise}, args.repeats)
    context.__exit__(None, None, None)
    slots.restore()
    per_step = {k: v["median"] / args.batches for k, v in timing.items()}
    ratio = per_step["sgld"] / per_step["train"]
    print(f"\nper step: train {per_step['train']:.3f}s, sgld {per_step['sgld']:.3f}s "
          f"(forward+loss+backward {per_step['forward_loss_backward']:.3f}s, noise {per_step['noise']:.3f}s; "
          f"through run_chain, {args.batches} steps per call: {per_step['sgld_run_chain']:.3f}s)")
    print(f"RATIO time one SGLD step / one training step = {ratio:.3f} (target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'MISSED'})")
    result = {"benchmark": "sgld_step", "ratio": ratio,
              "ratio_run_chain": per_step["sgld_run_chain"] / per_step["train"], "target": TARGET,
              "met": ratio <= TARGET,
              "per_step_s": per_step, "timing": timing, "n_params": n_params, "preset": args.preset,
              "batch_size": args.batch_size, "context": args.context, "steps_per_round": args.batches,
              "environment": environment()}
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
