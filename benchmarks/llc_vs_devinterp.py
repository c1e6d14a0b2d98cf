"""Wall time of ``tl_degeneracy.llc.estimate_neff`` vs devinterp's SGLD on the same job: the
learning coefficient of the behavioural loss ``L_B = 1/n Σ ½‖z − z*‖²`` over one parameter
subset (default ``unembed.W_U``) of a random GPT-2-shaped model, same step size, inverse
temperature, localisation, chains, burn-in and draws, full-batch.

    estimate_neff   ``estimate_neff(model, tokens, eps=1/t, params=..., step_size=η, integrator="euler",
                    n_chains, n_draws, burn_in)`` (devinterp's update rule; one call)
    devinterp       ``devinterp.slt.sampler.sample_single_chain`` per chain with ``SGMCMC.sgld(lr=η,
                    nbeta=t, localization=γ)`` and an ``evaluate`` computing the same ``L_B``
                    against the cached ``z*`` (it deep-copies the model per chain)

Side by side with RMSprop preconditioning (``--rmsprop``): ours, ``preconditioner="rmsprop"`` (``V`` the
mean squared gradient of the pilot chain, then frozen: a constant ``P``, so the tempered posterior is
exact; docs/llc.md §2) against devinterp's ``SGMCMC.rmsprop_sgld`` (``V`` an exponential moving average
updated every step, no correction term for the moving ``P``), at our chosen η and devinterp's RMSprop
``eps`` set to our ``√γ`` floor so the two preconditioners start alike.

All estimates (``λ̂ = t · mean draw loss``) are printed with their standard errors. devinterp is
a test-only dependency: ``pip install --no-deps devinterp``.

    python benchmarks/llc_vs_devinterp.py --quick       # 2-layer small model, seconds
    python benchmarks/llc_vs_devinterp.py               # GPT-2 shape (slow on a CPU)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_shaped import (  # noqa: E402
    add_common_args,
    build_model,
    describe_run,
    emit_result,
    environment,
    finish_args,
    model_config,
    random_tokens,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=4, context=64, batches=1, repeats=1)
    parser.add_argument("--params", default="unembed.W_U", help="parameter subset (default: %(default)s)")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--burn-in", type=int, default=50)
    parser.add_argument("--step-size", type=float, default=None, help="default: 0.5 / (t·h_max + γ) at θ*")
    parser.add_argument("--t", type=float, default=10.0, help="inverse temperature t = 1/ε")
    parser.add_argument("--gamma", type=float, default=100.0)
    parser.add_argument("--rmsprop", action="store_true", help="also ours with preconditioner='rmsprop' vs devinterp's "
                        "rmsprop_sgld")
    args = finish_args(parser.parse_args(argv))
    try:
        from devinterp.optim import SGMCMC
        from devinterp.slt.sampler import sample_single_chain
    except ImportError:
        raise SystemExit("devinterp is not installed: pip install --no-deps devinterp") from None

    from tl_degeneracy.llc import ParamSubset, estimate_neff, resolve_subset
    from tl_degeneracy.llc.estimate import mean_and_se

    cfg = model_config(args.preset, args.layers)
    model = build_model(args.preset, args.layers, seed=args.seed)
    print(describe_run(args, model))
    tokens = random_tokens(args.batch_size, args.context, cfg["d_vocab"], seed=args.seed)
    subset = ParamSubset(args.params)
    slots = resolve_subset(model, subset)
    if args.step_size is None:  # the automatic plain-SGLD choice, 0.5/(t h_max + γ) with the pilot's check
        args.step_size = estimate_neff(model, tokens, eps=1 / args.t, params=subset, gamma=args.gamma,
                                       preconditioner="none", n_chains=1, n_draws=4, burn_in=0,
                                       progress=False).scales[0].step_size
    print(f"subset {args.params} ({sum(s.numel for s in slots)} parameters), tokens [{args.batch_size}, "
          f"{args.context}], t = {args.t:g}, γ = {args.gamma:g}, η = {args.step_size:.3g}, {args.chains} chains × "
          f"({args.burn_in} burn-in + {args.draws} draws)")

    start = time.perf_counter()
    ours = estimate_neff(model, tokens, eps=1 / args.t, params=subset, gamma=args.gamma, step_size=args.step_size,
                         integrator="euler", preconditioner="none", n_chains=args.chains, n_draws=args.draws,
                         burn_in=args.burn_in, progress=False).scales[0]
    ours_s = time.perf_counter() - start

    with torch.no_grad():
        z_star = model(tokens).detach()

    def evaluate(m: Any, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z = m(data["input_ids"])
        return 0.5 * (z - z_star).square().sum(-1).mean(), {}

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return tokens.shape[0]

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": tokens[i]}

    def devinterp_run(method: Any, kwargs: dict[str, Any]) -> tuple[float, float, float]:
        draws: dict[int, list[float]] = {}

        def record(loss: torch.Tensor, draw: int, chain: int, model: Any, optimizer: Any) -> None:
            draws.setdefault(chain, []).append(float(loss))

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c in range(args.chains):
                sample_single_chain(model, Rows(), evaluate, {s.name: None for s in slots}, num_draws=args.draws,
                                    num_burnin_steps=args.burn_in, sampling_method=method,
                                    sampling_method_kwargs=kwargs, chain=c, seed=100 + c,
                                    batch_size=tokens.shape[0], shuffle=False, callbacks=[record])
        seconds = time.perf_counter() - start
        per_chain = [mean_and_se(np.array(d)) for d in draws.values()]
        value = float(np.mean([args.t * m for m, _ in per_chain]))
        return value, args.t * math.sqrt(sum(s ** 2 for _, s in per_chain)) / len(per_chain), seconds

    theirs, theirs_se, theirs_s = devinterp_run(SGMCMC.sgld, dict(lr=args.step_size, nbeta=args.t,
                                                                   localization=args.gamma))
    steps = args.chains * (args.burn_in + args.draws)
    print(f"\nestimate_neff: λ̂ = {ours.lambda_hat:.4g} ± {ours.standard_error / 2:.2g}, {ours_s:.2f} s "
          f"({1e3 * ours_s / steps:.2f} ms/step, step-size choice and z* included)")
    print(f"devinterp:     λ̂ = {theirs:.4g} ± {theirs_se:.2g}, {theirs_s:.2f} s ({1e3 * theirs_s / steps:.2f} ms/step)")
    print(f"RATIO wall time estimate_neff / devinterp = {ours_s / theirs_s:.3f}")
    result = {"benchmark": "llc_vs_devinterp", "ours_s": ours_s, "devinterp_s": theirs_s, "ratio": ours_s / theirs_s,
              "ours_lambda": ours.lambda_hat, "ours_se": ours.standard_error / 2, "devinterp_lambda": theirs,
              "devinterp_se": theirs_se, "steps": steps, "step_size": args.step_size, "t": args.t,
              "gamma": args.gamma, "params": args.params, "preset": args.preset, "environment": environment()}
    if args.rmsprop:
        start = time.perf_counter()
        pre = estimate_neff(model, tokens, eps=1 / args.t, params=subset, gamma=args.gamma, preconditioner="rmsprop",
                            n_chains=args.chains, n_draws=args.draws, burn_in=args.burn_in, progress=False).scales[0]
        pre_s = time.perf_counter() - start
        eta = pre.step_size
        r_value, r_se, r_s = devinterp_run(SGMCMC.rmsprop_sgld, dict(lr=eta, nbeta=args.t, localization=args.gamma,
                                                                     eps=math.sqrt(args.gamma)))
        print(f"\nRMSprop, η = {eta:.3g} (ours: chosen in the frozen metric; devinterp: the same lr, eps = √γ)")
        print(f"estimate_neff rmsprop: λ̂ = {pre.lambda_hat:.4g} ± {pre.standard_error / 2:.2g}, {pre.kept}/"
              f"{len(pre.chains)} chains kept, {pre_s:.2f} s (pilot included), relaxation {pre.relax_steps:.3g} steps")
        print(f"devinterp rmsprop_sgld: λ̂ = {r_value:.4g} ± {r_se:.2g}, {r_s:.2f} s")
        result["rmsprop"] = {"ours_s": pre_s, "ours_lambda": pre.lambda_hat, "ours_se": pre.standard_error / 2,
                             "ours_kept": pre.kept, "step_size": eta, "relax_steps": pre.relax_steps,
                             "devinterp_s": r_s, "devinterp_lambda": r_value, "devinterp_se": r_se}
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
