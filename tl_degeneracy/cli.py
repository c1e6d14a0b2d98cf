"""``tl-degeneracy``: the command line.

    tl-degeneracy analyze [MODEL] [--dataset NAME_OR_PATH] [--tokens N] [--out DIR] [--resume] ...
    tl-degeneracy report DIR
    tl-degeneracy heads DIR [--threshold T]
    tl-degeneracy hooks [MODEL]

MODEL is a TransformerLens model name (``gpt2``), a local Hugging Face model folder, or
omitted for the embedded default model; the dataset is a ``datasets`` name (streamed), a
local text/JSON/parquet/CSV file or folder, or omitted for the embedded default text.

A mistake in what was asked (a missing file, a bad number, an unknown hook, an unusable
device or output folder) prints one paragraph starting with ``error:`` on stderr and exits
with code 2; as much as possible is checked before the model is loaded. Ctrl-C exits with
130 and SIGTERM with 143, after writing ``DIR/checkpoint.safetensors`` when collection had
started (continue with ``--resume``).
"""
from __future__ import annotations

import argparse
import codecs
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import __version__

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}
CHECKPOINT_NAME = "checkpoint.safetensors"  # as tl_degeneracy.analysis writes it
SNIFF_BYTES = 8192  # how much of a text file is checked for binary content
EMBEDDED_TEXT = "embedded default text"


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one ``error:`` paragraph, exit code 2."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def paragraph(text: object) -> str:
    """One paragraph: every run of whitespace (newlines included) becomes one space."""
    return " ".join(str(text).split())


# --- checks that need no model ---------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(
            f"must lie in [0, 1] (it is a total-variation distance between attention patterns), got {text}")
    return value


def check_out_dir(out: Path) -> list[Path]:
    """Refuse an output folder that cannot be written; return the folders that will be created
    for it (outermost first), so that a failed run can remove them again."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder; pass a folder for the results (it is created if missing).")
    missing: list[Path] = []
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        fail(f"cannot create --out {out}: {existing} is a file, not a folder. Pass a folder path that is not "
             "inside a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if not missing else f"its nearest existing parent {existing}"
        fail(f"cannot write to --out {out}: {where} is not writable by this user. Pass a folder you can write to "
             "with --out DIR.")
    return missing[::-1]


def remove_empty_dirs(created: list[Path]) -> None:
    """Remove the folders this run created, innermost first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written) or already gone
            return


def check_device(spec: str | None) -> None:
    if spec is None:
        return
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        fail(f"--device {spec!r} is not a device torch knows ({paragraph(exc)}). Use cpu, cuda, cuda:N or mps.")
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {spec}: CUDA is not available (torch.cuda.is_available() is False: no NVIDIA GPU or "
                 "driver is visible, or this torch was built without CUDA). Omit --device or pass --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            fail(f"--device {spec}: the Apple MPS backend is not available here. Omit --device or pass --device cpu.")
        return
    available = getattr(getattr(torch, device.type, None), "is_available", None)
    if device.type == "meta" or available is None or not available():
        fail(f"--device {spec}: no {device.type} device is available to run the model on. Omit --device or pass "
             "--device cpu.")


def check_model_arg(name: str | None) -> None:
    """A MODEL that names a local path must be a Hugging Face model folder."""
    if name is None:
        return
    path = Path(name).expanduser()
    advice = ("Pass a TransformerLens model name (e.g. gpt2), a local Hugging Face model folder (with config.json "
              "and the weights), or omit MODEL for the embedded default model.")
    if path.exists():
        if not path.is_dir():
            fail(f"MODEL {name!r} is a file, not a model. {advice}")
        if not (path / "config.json").is_file():
            fail(f"MODEL {name!r} is a folder but not a Hugging Face model folder: it has no config.json. {advice}")
    elif name.startswith((".", "/", "~")):
        fail(f"MODEL {name!r}: no such folder. {advice}")


def _sniff_text(path: Path) -> bool:
    """Refuse binary content in a text file; True when it holds more than whitespace."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        nul = head.find(b"\x00")
        if nul >= 0:
            fail(f"--dataset {path} is not a text file: it holds a NUL byte at offset {nul} (a binary file with a "
                 "text suffix?). Pass UTF-8 text, JSON, CSV or parquet.")
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as exc:
            fail(f"--dataset {path} is not UTF-8 text (invalid byte at offset {exc.start}). Convert it to UTF-8, "
                 "or pass JSON, CSV or parquet.")
        chunk = head
        while chunk:
            if chunk.strip():
                return True
            chunk = fh.read(1 << 20)
    return False


def _has_content(path: Path, builder: str) -> bool:
    if builder != "parquet":
        return _sniff_text(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if not magic:
        return False
    if magic != b"PAR1":
        fail(f"--dataset {path} is not a parquet file (it does not start with the parquet magic bytes PAR1).")
    return True


def local_dataset_files(spec: str) -> tuple[str, list[Path]] | None:
    """``(builder, files)`` for a local file or folder, None for a hub dataset name; refuses what
    cannot be read (missing, unsupported, empty, binary) before anything is loaded."""
    path = Path(spec).expanduser()
    if not path.exists():
        if path.suffix.lower() in LOCAL_FORMATS or spec.startswith((".", "/", "~")):
            fail(f"--dataset {spec}: no such file or folder. Pass an existing text/JSON/parquet/CSV file or folder, "
                 "a Hugging Face datasets name, or omit --dataset for the embedded default text.")
        return None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            fail(f"--dataset {spec}: the folder holds no {'/'.join(LOCAL_FORMATS)} files.")
    else:
        files = [path]
    builders = {LOCAL_FORMATS.get(f.suffix.lower()) for f in files}
    if None in builders:
        fail(f"--dataset {spec}: cannot read {path.suffix or 'files without a suffix'}; use a .txt, .json, .jsonl, "
             ".parquet or .csv file, or a folder of them.")
    if len(builders) > 1:
        fail(f"--dataset {spec}: the folder mixes formats ({', '.join(sorted(b for b in builders if b))}); "
             "put files of one format in the folder.")
    builder = builders.pop()
    assert builder is not None
    if not any([_has_content(f, builder) for f in files]):
        fail(f"--dataset {spec} is empty: {'the file holds' if len(files) == 1 else 'its files hold'} no text.")
    return builder, files


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars: stderr carries only what this command says."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_text_dataset(spec: str | None) -> Any:
    """The embedded text, a local file/folder (text, JSON, parquet, CSV) or a hub dataset (streamed).

    Raises ``UsageError`` for a dataset that cannot be used."""
    if spec is None:
        from .default_model import default_text_dataset

        return default_text_dataset()
    import datasets

    local = local_dataset_files(spec)
    if local is not None:
        builder, files = local
        try:
            with _quiet_datasets():
                data = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as exc:  # malformed JSON/CSV/parquet: datasets raises many kinds
            fail(f"--dataset {spec}: could not read it as {builder} ({type(exc).__name__}: {paragraph(exc)}).")
        columns = list(data.column_names)
        if not {"text", "tokens", "input_ids"} & set(columns):
            fail(f"--dataset {spec}: no 'text' column (it has {columns}); name the column holding the text 'text' "
                 "(or give token ids as 'tokens' or 'input_ids').")
        if len(data) == 0:
            fail(f"--dataset {spec} is empty: it holds no rows.")
        return data
    from .generations import hub_reachable

    if os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("1", "true") and not hub_reachable():
        fail(f"cannot load dataset {spec!r}: there is no such local file or folder and the Hugging Face hub "
             "(huggingface.co) is not reachable. Pass a local text/JSON/parquet/CSV file or folder, or omit "
             "--dataset for the embedded default text.")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(spec, split="train", streaming=True)
    except Exception as exc:  # the hub raises many kinds; all mean "not here"
        fail(f"could not load dataset {spec!r} ({type(exc).__name__}: {paragraph(exc)}). Without the dataset hub, "
             "pass a local text/JSON/parquet/CSV file or folder, or omit --dataset for the embedded default text.")


# --- the model -------------------------------------------------------------------------------

def load_model(name: str | None, dtype: torch.dtype, device: str | None) -> torch.nn.Module:
    if name is None:
        from .default_model import load_default_model

        return load_default_model(dtype=dtype, device=device)
    from .generations import load_pretrained

    return load_pretrained(name, dtype=dtype, device=device)


def load_model_for_cli(name: str | None, dtype: torch.dtype, device: str | None) -> torch.nn.Module:
    """``load_model`` with the user's mistakes (hub unreachable, unknown name) as ``UsageError``."""
    from .generations import HubUnavailableError

    try:
        return load_model(name, dtype, device)
    except (HubUnavailableError, ValueError) as exc:
        fail(paragraph(exc))


def hooks_command(model: str | None) -> str:
    return "tl-degeneracy hooks" + ("" if model is None else " " + shlex.quote(model))


def unknown_hook_message(exc: Exception, model: str | None) -> str:
    """The library's message, with the command that lists the hooks of *this* model."""
    cmd = hooks_command(model)
    msg = paragraph(exc).replace("model.hook_dict.keys() or `tl-degeneracy hooks [MODEL]`", f"`{cmd}`")
    if cmd not in msg:
        msg += f" List this model's hook names with `{cmd}`."
    return msg


# --- commands --------------------------------------------------------------------------------

def analyze(args: argparse.Namespace) -> int:
    from . import CheckpointMismatchError, EmptyDataError, NonFiniteError, Terminated, UnknownHookError
    from .analysis import AnalysisConfig
    from .analysis import analyze as run_analysis
    from .generations import HubUnavailableError
    from .hook_names import resolve_hooks

    # Everything that can be checked without the model, first.
    out = Path(args.out).expanduser()
    created = check_out_dir(out)
    check_device(args.device)
    check_model_arg(args.model)
    options = dict(hooks=args.hooks, max_tokens=args.tokens, batch_size=args.batch_size, context=args.context,
                   n_probes=args.probes, rtol=args.rtol)
    interactions = interactions_config(args) if args.interactions else None
    llc = llc_config(args)
    try:
        AnalysisConfig(hooks=None if args.hooks is None else tuple(args.hooks), max_tokens=args.tokens,
                       batch_size=args.batch_size, context=args.context, n_probes=args.probes, rtol=args.rtol)
    except ValueError as exc:
        fail(paragraph(exc))
    checkpoint = out / CHECKPOINT_NAME
    if args.resume and not checkpoint.exists():
        print(f"note: --resume: no checkpoint found in {out} ({checkpoint} does not exist); the run starts fresh",
              file=sys.stderr)
    if not args.resume and checkpoint.exists():
        print(f"note: {checkpoint} (an earlier run's checkpoint) will be overwritten: this run starts fresh; "
              "stop now and rerun with --resume to continue that run instead", file=sys.stderr)

    finished = False
    try:
        data = load_text_dataset(args.dataset)
        model = load_model_for_cli(args.model, DTYPES[args.dtype], args.device)
        cfg: Any = model.cfg
        n_ctx = int(cfg.n_ctx)
        if args.context is not None and args.context > n_ctx:
            fail(f"--context {args.context} is longer than the model's context window (n_ctx={n_ctx}); pass "
                 f"--context {n_ctx} or less, or omit it for min(128, n_ctx).")
        if args.hooks:
            try:
                resolve_hooks(model, args.hooks)
            except UnknownHookError as exc:
                fail(unknown_hook_message(exc, args.model))
            except ValueError as exc:  # e.g. an attention pattern, which has no per-token Gram
                fail(paragraph(exc))
        try:
            report = run_analysis(model, data, out, resume=args.resume, keep_checkpoint=args.keep_checkpoint,
                                  dataset=args.dataset or EMBEDDED_TEXT, **options)
            if interactions is not None:
                run_interactions(model, data, out, interactions, resume=args.resume,
                                 keep_checkpoint=args.keep_checkpoint)
                report = load_report(out)
            if llc is not None:
                run_llc(model, data, out, llc)
        except UnknownHookError as exc:
            fail(unknown_hook_message(exc, args.model))
        except (CheckpointMismatchError, EmptyDataError, HubUnavailableError, NonFiniteError, ValueError) as exc:
            fail(paragraph(exc))
        finished = True
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        how = "interrupted by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        if checkpoint.exists():
            print(f"\n{how}: the checkpoint is in {checkpoint}; rerun the same command with --resume to continue",
                  file=sys.stderr)
        else:
            print(f"\n{how} before anything was collected; nothing was written", file=sys.stderr)
        return code
    finally:
        if not finished:
            remove_empty_dirs(created)
    print_summary(report)
    kept = ", checkpoint.safetensors" if args.keep_checkpoint else ""
    extra = ", interactions.safetensors" if interactions is not None else ""
    extra += ", llc.json" if llc is not None else ""
    print(f"\nwrote {out}/: stats.safetensors, basis.safetensors, pca_basis.safetensors{extra}, report.json, plots/, "
          f"report.html{kept}")
    return 0


def llc_config(args: argparse.Namespace) -> Any:
    from .llc.run import config_from_args

    try:
        return config_from_args(args)
    except ValueError as exc:
        fail(f"--llc: {paragraph(exc)}")


def run_llc(model: Any, data: Any, out: Path, config: Any) -> None:
    """N_eff(ε) by SGLD for the analysis in ``out`` (docs/llc.md), then the report re-rendered."""
    from .analysis import render
    from .llc.run import llc_analysis, summary_lines

    section = llc_analysis(model, data, out, config)
    render(out)
    print()
    print("\n".join(summary_lines(section)))


def interactions_config(args: argparse.Namespace) -> Any:
    from .interactions.run import InteractionsConfig

    try:
        return InteractionsConfig(n_probes=args.edge_probes, max_tokens=args.edge_tokens,
                                  batch_size=args.batch_size, eps_rtol_grid=tuple(args.eps_rtol),
                                  n_modules=args.modules, ablation_tokens=args.ablation_tokens)
    except ValueError as exc:
        fail(paragraph(exc))


def run_interactions(model: Any, data: Any, out: Path, config: Any, *, resume: bool, keep_checkpoint: bool) -> None:
    """The interaction graph of the analysis in ``out``, then the report re-rendered with its plots."""
    from .analysis import render
    from .interactions.run import interactions_analysis

    section = interactions_analysis(model, data, out, config, resume=resume, keep_checkpoint=keep_checkpoint)
    render(out)
    print(f"\ninteraction graph: {len(section['nodes'])} nodes, {section['edge_tokens']} tokens, "
          f"{section['edge_seconds']} s for the edges")
    print(f"{'basis':12s} {'layer pair':58s} {'edges':>7s} {'99% in':>7s} {'Gini':>6s}")
    for row in section["sparsity"]:
        print(f"{row['basis']:12s} {row['source'] + ' -> ' + row['target']:58s} {row['n_edges']:7d} "
              f"{row['fractions']['0.99']:7.3f} {row['gini']:6.3f}")


def interactions_cmd(args: argparse.Namespace) -> int:
    from . import CheckpointMismatchError, EmptyDataError, NonFiniteError, Terminated
    from .generations import HubUnavailableError
    from .interactions.run import CHECKPOINT_FILE

    folder = check_run_dir(args.dir, ["basis.safetensors", "pca_basis.safetensors", "stats.safetensors"])
    load_report(folder)
    check_device(args.device)
    check_model_arg(args.model)
    config = interactions_config(args)
    checkpoint = folder / CHECKPOINT_FILE
    try:
        data = load_text_dataset(args.dataset)
        model = load_model_for_cli(args.model, DTYPES[args.dtype], args.device)
        try:
            run_interactions(model, data, folder, config, resume=args.resume, keep_checkpoint=args.keep_checkpoint)
        except (CheckpointMismatchError, EmptyDataError, HubUnavailableError, NonFiniteError, ValueError) as exc:
            fail(paragraph(exc))
    except KeyboardInterrupt as exc:
        how = "interrupted by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        where = (f"the checkpoint is in {checkpoint}; rerun the same command with --resume to continue"
                 if checkpoint.exists() else "nothing was written")
        print(f"\n{how}: {where}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    print(f"wrote {folder}/interactions.safetensors, report.json, plots/, report.html")
    return 0


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


def check_run_dir(folder: str, needs: Sequence[str]) -> Path:
    """Refuse a folder that holds no finished analysis (or lacks one of ``needs``)."""
    path = Path(folder).expanduser()
    if not path.exists():
        fail(f"{folder}: no such folder. Pass the --out folder of a finished `tl-degeneracy analyze` run.")
    if not path.is_dir():
        fail(f"{folder} is a file; pass the --out folder of a finished `tl-degeneracy analyze` run.")
    if not (path / "report.json").is_file():
        hint = (f" It holds {CHECKPOINT_NAME}, an unfinished run: continue it with `tl-degeneracy analyze ... --out "
                f"{folder} --resume` (the same options as before)." if (path / CHECKPOINT_NAME).exists() else
                f" Run `tl-degeneracy analyze --out {folder}` first.")
        fail(f"{folder} holds no analysis (there is no report.json).{hint}")
    missing = [name for name in needs if not (path / name).is_file()]
    if missing:
        fail(f"{folder} holds report.json but not {', '.join(missing)}; rerun `tl-degeneracy analyze --out "
             f"{folder}` to write them.")
    return path


def load_report(path: Path) -> Any:
    from .analysis import AnalysisReport

    try:
        return AnalysisReport.load(path / "report.json")
    except ValueError as exc:  # another format, or not JSON
        fail(f"{path / 'report.json'}: {paragraph(exc)}")


def report_cmd(args: argparse.Namespace) -> int:
    from .analysis import render

    folder = check_run_dir(args.dir, ["basis.safetensors", "pca_basis.safetensors", "stats.safetensors"])
    report = load_report(folder)
    path = render(folder)
    print_summary(report)
    print(f"\nwrote {path}")
    return 0


def heads_cmd(args: argparse.Namespace) -> int:
    folder = check_run_dir(args.dir, ["stats.safetensors"] if args.threshold is not None else [])
    report = load_report(folder)
    if report.synchronized_heads is None:
        print("this analysis has no head-synchronisation statistics", file=sys.stderr)
        return 1
    heads = report.synchronized_heads
    if args.threshold is not None:
        from .head_sync import synchronized_heads
        from .stats import Stats

        heads = synchronized_heads(Stats.load(folder / "stats.safetensors"), threshold=args.threshold)
    print_heads(heads)
    return 0


def hooks_cmd(args: argparse.Namespace) -> int:
    from .hook_names import available_hooks

    check_model_arg(args.model)
    check_device(args.device)
    model = load_model_for_cli(args.model, torch.float32, args.device)
    for name in available_hooks(model):
        print(name)
    return 0


# --- the parser ------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``error:`` paragraph (exit code 2), like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {paragraph(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tl-degeneracy", description=__doc__.split("\n\n")[0].replace("``", ""),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tl-degeneracy {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    a.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="sequences per forward/backward pass; larger is faster but needs more memory "
                        "(default: %(default)s)")
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
    a.add_argument("--interactions", action="store_true",
                   help="also compute the interaction graph: edges in the interaction basis, PCA and the model's "
                        "coordinates, their sparsity, modules and ablation curves (default: off)")
    add_interaction_options(a)
    from .llc.run import add_analyze_options  # --llc EPS...: N_eff(ε) by SGLD (docs/llc.md)

    add_analyze_options(a)
    a.set_defaults(func=analyze)

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
    add_interaction_options(i)
    i.set_defaults(func=interactions_cmd)

    from .llc.command import add_parser as add_llc_parser  # `tl-degeneracy llc`: N_eff(ε) by SGLD (docs/llc.md)

    add_llc_parser(sub)

    r = sub.add_parser("report", help="re-render plots and report.html from an analysis folder",
                       description="Redraw plots/ and report.html from the files `analyze` wrote, and print the "
                                   "summary.")
    r.add_argument("dir", metavar="DIR", help="the --out folder of a finished analysis (no default: required)")
    r.set_defaults(func=report_cmd)

    h = sub.add_parser("heads", help="print the synchronized-heads table of an analysis folder",
                       description="Print which attention heads attend alike (synchronized heads).")
    h.add_argument("dir", metavar="DIR", help="the --out folder of a finished analysis (no default: required)")
    h.add_argument("--threshold", type=unit_interval, default=None, metavar="T",
                   help="recompute the table at this total-variation distance, a number in [0, 1] "
                        "(default: the threshold the analysis used, 0.05 unless changed)")
    h.set_defaults(func=heads_cmd)

    k = sub.add_parser("hooks", help="list the hook names of a model, one per line",
                       description="List every hook name of MODEL (for --hooks), one per line.")
    k.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a TransformerLens model name or a local Hugging Face model folder "
                        "(default: the embedded 4-layer model)")
    k.add_argument("--device", default=None, help="where the model is loaded (default: the cpu)")
    k.set_defaults(func=hooks_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .collect import Terminated, sigterm_as_interrupt

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version (0), usage mistakes (2, already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except UsageError as exc:
        print(f"error: {paragraph(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("\ninterrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `tl-degeneracy hooks | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
