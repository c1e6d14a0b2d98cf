"""``tl-degeneracy report DIR [MODEL]``: redraw plots and report.html of an analysis folder, print its summary.

When report.json is missing or unreadable (a crash after the collection, a file cut short), or with
``--rebuild``, the report is made again from ``stats.safetensors`` and ``analysis.json``: the bases are
refitted, every section recomputed (a section that fails is reported in the report, not fatal). That
needs the model the analysis ran on: MODEL, else the one ``analysis.json`` names (the embedded model,
or a folder or file that still exists).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import common
from .common import DTYPES, check_run_dir, fail, interruptible, load_report, paragraph, positive_int

ANALYSIS_FILE, STATS_FILE = "analysis.json", "stats.safetensors"  # as tl_degeneracy.analysis.files names them


def add_parser(sub: Any) -> argparse.ArgumentParser:
    r = sub.add_parser("report", help="re-render plots and report.html from an analysis folder (rebuild report.json "
                                      "from the statistics when it is missing)",
                       description="Redraw plots/ and report.html from the files `analyze` wrote, and print the "
                                   "summary; rebuild report.json from stats.safetensors when it is missing or "
                                   "unreadable, or with --rebuild.")
    r.add_argument("dir", metavar="DIR", help="the --out folder of an analysis (no default: required)")
    r.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="the model the analysis ran on, needed to rebuild report.json (default: the one analysis.json "
                        "records)")
    r.add_argument("--rebuild", action="store_true",
                   help="recompute report.json (bases, every section) from the statistics even when it is there "
                        "(default: off)")
    r.add_argument("--device", default=None, help="where the model is loaded to rebuild (default: the cpu)")
    r.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of the model's weights: the analysis's (default: %(default)s)")
    r.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads for the fits (default: the cores this process may use)")
    r.set_defaults(func=run)
    return r


def _needs_rebuild(folder: Path) -> str | None:
    """Why report.json must be rebuilt (None: it is there and reads)."""
    if not (folder / "report.json").is_file():
        return "there is no report.json"
    try:
        load_report(folder)
    except common.UsageError as exc:
        return str(exc)
    return None


def rebuild(args: argparse.Namespace, folder: Path, why: str) -> Any:
    from ..analysis.pipeline import read_request, rebuild_report
    from ..threads import available_cores

    for name in (STATS_FILE, ANALYSIS_FILE):
        if not (folder / name).is_file():
            fail(f"{folder}: cannot rebuild report.json ({why}): {name} is missing. Rerun `tl-degeneracy analyze "
                 f"--out {folder} --overwrite`.")
    try:
        request = read_request(folder)
    except ValueError as exc:
        fail(paragraph(exc))
    spec = args.model if args.model is not None else request.get("model")
    if spec is not None and not Path(spec).expanduser().exists() and spec.startswith((".", "/", "~")):
        fail(f"{folder} was analysed with MODEL {spec!r}, which no longer exists; pass the model as MODEL.")
    print(f"rebuilding {folder / 'report.json'} from the statistics ({paragraph(why)})", file=sys.stderr)
    common.check_model_arg(spec)
    common.check_device(args.device)
    with interruptible(None, nothing="before the report was rebuilt; the statistics are untouched"):
        model = common.load_model(spec, args.dtype, args.device)
        try:
            return rebuild_report(folder, model, threads=args.threads or available_cores())
        except ValueError as exc:
            fail(paragraph(exc))


def run(args: argparse.Namespace) -> int:
    from ..analysis.render import render
    from .analyze import print_summary

    folder = Path(args.dir).expanduser()
    why = "--rebuild" if args.rebuild else (_needs_rebuild(folder) if folder.is_dir() else None)
    if why is not None and (folder / STATS_FILE).is_file():
        report = rebuild(args, folder, why)
        path = folder / "report.html"
    else:
        folder = check_run_dir(args.dir, ["pca_basis.safetensors", "stats.safetensors"])
        report = load_report(folder)
        path = render(folder)
    print_summary(report)
    print(f"\nwrote {path}")
    return 0
