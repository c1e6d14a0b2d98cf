"""``tl-degeneracy llc [MODEL] --eps ...``: the sampled ``N_eff(ε)`` curve of a parameter subset.

Writes ``DIR/llc.json`` (the ``NeffResult``), ``DIR/plots/llc_curve.png`` (against the nominal
count and, with ``--kfac``, the K-FAC count at curvature ``γ ε``) and ``DIR/plots/llc_traces.png``;
the pilots and chains are checkpointed in ``DIR/llc_checkpoint.safetensors`` (``--resume`` continues
them). Bad input is a ``tl_degeneracy.cli.UsageError``: one paragraph, exit code 2; so is a run where
no chain passed the checks at some ε (its results and plots are written first).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from . import common
from .common import (
    DTYPES,
    EMBEDDED_TEXT,
    check_device,
    check_model_arg,
    check_out_dir,
    fail,
    interruptible,
    nonnegative_int,
    paragraph,
    positive_float,
    positive_int,
)

CHECKPOINT = "llc_checkpoint.safetensors"
RESULT = "llc.json"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``llc`` on the CLI's subparsers (``build_parser`` calls this)."""
    p = subparsers.add_parser(
        "llc", help="sample the effective parameter count N_eff(ε) by SGLD on the behavioural loss",
        description="Sample p_t(θ) ∝ exp(−L_B(θ)/ε − γ/2‖θ − θ*‖²) with SGLD over a parameter subset (the rest held "
                    "at θ*) and report N_eff(ε) = 2λ̂(ε) per loss scale ε, with per-chain estimates, a standard "
                    "error and loss traces (docs/llc.md).")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a TransformerLens model name or a local Hugging Face folder (default: the embedded model)")
    p.add_argument("--eps", type=positive_float, nargs="+", required=True, metavar="EPS",
                   help="loss scales ε (inverse temperatures t = 1/ε), e.g. --eps 1e-4 1e-3 1e-2 (required)")
    p.add_argument("--gamma", type=positive_float, default=100.0, metavar="G",
                   help="localisation γ: curvatures below γε count little (default: %(default)s)")
    p.add_argument("--params", nargs="+", default=None, metavar="GLOB",
                   help="TransformerLens parameter names or globs that move, e.g. 'blocks.1.attn.W_V' or "
                        "'blocks.0.mlp.*' (default: every parameter, or --layer's)")
    p.add_argument("--layer", type=int, default=None, metavar="L", help="only parameters of blocks.L")
    p.add_argument("--head", type=int, default=None, metavar="H",
                   help="only head H's slice of the selected attention matrices (W_Q/W_K/W_V/W_O, b_Q/b_K/b_V)")
    p.add_argument("--chains", type=positive_int, default=4, metavar="N", help="chains per ε (default: %(default)s)")
    p.add_argument("--draws", type=positive_int, default=400, metavar="N",
                   help="recorded steps per chain after burn-in (default: %(default)s)")
    p.add_argument("--burn-in", type=nonnegative_int, default=100, metavar="N",
                   help="steps discarded at the start of each chain (default: %(default)s)")
    p.add_argument("--step-size", type=positive_float, default=None, metavar="ETA",
                   help="SGLD step η (default: chosen per ε from the curvature at θ* and along a pilot chain)")
    p.add_argument("--integrator", choices=["leimkuhler_matthews", "euler"], default="leimkuhler_matthews",
                   help="Langevin scheme; euler is devinterp's SGLD (default: %(default)s)")
    add_sampler_options(p)
    p.add_argument("--loss", choices=["mse", "kl"], default="mse", help="behavioural loss (default: %(default)s)")
    p.add_argument("--output", default="logits", metavar="HOOK",
                   help="'logits' or a hook name whose activation is the output (default: %(default)s)")
    p.add_argument("--last-position", action="store_true", help="compare outputs at the last position only")
    p.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="text to run (as for analyze; default: the embedded text)")
    p.add_argument("--tokens", type=positive_int, default=1024, metavar="N",
                   help="tokens of sampling data, read once (default: %(default)s)")
    p.add_argument("--context", type=positive_int, default=None, metavar="N",
                   help="tokens per sequence (default: min(128, n_ctx))")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="sequences per SGLD minibatch (default: all of them every step)")
    p.add_argument("--seed", type=int, default=0, help="seed of every chain (default: %(default)s)")
    p.add_argument("--kfac", action="store_true",
                   help="also collect G and K for the selected weight matrices and plot the K-FAC count at γε")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights' precision (default: %(default)s)")
    p.add_argument("--out", default="tl_degeneracy_llc", metavar="DIR", help="results folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the chains checkpointed in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


PRECONDITIONERS = ("ekfac", "kfac", "diag", "rmsprop", "none")  # tl_degeneracy.llc.Preconditioning
DEFAULT_PRECONDITIONER = "ekfac"  # LLCConfig's default (docs/llc.md §2: chosen from measurements)


def add_sampler_options(p: Any, prefix: str = "") -> None:
    """The preconditioner and pilot options (``llc``'s, and ``analyze``'s with ``prefix="llc-"``)."""
    p.add_argument(f"--{prefix}preconditioner", choices=PRECONDITIONERS, default=DEFAULT_PRECONDITIONER,
                   help="constant preconditioner P of the Langevin steps, measured once at θ*: ekfac (K-FAC blocks, "
                        "values at the attention-mixed input, eigenvalues corrected by output probes), kfac (the "
                        "account's G ⊗ K blocks), diag (Gauss-Newton diagonal), rmsprop (mean squared gradient of "
                        "the pilot chain, then frozen) or none (default: %(default)s)")
    p.add_argument(f"--{prefix}pilot-steps", type=nonnegative_int, default=60, metavar="N",
                   help="steps of the pilot chain that checks the step size (default: %(default)s)")
    p.add_argument(f"--{prefix}pilot-seconds", type=positive_float, default=300.0, metavar="S",
                   help="time budget of each ε's pilot (curvature probes, power iterations, pilot chain); when it runs "
                        "out what was measured is used with a safety factor of 2, and the result says so "
                        "(default: %(default)s)")


def _config(args: argparse.Namespace) -> Any:
    from ..llc.config import LLCConfig, ParamSubset

    config = LLCConfig(eps=args.eps, gamma=args.gamma, step_size=args.step_size, n_chains=args.chains,
                       n_draws=max(args.draws, 4), burn_in=args.burn_in, integrator=args.integrator, seed=args.seed,
                       batch_size=args.batch_size, loss=args.loss, output=args.output,
                       output_positions=[-1] if args.last_position else None, preconditioner=args.preconditioner,
                       pilot_steps=args.pilot_steps, pilot_seconds=args.pilot_seconds)
    subset = ParamSubset(names=args.params, layer=args.layer, head=args.head)
    return config, subset


def kfac_counts(model: Any, data: Any, result: Any, args: argparse.Namespace) -> list[int | None] | None:
    """K-FAC ``#{g_i k_j > γ ε}`` over the weight matrices of the degeneracy account that the sampled
    subset covers (None when it covers none), from G and K collected on the same data and loss."""
    from ..collection.config import JacobianConfig
    from ..collection.grams import collect
    from ..degeneracy.kfac import KfacSpectra, covering
    from ..degeneracy.weights import weight_matrices
    from ..hook_names import LOGITS

    covers = covering(p["label"] for p in result.parameters)
    chosen = [w for w in weight_matrices(model) if covers(w)]
    if not chosen:
        return None
    hooks = list(dict.fromkeys([w.input_hook for w in chosen] + [w.output_hook for w in chosen
                                                                 if w.output_hook != LOGITS]))
    stats = collect(model, data, hooks, jacobians=JacobianConfig(n_probes=8, loss=args.loss), max_tokens=args.tokens,
                    context=args.context, progress=False)
    spectra = KfacSpectra(model, stats, chosen)
    return [spectra.count(result.config["gamma"] * e)[0] for e in result.eps]


def run(args: argparse.Namespace) -> int:
    """The ``llc`` subcommand (returns the exit code; bad input raises ``UsageError``)."""
    out = Path(args.out).expanduser()
    created = check_out_dir(out)
    check_device(args.device)
    check_model_arg(args.model)
    try:
        config, subset = _config(args)
    except ValueError as exc:
        fail(paragraph(exc))
    checkpoint = out / CHECKPOINT
    from ..hook_names import UnknownHookError
    from ..llc.estimate import EveryChainDiverged, estimate_neff

    with interruptible(checkpoint, created, nothing="before the first checkpoint; nothing was written"):
        data = common.load_text_dataset(args.dataset)
        model: Any = common.load_model(args.model, args.dtype, args.device)
        n_ctx = int(model.cfg.n_ctx)
        context = args.context or min(128, n_ctx)
        if context > n_ctx:
            fail(f"--context {context} is longer than the model's n_ctx={n_ctx}; pass --context {n_ctx} or less.")
        diverged = None
        try:
            result = estimate_neff(model, data, config=config, params=subset, max_tokens=args.tokens,
                                   context=context, checkpoint=checkpoint, resume=args.resume,
                                   progress=not args.no_progress)
        except UnknownHookError as exc:
            fail(f"--output {args.output!r}: {paragraph(exc)}")
        except EveryChainDiverged as exc:  # the result is still written, then the error
            result, diverged = exc.result, exc
        except ValueError as exc:  # checkpoint mismatches too
            fail(paragraph(exc))
        kfac = kfac_counts(model, data, result, args) if args.kfac and diverged is None else None
        result.save(out / RESULT)
        from ..llc.plots import loss_traces, neff_curve

        neff_curve(result, out / "plots" / "llc_curve.png", kfac=kfac)
        loss_traces(result, out / "plots" / "llc_traces.png")
    checkpoint.unlink(missing_ok=True)
    print(result.summary())
    if kfac is not None:
        print("K-FAC #{g·k > γε}: " + ", ".join(f"ε={e:g}: {k}" for e, k in zip(result.eps, kfac)))
    print(f"\nwrote {out}/: {RESULT}, plots/llc_curve.png, plots/llc_traces.png")
    print(f"(source: {args.dataset or EMBEDDED_TEXT}, {args.tokens} tokens)")
    if diverged is not None:
        fail(f"{paragraph(diverged)} The chains' record is in {out / RESULT}.")
    empty = [s for s in result.scales if s.kept == 0]
    if empty:
        fail(no_estimate_message(empty, out / RESULT, args))
    return 0


def no_estimate_message(scales: Any, path: Path, args: argparse.Namespace) -> str:
    """Why some ε has no estimate (every chain left out), and what to change: one paragraph."""
    where = ", ".join(f"ε={s.eps:g}" for s in scales)
    first = scales[0]
    drifted = sum(c.status == "drifted" for s in scales for c in s.chains)
    relax = first.relax_steps
    hint = (f" A direction of zero curvature needs about {relax:,.0f} steps to relax at ε={first.eps:g} "
            f"(1/(ηγ·λ_max(P)), η = {first.step_size:.3g}); this run had {args.burn_in} burn-in steps."
            if relax is not None and math.isfinite(relax) else "")
    return (f"no chain passed the checks at {where}, so there is no N_eff estimate there (the others, and every "
            f"chain's trace and reason, are in {path}). {drifted} chain(s) were still drifting: the chains had not "
            f"relaxed to the tempered posterior.{hint} Run more steps (--burn-in, --draws), sample fewer parameters "
            "(--params, --layer, --head), or a larger ε or --gamma (a larger cut-off γε mixes faster).")
