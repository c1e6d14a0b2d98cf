"""``tl-degeneracy``: the command line.

    tl-degeneracy analyze [MODEL] [--dataset NAME_OR_PATH] [--tokens N] [--out DIR] [--resume] ...
    tl-degeneracy report DIR
    tl-degeneracy heads DIR [--threshold T]

MODEL is a TransformerLens model name (``gpt2``), a local Hugging Face model folder, or
omitted for the embedded default model; the dataset is a ``datasets`` name (streamed), a
local text/JSON/parquet file or folder, or omitted for the embedded default text.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}


def load_model(name: str | None, dtype: torch.dtype, device: str | None) -> torch.nn.Module:
    if name is None:
        from .default_model import load_default_model

        return load_default_model(dtype=dtype, device=device)
    from .generations import load_pretrained

    return load_pretrained(name, dtype=dtype, device=device)


def load_text_dataset(spec: str | None) -> Any:
    """The embedded text, a local file/folder (text, JSON, parquet, CSV) or a hub dataset (streamed)."""
    import datasets

    if spec is None:
        from .default_model import default_text_dataset

        return default_text_dataset()
    path = Path(spec)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
        if not files:
            raise SystemExit(f"no .txt/.json/.jsonl/.parquet/.csv files in {path}")
        builder = LOCAL_FORMATS.get(files[0].suffix)
        if builder is None:
            raise SystemExit(f"cannot read {files[0]}: use a .txt, .json(l), .parquet or .csv file")
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    from .generations import hub_reachable

    if os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("1", "true") and not hub_reachable():
        raise SystemExit(
            f"cannot load dataset {spec!r}: it is not a local path and the Hugging Face hub (huggingface.co) is "
            "not reachable. Pass a local text/JSON/parquet file or folder, or omit --dataset for the embedded "
            "default text."
        )
    try:
        return datasets.load_dataset(spec, split="train", streaming=True)
    except Exception as exc:  # the hub raises many kinds; all mean "not here"
        raise SystemExit(
            f"could not load dataset {spec!r} ({type(exc).__name__}: {exc}). Without the dataset hub, pass a "
            "local text/JSON/parquet file or folder, or omit --dataset for the embedded default text."
        ) from None


def analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze as run_analysis
    from .generations import HubUnavailableError

    try:
        model = load_model(args.model, DTYPES[args.dtype], args.device)
    except HubUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = load_text_dataset(args.dataset)
    report = run_analysis(model, data, args.out, hooks=args.hooks, max_tokens=args.tokens, batch_size=args.batch_size,
                          context=args.context, n_probes=args.probes, rtol=args.rtol, resume=args.resume)
    print_summary(report)
    print(f"\nwrote {args.out}/: stats.safetensors, basis.safetensors, report.json, plots/, report.html")
    return 0


def print_summary(report: Any) -> None:
    cfg = report.model.get("cfg", {})
    print(f"\n{report.n_tokens} tokens through {report.model.get('class')} ({cfg.get('model_name', '')}) in "
          f"{report.seconds} s; eigenvalues below rtol={report.rtol:g} x the largest count as zero")
    print(f"{'hook':32s} {'d':>5s} {'IB kept':>8s} {'IB 99%':>7s} {'PCA 99%':>8s}  top Λ")
    for hook, s in report.spectra.items():
        top = ", ".join(f"{v:.3g}" for v in s.top_lambda[:3])
        print(f"{hook:32s} {s.d:5d} {s.ib_kept:8d} {s.ib_dirs_99:7d} {s.pca_dirs_99:8d}  {top}")
    print()
    print(report.degeneracy.summary())
    if report.synchronized_heads is not None:
        print()
        print_heads(report.synchronized_heads)


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


def report_cmd(args: argparse.Namespace) -> int:
    from .analysis import AnalysisReport, render

    path = render(args.dir)
    print_summary(AnalysisReport.load(Path(args.dir) / "report.json"))
    print(f"\nwrote {path}")
    return 0


def heads_cmd(args: argparse.Namespace) -> int:
    from .analysis import AnalysisReport

    report = AnalysisReport.load(Path(args.dir) / "report.json")
    if report.synchronized_heads is None:
        print("this analysis has no head-synchronisation statistics", file=sys.stderr)
        return 1
    heads = report.synchronized_heads
    if args.threshold is not None:
        from .head_sync import synchronized_heads
        from .stats import Stats

        heads = synchronized_heads(Stats.load(Path(args.dir) / "stats.safetensors"), threshold=args.threshold)
    print_heads(heads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-degeneracy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="collect statistics, fit interaction bases, write the report")
    a.add_argument("model", nargs="?", default=None, help="TL model name or local HF folder (default: embedded)")
    a.add_argument("--dataset", default=None, help="datasets name or local file/folder (default: embedded text)")
    a.add_argument("--tokens", type=int, default=8192, help="stop after this many tokens")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--context", type=int, default=128, help="tokens per sequence")
    a.add_argument("--hooks", nargs="*", default=None,
                   help="hook names or globs for the interaction bases (default: the residual stream)")
    a.add_argument("--probes", type=int, default=4, help="random output probes per batch for Jacobian Grams")
    a.add_argument("--rtol", type=float, default=1e-8, help="relative eigenvalue threshold")
    a.add_argument("--device", default=None)
    a.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a.add_argument("--out", default="tl_degeneracy_out")
    a.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.safetensors")
    a.set_defaults(func=analyze)
    r = sub.add_parser("report", help="re-render plots and report.html from an analysis folder")
    r.add_argument("dir")
    r.set_defaults(func=report_cmd)
    h = sub.add_parser("heads", help="print the synchronized-heads table of an analysis folder")
    h.add_argument("dir")
    h.add_argument("--threshold", type=float, default=None, help="recompute at another TV threshold")
    h.set_defaults(func=heads_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun with --resume to continue from the checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
