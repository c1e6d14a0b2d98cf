"""``tl-degeneracy heads DIR``: the synchronized-heads table of an analysis folder."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import check_run_dir, load_report, unit_interval


def add_parser(sub: Any) -> argparse.ArgumentParser:
    h = sub.add_parser("heads", help="print the synchronized-heads table of an analysis folder",
                       description="Print which attention heads attend alike (synchronized heads).")
    h.add_argument("dir", metavar="DIR", help="the --out folder of a finished analysis (no default: required)")
    h.add_argument("--threshold", type=unit_interval, default=None, metavar="T",
                   help="recompute the table at this total-variation distance, a number in [0, 1] "
                        "(default: the threshold the analysis used, 0.05 unless changed)")
    h.set_defaults(func=run)
    return h


def print_heads(heads: Any) -> None:
    print(f"synchronized heads (threshold {heads.threshold:g}, metric {heads.metric}: {heads.meaning})")
    print(f"{'layer':>5s}  {'heads':24s} {'worst':>8s} {'freedoms':>9s}")
    shown = False
    for block in heads.blocks:
        if len(block.heads) > 1:
            shown = True
            print(f"{block.layer:5d}  {','.join(map(str, block.heads)):24s} {block.worst_distance:8.3g} "
                  f"{block.freedoms:9d}")
    if not shown:
        print("  no synchronized pair at this threshold")


def run(args: argparse.Namespace) -> int:
    folder = check_run_dir(args.dir, ["stats.safetensors"] if args.threshold is not None else [])
    report = load_report(folder)
    if report.synchronized_heads is None:
        print("this analysis has no head-synchronisation statistics", file=sys.stderr)
        return 1
    heads = report.synchronized_heads
    if args.threshold is not None:
        from ..collection.stats import Stats
        from ..sync.heads import synchronized_heads

        stats = Stats.load(folder / "stats.safetensors", groups=["head_sync"])  # only what the table reads
        heads = synchronized_heads(stats, threshold=args.threshold)
    print_heads(heads)
    return 0
