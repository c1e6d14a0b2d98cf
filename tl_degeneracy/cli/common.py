"""What every subcommand shares: one-paragraph errors, checks made before the model is loaded,
loading the model and the text, argparse types, and interrupt handling.

Nothing here imports torch, TransformerLens or ``datasets`` at module level: ``--help`` and usage
errors answer at once; the heavy imports happen inside the functions that need them.

A mistake in what was asked (a missing file, a bad number, an unknown hook, an unusable device or
output folder) raises ``UsageError``, which ``main`` prints as one paragraph starting with
``error:`` on stderr and exit code 2. Ctrl-C exits with 130 and SIGTERM with 143, after saying
where the checkpoint is (continue with ``--resume``).
"""
from __future__ import annotations

import argparse
import codecs
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from .. import validation
from ..interrupts import Terminated

DTYPES = ("float32", "float64", "bfloat16", "float16")  # --dtype choices (torch dtype names)
LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}
SNIFF_BYTES = 8192  # how much of a text file is checked for binary content
EMBEDDED_TEXT = "embedded default text"
REPORT_FILE, CHECKPOINT_FILE = "report.json", "checkpoint.safetensors"  # as tl_degeneracy.analysis.files names them


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one ``error:`` paragraph, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, already reported to the user: ``main`` exits with ``code``."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def paragraph(text: object) -> str:
    """One paragraph: every run of whitespace (newlines included) becomes one space."""
    return " ".join(str(text).split())


# --- argparse types: the package's validators on the command line ----------------------------

def arg_type(check: Callable[..., Any], parse: Callable[[str], Any] = float, expected: str = "a number"
             ) -> Callable[[str], Any]:
    """An argparse ``type`` that parses the text and checks it with a ``validation`` function."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value, "the value")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


positive_int = arg_type(validation.positive_int, int, "a positive integer")
nonnegative_int = arg_type(validation.nonnegative_int, int, "an integer >= 0")
positive_float = arg_type(validation.positive_float, float, "a positive number")
nonnegative_float = arg_type(validation.nonnegative_float, float, "a number >= 0")
unit_interval = arg_type(
    lambda v, what: validation.fraction(v, what, "It is a total-variation distance between attention patterns."),
    float, "a number in [0, 1]")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a ``--dtype`` choice (imports torch)."""
    import torch

    return getattr(torch, name)


# --- checks that need no model ---------------------------------------------------------------

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
    created = missing[::-1]
    try:  # permissions are not the whole story (/proc, read-only mounts): make it and write to it, now
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        remove_empty_dirs(created)
        fail(f"cannot write to --out {out} ({exc.strerror or type(exc).__name__}). Pass a folder you can write to "
             "with --out DIR.")
    return created


def check_finished_run(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to write over a finished analysis in ``out`` unless ``--overwrite`` (a ``--resume`` of an
    unfinished one, with its checkpoint, is fine)."""
    finished = [name for name in (REPORT_FILE, "stats.safetensors") if (out / name).exists()]
    if not finished or overwrite or (resume and (out / CHECKPOINT_FILE).exists()):
        return
    fail(f"--out {out} holds a finished analysis ({', '.join(finished)}); this run would replace it. Pass "
         "--overwrite to replace it, or another --out folder for the new run.")


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
    import torch

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
    """A MODEL that names a local path must be a Hugging Face model folder or a ``.gguf`` file (or a
    folder holding one)."""
    if name is None:
        return
    path = Path(name).expanduser()
    advice = ("Pass a TransformerLens model name (e.g. gpt2), a local Hugging Face model folder (with config.json "
              "and the weights), a .gguf file, or omit MODEL for the embedded default model.")
    if path.exists():
        if not path.is_dir():
            if path.suffix.lower() != ".gguf":
                fail(f"MODEL {name!r} is a file, not a model. {advice}")
            return
        if not (path / "config.json").is_file():
            ggufs = list(path.glob("*.gguf"))
            if len(ggufs) > 1:
                fail(f"MODEL {name!r} holds several .gguf files; pass the one to analyse.")
            if not ggufs:
                fail(f"MODEL {name!r} is a folder but not a Hugging Face model folder: it has no config.json "
                     f"(nor a .gguf file). {advice}")
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


def check_dataset(spec: str | None) -> None:
    """What can be checked of ``--dataset`` without loading it (a local path's existence and content)."""
    if spec is not None:
        local_dataset_files(spec)


def _check_text_column(spec: str, data: Any) -> None:
    """Every row's 'text' is a string (a number or null there would reach the tokenizer, whose message names
    neither the file nor the field)."""
    feature = data.features.get("text")
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        nulls = data.data.column("text").null_count
        if not nulls:
            return
        row = next(i for i, value in enumerate(data["text"]) if value is None)
        fail(f"--dataset {spec}: the field 'text' is empty (null) in {nulls} row(s), the first is row {row}; "
             "give every row its text as a string, or drop those rows.")
    row, value = next(((i, v) for i, v in enumerate(data["text"]) if not isinstance(v, str)), (0, data[0]["text"]))
    fail(f"--dataset {spec}: the field 'text' holds {type(value).__name__} values, not text (row {row}: {value!r}); "
         "put the text to analyse in 'text' as strings.")


def load_text_dataset(spec: str | None) -> Any:
    """The embedded text, a local file/folder (text, JSON, parquet, CSV) or a hub dataset (streamed).

    Raises ``UsageError`` for a dataset that cannot be used."""
    if spec is None:
        from ..default_model import default_text_dataset

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
        if "text" in columns:
            _check_text_column(spec, data)
        return data
    from ..loading import hub_reachable

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


# --- the model -------------------------------------------------------------------------------

def load_model(name: str | None, dtype: str, device: str | None) -> Any:
    """The embedded model (``name`` None), a TransformerLens name or a local Hugging Face folder;
    the user's mistakes (hub unreachable, unknown name) become ``UsageError``."""
    from ..loading import HubUnavailableError, load_pretrained

    try:
        if name is None:
            from ..default_model import load_default_model

            return load_default_model(dtype=torch_dtype(dtype), device=device)
        return load_pretrained(name, dtype=torch_dtype(dtype), device=device)
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


# --- analysis folders ------------------------------------------------------------------------

def check_run_dir(folder: str, needs: Sequence[str]) -> Path:
    """Refuse a folder that holds no finished analysis (or lacks one of ``needs``)."""
    path = Path(folder).expanduser()
    if not path.exists():
        fail(f"{folder}: no such folder. Pass the --out folder of a finished `tl-degeneracy analyze` run.")
    if not path.is_dir():
        fail(f"{folder} is a file; pass the --out folder of a finished `tl-degeneracy analyze` run.")
    if not (path / REPORT_FILE).is_file():
        hint = (f" It holds {CHECKPOINT_FILE}, an unfinished run: continue it with `tl-degeneracy analyze ... --out "
                f"{folder} --resume` (the same options as before)." if (path / CHECKPOINT_FILE).exists() else
                f" Run `tl-degeneracy analyze --out {folder}` first.")
        fail(f"{folder} holds no analysis (there is no report.json).{hint}")
    missing = [name for name in needs if not (path / name).is_file()]
    if missing:
        fail(f"{folder} holds report.json but not {', '.join(missing)}; rerun `tl-degeneracy analyze --out "
             f"{folder}` to write them.")
    return path


def load_report(path: Path) -> Any:
    from ..analysis.report import AnalysisReport

    try:
        return AnalysisReport.load(path / REPORT_FILE)
    except ValueError as exc:  # another format, or not JSON
        fail(f"{path / REPORT_FILE}: {paragraph(exc)}")


# --- interrupts ------------------------------------------------------------------------------

@contextmanager
def interruptible(checkpoint: Path | None, created: Sequence[Path] = (),
                  nothing: str = "before anything was collected; nothing was written") -> Iterator[None]:
    """Ctrl-C / SIGTERM inside the block: say where the checkpoint is (or that ``nothing`` was) and exit
    with 130 / 143 (``Interrupted``); a block that does not finish removes the folders it ``created``."""
    finished = False
    try:
        yield
        finished = True
    except KeyboardInterrupt as exc:
        how = "interrupted by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        if checkpoint is not None and checkpoint.exists():
            print(f"\n{how}: the checkpoint is in {checkpoint}; rerun the same command with --resume to continue",
                  file=sys.stderr)
        else:
            print(f"\n{how} {nothing}", file=sys.stderr)
        raise Interrupted(143 if isinstance(exc, Terminated) else 130) from None
    finally:
        if not finished:
            remove_empty_dirs(list(created))


class Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``error:`` paragraph (exit code 2), like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {paragraph(message)} (see `{self.prog} --help`)\n")
