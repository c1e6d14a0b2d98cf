"""``tl-degeneracy report DIR``: redraw plots and report.html of an analysis folder, print its summary."""
from __future__ import annotations

import argparse
from typing import Any

from .common import check_run_dir, load_report


def add_parser(sub: Any) -> argparse.ArgumentParser:
    r = sub.add_parser("report", help="re-render plots and report.html from an analysis folder",
                       description="Redraw plots/ and report.html from the files `analyze` wrote, and print the "
                                   "summary.")
    r.add_argument("dir", metavar="DIR", help="the --out folder of a finished analysis (no default: required)")
    r.set_defaults(func=run)
    return r


def run(args: argparse.Namespace) -> int:
    from ..analysis.render import render
    from .analyze import print_summary

    folder = check_run_dir(args.dir, ["basis.safetensors", "pca_basis.safetensors", "stats.safetensors"])
    report = load_report(folder)
    path = render(folder)
    print_summary(report)
    print(f"\nwrote {path}")
    return 0
