"""``tl-degeneracy``: the command line.

    tl-degeneracy analyze [MODEL] [--dataset NAME_OR_PATH] [--tokens N] [--out DIR] [--resume] ...
    tl-degeneracy interactions DIR [MODEL] ...
    tl-degeneracy llc [MODEL] --eps EPS ...
    tl-degeneracy report DIR
    tl-degeneracy heads DIR [--threshold T]
    tl-degeneracy hooks [MODEL]
    tl-degeneracy explore DIR [MODEL] [--tokens N] [--directions N]
    tl-degeneracy export DIR --format sae-lens [--out OUT] [--basis interaction|pca|all] [--hooks ...]

MODEL is a TransformerLens model name (``gpt2``), a local Hugging Face model folder, or
omitted for the embedded default model; the dataset is a ``datasets`` name (streamed), a
local text/JSON/parquet/CSV file or folder, or omitted for the embedded default text.

One module per subcommand (``add_parser`` + ``run``); what they share is ``common``. A mistake in
what was asked prints one paragraph starting with ``error:`` on stderr and exits with code 2;
as much as possible is checked before the model is loaded. Ctrl-C exits with 130 and SIGTERM
with 143, after saying where the checkpoint is (continue with ``--resume``).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..interrupts import Terminated, sigterm_as_interrupt
from ..version import __version__
from . import analyze, explore, export, heads, hooks, interactions, llc, report
from .common import Interrupted, Parser, UsageError, paragraph

SUBCOMMANDS = (analyze, interactions, llc, report, explore, heads, hooks, export)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tl-degeneracy", description=(__doc__ or "").split("\n\n")[0].replace("``", ""),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tl-degeneracy {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version (0), usage mistakes (2, already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with sigterm_as_interrupt():
            return int(args.func(args))
    except UsageError as exc:
        print(f"error: {paragraph(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # already reported
        return exc.code
    except KeyboardInterrupt as exc:
        print("\ninterrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `tl-degeneracy hooks | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


__all__ = ["main", "build_parser", "UsageError"]
