"""``tl-degeneracy explore DIR [MODEL]``: direction dashboards (top contexts, histograms, logit effects) as pages."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common
from .common import (
    DTYPES,
    EMBEDDED_TEXT,
    check_run_dir,
    fail,
    interruptible,
    nonnegative_int,
    paragraph,
    positive_int,
)

EXAMPLES_FILE, CHECKPOINT = "examples.safetensors", "explore_checkpoint.safetensors"  # as analysis.explore names them


def add_parser(sub: Any) -> argparse.ArgumentParser:
    e = sub.add_parser("explore", help="direction dashboards of a finished analysis: top contexts, histograms, "
                                       "logit effects, as HTML pages",
                       description="Stream the analysis's data once more (forward only) and write, for the most "
                                   "important directions of the interaction basis and of PCA at every hook, their "
                                   "top-activating contexts of both signs, activation histograms and direct logit "
                                   "effects: DIR/examples.safetensors and DIR/explore/index.html (linked from "
                                   "report.html).")
    e.add_argument("dir", metavar="DIR", help="the --out folder of a finished analysis (no default: required)")
    e.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="the model the analysis ran on (default: the one analysis.json records)")
    e.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="the text to stream (default: the analysis's own, when it was the embedded text or a local "
                        "path that still exists)")
    e.add_argument("--tokens", type=positive_int, default=None, metavar="N",
                   help="tokens to stream (default: as many as the analysis streamed)")
    e.add_argument("--directions", type=positive_int, default=32, metavar="N",
                   help="directions per hook and basis, the most important first (default: %(default)s)")
    e.add_argument("--examples", type=positive_int, default=20, metavar="N",
                   help="top contexts kept per direction and sign (default: %(default)s)")
    e.add_argument("--before", type=nonnegative_int, default=12, metavar="N",
                   help="tokens of context shown before each example's token (default: %(default)s)")
    e.add_argument("--after", type=nonnegative_int, default=4, metavar="N",
                   help="tokens of context shown after it (default: %(default)s)")
    e.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="sequences per forward pass (default: the analysis's)")
    e.add_argument("--resume", action="store_true",
                   help="continue the interrupted pass saved in DIR/explore_checkpoint.safetensors (default: off)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace DIR/examples.safetensors and the pages when they exist (default: off)")
    e.add_argument("--device", default=None, help="where the model runs (default: the cpu)")
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of the model's weights: the analysis's (default: %(default)s)")
    e.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads (default: the cores this process may use)")
    e.set_defaults(func=run)
    return e


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.explore import ExploreConfig, explore
    from ..analysis.pipeline import read_request
    from ..threads import available_cores

    folder = check_run_dir(args.dir, ["stats.safetensors", "basis.safetensors", "pca_basis.safetensors"])
    if (folder / EXAMPLES_FILE).exists() and not (args.overwrite or args.resume):
        fail(f"{folder} already holds direction dashboards ({EXAMPLES_FILE}, explore/); pass --overwrite to "
             "make them again.")
    try:
        config = ExploreConfig(max_tokens=args.tokens, n_directions=args.directions, n_examples=args.examples,
                               before=args.before, after=args.after, batch_size=args.batch_size)
        request = read_request(folder)
    except ValueError as exc:
        fail(paragraph(exc))
    spec = args.model if args.model is not None else request.get("model")
    if spec is not None and not Path(spec).expanduser().exists() and spec.startswith((".", "/", "~")):
        fail(f"{folder} was analysed with MODEL {spec!r}, which no longer exists; pass the model as MODEL.")
    dataset = args.dataset
    recorded = request.get("dataset")
    if dataset is None and recorded not in (None, EMBEDDED_TEXT):
        if not Path(str(recorded)).expanduser().exists():
            fail(f"{folder} was analysed on {recorded!r}, which is not a local path here; pass --dataset.")
        dataset = recorded
    common.check_model_arg(spec)
    common.check_device(args.device)
    common.check_dataset(dataset)
    torch.set_num_threads(args.threads or available_cores())
    checkpoint = folder / CHECKPOINT
    with interruptible(checkpoint):
        model = common.load_model(spec, args.dtype, args.device)
        data = common.load_text_dataset(dataset)
        try:
            index = explore(model, data, folder, config, resume=args.resume)
        except ValueError as exc:
            fail(paragraph(exc))
    from ..analysis.render import render

    render(folder)  # report.html links the pages
    pages = list((folder / "explore").iterdir())
    print(f"wrote {index} ({len(pages)} pages, {sum(p.stat().st_size for p in pages) / 2**20:.1f} MiB)")
    return 0
