"""``tl-degeneracy hooks [MODEL]``: every hook name of a model, one per line (for ``--hooks``)."""
from __future__ import annotations

import argparse
from typing import Any

from . import common
from .common import check_device, check_model_arg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    k = sub.add_parser("hooks", help="list the hook names of a model, one per line",
                       description="List every hook name of MODEL (for --hooks), one per line.")
    k.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a TransformerLens model name or a local Hugging Face model folder "
                        "(default: the embedded 4-layer model)")
    k.add_argument("--device", default=None, help="where the model is loaded (default: the cpu)")
    k.set_defaults(func=run)
    return k


def run(args: argparse.Namespace) -> int:
    from ..hook_names import available_hooks

    check_model_arg(args.model)
    check_device(args.device)
    model = common.load_model(args.model, "float32", args.device)
    for name in available_hooks(model):
        print(name)
    return 0
