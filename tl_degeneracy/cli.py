"""``tl-degeneracy``: the command line.

    tl-degeneracy analyze [MODEL] [--dataset NAME_OR_PATH] [--tokens N] [--out DIR] [--resume] ...
    tl-degeneracy heads DIR

MODEL is a TransformerLens model name (``gpt2``), a local Hugging Face model folder, or
omitted for the embedded default model; the dataset is a ``datasets`` name (streamed), a
local text/JSON/parquet file or folder, or omitted for the embedded default text.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

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


def _analysis_hooks(model: torch.nn.Module, requested: Sequence[str] | None) -> list[str]:
    from .hook_names import resolve_hooks

    if requested:
        return resolve_hooks(model, list(requested))
    n_layers = model.cfg.n_layers
    return resolve_hooks(model, [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
                         + [f"blocks.{n_layers - 1}.hook_resid_post"])


def analyze(args: argparse.Namespace) -> int:
    from .collect import OBSERVER_FACTORIES, collect
    from .generations import HubUnavailableError
    from .interaction_basis import InteractionBasis

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model = load_model(args.model, DTYPES[args.dtype], args.device)
    except HubUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = load_text_dataset(args.dataset)
    hooks = _analysis_hooks(model, args.hooks)
    observers = {name: True for name in ("head_sync", "neuron_sync") if name in OBSERVER_FACTORIES}
    start = time.time()
    stats = collect(model, data, hooks, batch_size=args.batch_size, context=args.context, max_tokens=args.tokens,
                    jacobians=True, n_probes=args.probes, checkpoint=out / "checkpoint.safetensors",
                    resume=args.resume, checkpoint_every=10, **observers)
    stats.save(out / "stats.safetensors")
    basis = InteractionBasis.fit(stats, rtol=args.rtol)
    basis.save(out / "basis.safetensors")
    pca = InteractionBasis.fit(stats, scaling="pca", rtol=args.rtol)
    summary = {
        "model": stats.meta["model"], "n_tokens": stats.n_tokens, "seconds": round(time.time() - start, 1),
        "rtol": args.rtol, "n_probes": args.probes,
        "hooks": {h: {"d": basis[h].d, "ib_kept": basis[h].k, "pca_kept": pca[h].k,
                      "ib_dirs_99": basis[h].n_directions_for(0.99), "pca_dirs_99": pca[h].n_directions_for(0.99),
                      "top_lambda": basis[h].eigenvalues[:5].tolist(), "thresholds": basis[h].thresholds}
                  for h in basis.hooks},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{stats.n_tokens} tokens through {summary['model']['class']} "
          f"({summary['model']['cfg'].get('model_name', '')}) in {summary['seconds']} s; "
          f"thresholds: eigenvalues below rtol={args.rtol} x the largest count as zero")
    print(f"{'hook':32s} {'d':>5s} {'IB kept':>8s} {'IB 99%':>7s} {'PCA 99%':>8s}  top Λ")
    for h, row in summary["hooks"].items():
        top = ", ".join(f"{v:.3g}" for v in row["top_lambda"][:3])
        print(f"{h:32s} {row['d']:5d} {row['ib_kept']:8d} {row['ib_dirs_99']:7d} {row['pca_dirs_99']:8d}  {top}")
    print(f"\nwrote {out}/stats.safetensors, basis.safetensors, summary.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-degeneracy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="collect statistics, fit interaction bases, write the results")
    a.add_argument("model", nargs="?", default=None, help="TL model name or local HF folder (default: embedded)")
    a.add_argument("--dataset", default=None, help="datasets name or local file/folder (default: embedded text)")
    a.add_argument("--tokens", type=int, default=20_000, help="stop after this many tokens")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--context", type=int, default=128, help="tokens per sequence")
    a.add_argument("--hooks", nargs="*", default=None, help="hook names or globs (default: the residual stream)")
    a.add_argument("--probes", type=int, default=4, help="random output probes per batch for Jacobian Grams")
    a.add_argument("--rtol", type=float, default=1e-8, help="relative eigenvalue threshold")
    a.add_argument("--device", default=None)
    a.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a.add_argument("--out", default="tl_degeneracy_out")
    a.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.safetensors")
    a.set_defaults(func=analyze)
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
