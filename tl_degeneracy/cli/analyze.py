"""``tl-degeneracy analyze [MODEL]``: collect, fit, count, report (and optionally the graph and SGLD)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import common
from .common import (
    CHECKPOINT_FILE,
    DTYPES,
    EMBEDDED_TEXT,
    check_device,
    check_finished_run,
    check_model_arg,
    check_out_dir,
    fail,
    interruptible,
    load_report,
    nonnegative_float,
    paragraph,
    positive_float,
    positive_int,
    remove_empty_dirs,
    unknown_hook_message,
)
from .interactions import add_interaction_options, interactions_config, run_interactions

STAGE_NAMES = ("grams", "jacobians", "heads", "neurons", "account")  # tl_degeneracy.analysis.pipeline.Stage


def add_parser(sub: Any) -> argparse.ArgumentParser:
    a = sub.add_parser("analyze", help="collect statistics, fit interaction bases, write the report",
                       description="Stream text through the model, accumulate activation and Jacobian Gram "
                                   "matrices, fit interaction bases for the residual stream, count degeneracies "
                                   "and write report.json, plots and report.html to --out.")
    a.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a TransformerLens model name (e.g. gpt2) or a local Hugging Face model folder "
                        "(default: the embedded 4-layer model)")
    a.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="the text to run: a Hugging Face datasets name (streamed) or a local .txt/.json/.jsonl/"
                        ".parquet/.csv file or a folder of them (default: the embedded text, Austen's Persuasion)")
    a.add_argument("--tokens", type=positive_int, default=8192, metavar="N",
                   help="stop after this many tokens have gone through the model (default: %(default)s)")
    a.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="sequences per forward/backward pass; larger needs more memory and is faster only on a GPU "
                        "(default: chosen from the model's size, at most 8, one batch within 2 GiB on a CPU or a "
                        "quarter of a GPU's memory; printed with the memory estimate)")
    a.add_argument("--context", type=positive_int, default=None, metavar="N",
                   help="tokens per sequence the text is cut into; at most the model's n_ctx "
                        "(default: min(128, n_ctx))")
    a.add_argument("--hooks", nargs="+", default=None, metavar="HOOK",
                   help="hook names or glob patterns where interaction bases are fitted; list a model's names "
                        "with `tl-degeneracy hooks [MODEL]` (default: the residual stream, every "
                        "blocks.N.hook_resid_pre and the last hook_resid_post)")
    a.add_argument("--probes", type=positive_int, default=4, metavar="N",
                   help="random output probes per batch for the Jacobian Gram estimate; more probes, less noise "
                        "(default: %(default)s)")
    a.add_argument("--rtol", type=nonnegative_float, default=1e-8, metavar="R",
                   help="eigenvalues below R times the largest count as zero (default: %(default)s)")
    a.add_argument("--device", default=None,
                   help="where the model runs: cpu, cuda, cuda:N or mps (default: where the model loads, the cpu)")
    a.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of the model's weights; statistics are always accumulated in float64 "
                        "(default: %(default)s)")
    a.add_argument("--out", default="tl_degeneracy_out", metavar="DIR",
                   help="folder for the results, created if missing (default: %(default)s)")
    a.add_argument("--resume", action="store_true",
                   help="continue the interrupted run saved in DIR/checkpoint.safetensors; with no checkpoint "
                        "there the run starts fresh (default: off)")
    a.add_argument("--keep-checkpoint", action="store_true",
                   help="keep DIR/checkpoint.safetensors after a successful run instead of deleting it "
                        "(default: off)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace a finished analysis already in DIR; without it such a DIR is refused (default: off)")
    a.add_argument("--stages", default=",".join(s for s in STAGE_NAMES), metavar="LIST",
                   help="what to collect and compute, comma-separated: grams (activation Grams, PCA), jacobians "
                        "(Jacobian Grams, the interaction basis), heads, neurons (synchronisation), account (the "
                        "degeneracy account's G and K per weight matrix) (default: %(default)s)")
    a.add_argument("--layers", default="all", metavar="LIST",
                   help="blocks the residual bases, synchronisation and account cover: all, or numbers and ranges "
                        "like 0-5,12 (default: %(default)s)")
    a.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads for the whole run, collection and fits (default: the cores this process may "
                        "use)")
    a.add_argument("--max-memory", type=positive_float, default=None, metavar="GIB",
                   help="refuse to start when the memory estimate exceeds this many GiB (default: the memory "
                        "available now)")
    a.add_argument("--interactions", action="store_true",
                   help="also compute the interaction graph: edges in the interaction basis, PCA and the model's "
                        "coordinates, their sparsity, modules and ablation curves (default: off)")
    add_interaction_options(a)
    add_llc_options(a)
    a.set_defaults(func=run)
    return a


def add_llc_options(p: argparse.ArgumentParser) -> None:
    """``analyze``'s ``--llc`` options (an argument group)."""
    g = p.add_argument_group("effective parameter count by SGLD (docs/llc.md)")
    g.add_argument("--llc", type=positive_float, nargs="+", default=None, metavar="EPS",
                   help="also sample N_eff(ε) = 2λ̂(ε) at these loss scales ε, for the whole model and (at the middle "
                        "ε) per layer, beside the K-FAC count at γε (default: off)")
    g.add_argument("--llc-gamma", type=positive_float, default=100.0, metavar="G",
                   help="localisation γ of the SGLD posterior; curvatures below γε count little (default: %(default)s)")
    g.add_argument("--llc-chains", type=positive_int, default=2, metavar="N",
                   help="SGLD chains per loss scale and part (default: %(default)s)")
    g.add_argument("--llc-draws", type=positive_int, default=200, metavar="N",
                   help="recorded SGLD steps per chain after the burn-in (default: %(default)s)")
    g.add_argument("--llc-burn-in", type=positive_int, default=200, metavar="N",
                   help="SGLD steps per chain discarded before the draws; a part whose burn-in is shorter than its "
                        "relaxation time is reported as a lower bound (default: %(default)s)")
    g.add_argument("--llc-tokens", type=positive_int, default=128, metavar="N",
                   help="tokens of the behavioural loss each SGLD step runs on (default: %(default)s)")
    g.add_argument("--llc-step-size", type=positive_float, default=None, metavar="ETA",
                   help="SGLD step η for every part and ε, in the preconditioner's metric (default: chosen per part "
                        "and ε from the stiffness at θ* and along a pilot chain: about 60 steps and up to 24 "
                        "Hessian-vector products)")
    from .llc import add_sampler_options

    add_sampler_options(g, prefix="llc-")
    g.add_argument("--llc-no-layers", action="store_true",
                   help="sample the whole model only, not also each layer at the middle ε (default: off)")


def llc_config(args: argparse.Namespace) -> Any:
    """The ``LLCAnalysisConfig`` of ``--llc`` (None without it); bad values are a ``UsageError``."""
    if args.llc is None:
        return None
    from ..analysis.sections import LLCAnalysisConfig

    try:
        return LLCAnalysisConfig(eps=tuple(args.llc), gamma=args.llc_gamma, n_chains=args.llc_chains,
                                 n_draws=max(4, args.llc_draws), burn_in=args.llc_burn_in, max_tokens=args.llc_tokens,
                                 layers=not args.llc_no_layers, step_size=args.llc_step_size,
                                 preconditioner=args.llc_preconditioner, pilot_steps=args.llc_pilot_steps,
                                 pilot_seconds=args.llc_pilot_seconds)
    except ValueError as exc:
        fail(f"--llc: {paragraph(exc)}")


def run_llc(model: Any, data: Any, out: Path, config: Any) -> None:
    """N_eff(ε) by SGLD for the analysis in ``out`` (docs/llc.md), then the report re-rendered."""
    from ..analysis.llc import llc_analysis, summary_lines
    from ..analysis.render import render

    section = llc_analysis(model, data, out, config)
    render(out)
    print()
    print("\n".join(summary_lines(section)))


def analysis_config(args: argparse.Namespace) -> Any:
    from ..analysis.pipeline import AnalysisConfig, parse_layers, parse_stages

    try:
        return AnalysisConfig(hooks=None if args.hooks is None else tuple(args.hooks), max_tokens=args.tokens,
                              batch_size=args.batch_size, context=args.context, n_probes=args.probes, rtol=args.rtol,
                              stages=parse_stages(args.stages), layers=parse_layers(args.layers))
    except ValueError as exc:
        fail(paragraph(exc))


def check_budget(model: Any, config: Any, max_gib: float | None) -> Any:
    """Print the memory estimate; refuse (exit 2) a run that cannot fit before any data is read."""
    from ..analysis.budget import GIB, available_memory, estimate_memory
    from ..analysis.pipeline import collection_config

    run_config = collection_config(model, config)
    estimate = estimate_memory(model, run_config)
    limit = None if max_gib is None else int(max_gib * GIB)
    available = available_memory()
    chosen = "" if config.batch_size is not None else " (chosen from the model's size; --batch-size sets it)"
    print(f"batch size {run_config.batch_size}{chosen}; {estimate.describe(available)}", flush=True)  # stdout:
    # stderr is for errors and progress bars
    budget = limit if limit is not None else available
    if budget is not None and estimate.total > budget:
        where = f"--max-memory {max_gib:g} GiB" if limit is not None else f"the {budget / GIB:.1f} GiB available"
        fail(f"this run needs about {estimate.total / GIB:.1f} GiB ({estimate.state / GIB:.2f} GiB of float64 sums, "
             f"{estimate.model / GIB:.2f} GiB model, ~{estimate.batch / GIB:.2f} GiB per batch), more than {where}. "
             "Collect less: fewer stages (--stages grams,jacobians), fewer layers (--layers 0-5), a smaller "
             "--batch-size or --context; or run where there is more memory.")
    return run_config


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model, first.
    out = Path(args.out).expanduser()
    check_finished_run(out, args.overwrite, args.resume)
    check_device(args.device)
    check_model_arg(args.model)
    config = analysis_config(args)
    interactions = interactions_config(args) if args.interactions else None
    llc = llc_config(args)
    common.check_dataset(args.dataset)
    created = check_out_dir(out)  # made here (and removed again if the run fails)
    checkpoint = out / CHECKPOINT_FILE
    if args.resume and not checkpoint.exists():
        print(f"note: --resume: no checkpoint found in {out} ({checkpoint} does not exist); the run starts fresh",
              file=sys.stderr)
    if not args.resume and checkpoint.exists():
        print(f"note: {checkpoint} (an earlier run's checkpoint) will be overwritten: this run starts fresh; "
              "stop now and rerun with --resume to continue that run instead", file=sys.stderr)

    from ..checkpoint import FolderBusyError, FolderLock

    try:
        lock = FolderLock(out).__enter__()
    except FolderBusyError as exc:
        remove_empty_dirs(created)
        fail(paragraph(exc))
    finished = False
    try:
        code = _run(args, out, checkpoint, config, interactions, llc)
        finished = True
        return code
    finally:
        lock.__exit__(None, None, None)
        if not finished:  # nothing of a failed run is left behind but what it wrote
            remove_empty_dirs(created)


def _run(args: argparse.Namespace, out: Path, checkpoint: Path, config: Any, interactions: Any, llc: Any) -> int:
    import torch

    from ..analysis.pipeline import analyze
    from ..collection.batch_pass import NonFiniteError
    from ..hook_names import UnknownHookError, resolve_hooks
    from ..loading import HubUnavailableError
    from ..threads import available_cores

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)  # one setting for the whole run: collection and fits
    with interruptible(checkpoint):
        model = common.load_model(args.model, args.dtype, args.device)
        n_ctx = int(model.cfg.n_ctx)
        if args.context is not None and args.context > n_ctx:
            fail(f"--context {args.context} is longer than the model's context window (n_ctx={n_ctx}); pass "
                 f"--context {n_ctx} or less, or omit it for min(128, n_ctx).")
        try:
            if args.hooks:
                resolve_hooks(model, args.hooks)
            config.layer_list(model)
            check_budget(model, config, args.max_memory)
        except UnknownHookError as exc:
            fail(unknown_hook_message(exc, args.model))
        except ValueError as exc:  # an attention pattern (no per-token Gram), a layer that does not exist
            fail(paragraph(exc))
        context = args.context or min(128, n_ctx)
        if args.tokens < context:
            print(f"note: --tokens {args.tokens} is less than one sequence of {context} tokens (--context): the run "
                  f"takes one whole sequence", file=sys.stderr)
        data = common.load_text_dataset(args.dataset)
        try:
            report = analyze(model, data, out, config=config, resume=args.resume,
                             keep_checkpoint=args.keep_checkpoint, dataset=args.dataset or EMBEDDED_TEXT,
                             threads=threads, model_spec=args.model)
            if interactions is not None:
                run_interactions(model, data, out, interactions, resume=args.resume,
                                 keep_checkpoint=args.keep_checkpoint)
                report = load_report(out)
            if llc is not None:
                run_llc(model, data, out, llc)
        except UnknownHookError as exc:
            fail(unknown_hook_message(exc, args.model))
        except (HubUnavailableError, NonFiniteError, ValueError) as exc:  # checkpoint mismatches, empty data too
            fail(paragraph(exc))
    print_summary(report)
    kept = ", checkpoint.safetensors" if args.keep_checkpoint else ""
    extra = ", interactions.safetensors" if interactions is not None else ""
    extra += ", llc.json" if llc is not None else ""
    print(f"\nwrote {out}/: stats.safetensors, basis.safetensors, pca_basis.safetensors{extra}, report.json, plots/, "
          f"report.html{kept}")
    return 0


def print_summary(report: Any) -> None:
    cfg = report.model.get("cfg", {})
    print(f"\n{report.n_tokens} tokens through {report.model.get('class')} ({cfg.get('model_name', '')}) in "
          f"{report.seconds} s; eigenvalues below rtol={report.rtol:g} x the largest count as zero")
    dash = lambda v, w: f"{'–':>{w}s}" if v is None else f"{v:{w}d}"  # noqa: E731
    if report.spectra:
        print(f"{'hook':32s} {'d':>5s} {'IB kept':>8s} {'IB 99%':>7s} {'PCA 99%':>8s}  top Λ")
    for hook, s in report.spectra.items():
        top = ", ".join(f"{v:.3g}" for v in s.top_lambda[:3])
        flag = " (data-limited)" if s.data_limited else ""
        print(f"{hook:32s} {s.d:5d} {dash(s.ib_kept, 8)} {dash(s.ib_dirs_99, 7)} {dash(s.pca_dirs_99, 8)}  {top}{flag}")
    for hook, o in report.outliers.items():
        coords = ", ".join(f"{c.coordinate} ({c.ratio:,.0f}× median)" for c in o.coordinates)
        print(f"massive activations at {hook}: coordinate {coords}")
    for note in report.notes:
        print(note)
    if report.degeneracy is not None:
        print()
        print(report.degeneracy.summary())
    for section, error in report.errors.items():
        print(f"section {section} could not be computed: {error}")
    if report.synchronized_heads is not None:
        from .heads import print_heads

        print()
        print_heads(report.synchronized_heads)
