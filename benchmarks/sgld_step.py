"""Cost of one SGLD step of ``tl_degeneracy.llc`` vs one forward+backward training step on the
same minibatch, on a GPT-2-small-shaped random model (every parameter sampled).

Acceptance figure (issue 10): ``time_sgld / time_train`` per step, target ≤ 1.2.

Timed on the same ``[batch_size, context]`` random tokens, ``--batches`` steps per round,
interleaved over ``--repeats`` rounds after a warm-up, medians reported:
    train   per step: ``logits = model(tokens)``, next-token cross-entropy, ``loss.backward()``,
            ``torch.optim.SGD.step()`` (lr 1e-12) and ``zero_grad()``
    sgld    ``run_chain(target, chain, [], until=step + batches)``: per step the forward, the
            behavioural loss ½‖z − z*‖² against the cached ``z*``, ``autograd.grad`` to every
            parameter, the Leimkuhler–Matthews update with fresh Gaussian noise for every
            parameter; per call, loading the chain's position into the model and writing θ* back
Breakdown (interleaved too): the forward + behavioural loss + backward alone, and drawing
the noise (one Gaussian per parameter).

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
    from tl_degeneracy.llc.sampler import Chain, Integrator, run_chain

    cfg = model_config(args.preset, args.layers)
    t0 = time.perf_counter()
    model = build_model(args.preset, args.layers, seed=args.seed)
    print(f"built the model in {time.perf_counter() - t0:.1f}s")
    print(describe_run(args, model))
    tokens = random_tokens(args.batch_size, args.context, cfg["d_vocab"], seed=args.seed)
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

    def sgld() -> None:
        run_chain(target, chain, [], until=chain.step + args.batches)

    def loss_and_grad() -> None:
        with target.grads_for_slots() as params:
            for _ in range(args.batches):
                torch.autograd.grad(target.loss(0), params)

    gen = torch.Generator().manual_seed(0)

    def noise() -> None:
        for _ in range(args.batches):
            for p in model.parameters():
                torch.randn(p.shape, generator=gen, dtype=p.dtype)

    timing = interleaved_medians({"train": train, "sgld": sgld, "forward_loss_backward": loss_and_grad,
                                  "noise": noise}, args.repeats)
    per_step = {k: v["median"] / args.batches for k, v in timing.items()}
    ratio = per_step["sgld"] / per_step["train"]
    print(f"\nper step: train {per_step['train']:.3f}s, sgld {per_step['sgld']:.3f}s "
          f"(forward+loss+backward {per_step['forward_loss_backward']:.3f}s, noise {per_step['noise']:.3f}s)")
    print(f"RATIO time one SGLD step / one training step = {ratio:.3f} (target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'MISSED'})")
    result = {"benchmark": "sgld_step", "ratio": ratio, "target": TARGET, "met": ratio <= TARGET,
              "per_step_s": per_step, "timing": timing, "n_params": n_params, "preset": args.preset,
              "batch_size": args.batch_size, "context": args.context, "steps_per_round": args.batches,
              "environment": environment()}
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
