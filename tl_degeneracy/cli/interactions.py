"""``tl-degeneracy interactions DIR [MODEL]``: the interaction graph of a finished analysis folder."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import validation
from . import common
from .common import (
    DTYPES,
    check_device,
    check_model_arg,
    check_run_dir,
    fail,
    interruptible,
    load_report,
    paragraph,
    positive_float,
    positive_int,
)

EDGES_CHECKPOINT = "interactions_checkpoint.safetensors"  # as tl_degeneracy.analysis.files names it
EDGE_BASES = ("interaction", "pca", "standard")  # as tl_degeneracy.analysis.interactions_section names them
REST_MODES = ("probes", "exact")  # tl_degeneracy.interactions.graph.RestMode
unit_fraction = common.arg_type(lambda v, what: validation.positive_float(validation.fraction(v, what), what),
                                float, "a number in (0, 1]")


def add_interaction_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interaction graph (docs/theory.md §6)")
    g.add_argument("--edge-tokens", type=positive_int, default=1024, metavar="N",
                   help="tokens the edges are averaged over (default: %(default)s)")
    g.add_argument("--edge-probes", type=positive_int, default=None, metavar="S",
                   help="estimate the edges with S Rademacher probes over output positions (S x d backward passes "
                        "per layer pair) instead of exactly by forward mode, d passes per basis and pair "
                        "(default: exact)")
    g.add_argument("--eps-rtol", type=positive_float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-6],
                   metavar="R", help="module-search scales ε, relative to the largest edge (default: 1e-1 1e-2 "
                                     "1e-3 1e-4 1e-6)")
    g.add_argument("--modules", type=positive_int, default=2, metavar="N",
                   help="modules to split the graph into (default: %(default)s)")
    g.add_argument("--ablation-tokens", type=positive_int, default=1024, metavar="N",
                   help="held-out tokens for the ablation curves (default: %(default)s)")
    g.add_argument("--edge-bases", nargs="+", choices=EDGE_BASES, default=list(EDGE_BASES), metavar="BASIS",
                   help="bases the edges and ablation curves are taken in, from: interaction pca standard "
                        "(default: all three)")
    g.add_argument("--edge-top-k", type=positive_int, default=None, metavar="K",
                   help="keep at most K directions per node (by importance: Λ for the interaction basis, variance "
                        "for PCA and the model's coordinates); the others share one 'rest' vertex whose edges sum "
                        "theirs (default: every direction)")
    g.add_argument("--edge-mass", type=unit_fraction, default=None, metavar="Q",
                   help="keep the fewest directions per node carrying a share Q of its total importance, e.g. 0.99; "
                        "with --edge-top-k, the smaller set (default: every direction)")
    g.add_argument("--edge-rest", choices=REST_MODES, default="probes",
                   help="edges into a rest vertex: 'probes' (unbiased, --edge-rest-probes passes per pair and "
                        "basis, with a standard error) or 'exact' (one pass per rest direction) "
                        "(default: %(default)s)")
    g.add_argument("--edge-rest-probes", type=positive_int, default=8, metavar="S",
                   help="Rademacher probes for the rest vertex's edges (default: %(default)s)")
    g.add_argument("--edge-memory", type=positive_float, default=1.0, metavar="GIB",
                   help="memory for one vmapped call's pass temporaries, in GiB; larger calls are faster up to a "
                        "point (default: %(default)s)")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    i = sub.add_parser("interactions", help="the interaction graph of a finished analysis folder",
                       description="Stream the edges between consecutive residual-stream nodes of the analysis in "
                                   "DIR (same model, same text), and add their sparsity, modules and ablation "
                                   "curves to report.json and report.html.")
    i.add_argument("dir", metavar="DIR", help="the --out folder of a finished `tl-degeneracy analyze` run")
    i.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="the model that analysis ran on (default: the embedded model)")
    i.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="the text that analysis ran on (default: the embedded text)")
    i.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="sequences per pass (default: %(default)s)")
    i.add_argument("--device", default=None, help="where the model runs (default: the cpu)")
    i.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of the model's weights: the analysis's (default: %(default)s)")
    i.add_argument("--resume", action="store_true",
                   help="continue DIR/interactions_checkpoint.safetensors (default: off)")
    i.add_argument("--keep-checkpoint", action="store_true", help="keep the edge checkpoint (default: off)")
    i.add_argument("--estimate-only", action="store_true",
                   help="print what the edge pass would cost (passes, FLOPs, projected time from one timed chunk) "
                        "and stop (default: off)")
    add_interaction_options(i)
    i.set_defaults(func=run)
    return i


def interactions_config(args: argparse.Namespace) -> Any:
    from ..analysis.sections import InteractionsConfig

    try:
        batch = {} if args.batch_size is None else {"batch_size": args.batch_size}  # analyze's may be chosen
        return InteractionsConfig(n_probes=args.edge_probes, max_tokens=args.edge_tokens,
                                  eps_rtol_grid=tuple(args.eps_rtol), n_modules=args.modules,
                                  ablation_tokens=args.ablation_tokens, bases=tuple(dict.fromkeys(args.edge_bases)),
                                  top_k=args.edge_top_k, mass=args.edge_mass, rest=args.edge_rest,
                                  rest_probes=args.edge_rest_probes, memory_gib=args.edge_memory, **batch)
    except ValueError as exc:
        fail(paragraph(exc))


def run_interactions(model: Any, data: Any, out: Path, config: Any, *, resume: bool, keep_checkpoint: bool) -> None:
    """The interaction graph of the analysis in ``out``, then the report re-rendered with its plots."""
    from ..analysis.interactions import interactions_analysis
    from ..analysis.render import render

    section = interactions_analysis(model, data, out, config, resume=resume, keep_checkpoint=keep_checkpoint,
                                    announce=lambda text: print(text, flush=True))
    render(out)
    print(f"\ninteraction graph: {len(section.nodes)} nodes, {section.edge_tokens} tokens, "
          f"{section.edge_seconds} s for the edges")
    print(f"{'basis':12s} {'layer pair':58s} {'edges':>7s} {'99% in':>7s} {'Gini':>6s} {'rest':>6s}")
    for row in section.sparsity:
        print(f"{row.basis:12s} {row.source + ' -> ' + row.target:58s} {row.n_edges:7d} "
              f"{row.fraction(0.99):7.3f} {row.gini:6.3f} {row.rest_share:6.3f}")
    if any(row.rest_in or row.rest_out for row in section.sparsity):
        print("(edges, 99% and Gini among the kept directions; rest: the share of ΣE on edges of the rest vertices)")


def run(args: argparse.Namespace) -> int:
    folder = check_run_dir(args.dir, ["basis.safetensors", "pca_basis.safetensors", "stats.safetensors"])
    load_report(folder)
    check_device(args.device)
    check_model_arg(args.model)
    config = interactions_config(args)
    from ..collection.batch_pass import NonFiniteError
    from ..loading import HubUnavailableError

    with interruptible(folder / EDGES_CHECKPOINT, nothing="before the first edge checkpoint; nothing was written"):
        data = common.load_text_dataset(args.dataset)
        model = common.load_model(args.model, args.dtype, args.device)
        try:
            if args.estimate_only:
                from ..analysis.interactions import interactions_estimate

                print(interactions_estimate(model, folder, config).describe())
                return 0
            run_interactions(model, data, folder, config, resume=args.resume, keep_checkpoint=args.keep_checkpoint)
        except (HubUnavailableError, NonFiniteError, ValueError) as exc:
            fail(paragraph(exc))
    print(f"wrote {folder}/interactions.safetensors, report.json, plots/, report.html")
    return 0
