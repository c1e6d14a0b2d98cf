"""``tl-degeneracy export DIR --format FORMAT``: the bases of an analysis folder, written for another tool.

Formats (``FORMATS``: a format is one function that writes an ``Export`` and returns what it wrote):

- ``neuronpedia``: SAEDashboard's Neuronpedia JSON (``batch-0.json``: top activations, histograms,
  density, logit effects) for the same latents, from ``tl-degeneracy explore``'s examples
  (``tl_degeneracy.dashboards.neuronpedia``).
- ``sae-lens``: one sae_lens SAE folder per basis and hook, ``OUT/{basis}/{hook}/cfg.json`` and
  ``sae_weights.safetensors``, for ``sae_lens.SAE.load_from_disk`` (and so SAEDashboard and Neuronpedia's
  tools). Each direction is two ReLU latents, ``relu(f̂)`` and ``relu(−f̂)``, and the SAE reconstructs
  what the basis keeps, ``μ + C⁺ C (f − μ)`` (``tl_degeneracy.basis.sae_lens_export``).

Everything that can be refused (the folder, the bases it holds, the hooks, ``--out``) is checked before
anything is written; a failed export removes the folders it created.
"""
from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import DTYPES, check_out_dir, check_run_dir, fail, interruptible, load_report, paragraph

# --basis choice → the file analyze writes it to (as tl_degeneracy.analysis.files names them)
BASIS_FILES = {"interaction": "basis.safetensors", "pca": "pca_basis.safetensors"}
ANALYSIS_FILE = "analysis.json"


@dataclass(frozen=True)
class Export:
    """What one ``export`` writes: the bases chosen (name → ``InteractionBasis``), each at those of ``hooks`` it
    covers, into ``out``, with the analysis's ``report`` (``AnalysisReport``) and ``request`` (analysis.json; None
    when absent)."""

    run_dir: Path
    out: Path
    bases: dict[str, Any]
    hooks: tuple[str, ...]
    dtype: str
    report: Any
    request: dict[str, Any] | None


def model_name(export: Export) -> str:
    """The model as the analysis was asked for it (a TransformerLens name or a folder), else its config's name."""
    spec = (export.request or {}).get("model")
    return str(spec) if spec else str(export.report.model.get("cfg", {}).get("model_name") or "unknown")


def write_sae_lens(export: Export) -> list[Path]:
    """``--format sae-lens``: a sae_lens SAE folder ``OUT/{basis}/{hook}/`` per basis and hook."""
    import torch

    from ..basis.sae_lens_export import SAELensSource, export_bases_sae_lens

    report = export.report
    run = report.provenance.run
    source = SAELensSource(
        model_name=model_name(export), context_size=int(run["config"].get("context") or report.model["cfg"]["n_ctx"]),
        dataset_path=report.provenance.dataset or "unknown",
        prepend_bos=True,  # analyze tokenizes text with BOS first in every row (tl_degeneracy.data)
        extra={"analysis": str(export.run_dir.resolve()), "model": report.model,
               "positions": run["config"].get("positions"), "n_tokens": report.n_tokens,
               "analysis_package_version": report.provenance.package_version})
    dtype = getattr(torch, export.dtype)
    written: list[Path] = []
    for name, basis in export.bases.items():
        hooks = [h for h in export.hooks if h in basis.layers]
        written += export_bases_sae_lens(basis.layers, export.out / name, source, hooks, dtype).values()
    return written


def write_neuronpedia(export: Export) -> list[Path]:
    """``--format neuronpedia``: SAEDashboard's ``batch-0.json`` per basis and hook, for the latents of the
    sae-lens export, from the direction dashboards (``tl-degeneracy explore DIR`` first), in SAEDashboard's
    folder naming ``OUT/{model_id}_{sae_set}_{hook}_{d_sae}/``."""
    import json

    from ..analysis.explore import EXAMPLES_FILE, load_views
    from ..dashboards.examples import HistogramBins
    from ..dashboards.facts import decoder_vectors
    from ..dashboards.neuronpedia import batch_json

    if not (export.run_dir / EXAMPLES_FILE).is_file():
        raise ValueError(f"{export.run_dir} has no direction dashboards ({EXAMPLES_FILE}): run `tl-degeneracy explore "
                         f"{export.run_dir}` first; the Neuronpedia JSON is made from its examples and histograms")
    views, record, examples = load_views(export.run_dir)
    bins = HistogramBins(**record["bins"])
    run = export.report.provenance.run
    context = int(run["config"].get("context") or export.report.model["cfg"]["n_ctx"])
    model_id = Path(model_name(export)).name
    written = []
    for hook in export.hooks:
        for name, basis in export.bases.items():
            items = views.get(hook, {}).get(name)
            if not items or hook not in basis.layers:
                continue
            layer = basis.layers[hook]
            sae_set = f"tld-{name}"
            batch = batch_json(items, hook, layer.k, model_id, sae_set,
                               decoder_vectors(layer, [v.facts.index for v in items]), bins,
                               n_prompts=max(1, examples.n_tokens // context), context=context,
                               dataset=export.report.provenance.dataset)
            folder = export.out / f"{model_id}_{sae_set}_{hook}_{2 * layer.k}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "batch-0.json"
            path.write_text(json.dumps(batch))
            written.append(path)
    if not written:
        raise ValueError("the direction dashboards cover none of the chosen bases and hooks; rerun `tl-degeneracy "
                         "explore` or choose others with --basis/--hooks")
    return written


FORMATS: dict[str, Callable[[Export], list[Path]]] = {"sae-lens": write_sae_lens, "neuronpedia": write_neuronpedia}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    e = sub.add_parser("export", help="write the bases of an analysis folder for another tool (sae_lens)",
                       description="Write the interaction basis and/or PCA of the analysis in DIR in another tool's "
                                   "format: --format sae-lens writes one sae_lens SAE folder per basis and hook, "
                                   "two ReLU latents per direction (relu(f̂) and relu(−f̂)).")
    e.add_argument("dir", metavar="DIR", help="the --out folder of a finished `tl-degeneracy analyze` run (required)")
    e.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="the format to write: sae-lens (cfg.json + sae_weights.safetensors per hook), neuronpedia "
                        "(SAEDashboard's batch-0.json per hook, from `tl-degeneracy explore`) (required)")
    e.add_argument("--out", type=Path, default=None, metavar="OUT",
                   help="the folder to write into, created if missing (default: DIR/<format>, e.g. DIR/sae_lens)")
    e.add_argument("--basis", choices=[*BASIS_FILES, "all"], default="interaction",
                   help="which basis to export: interaction, pca, or all the folder holds (default: %(default)s)")
    e.add_argument("--hooks", nargs="+", default=None, metavar="HOOK",
                   help="hook names or glob patterns of the bases to export (default: every hook the basis covers)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="precision of the written weights (default: the dtype the model was analysed in)")
    e.set_defaults(func=run)
    return e


def chosen_bases(folder: Path, which: str) -> dict[str, Path]:
    """``--basis`` → the basis files to read (refusing a basis the folder does not hold)."""
    names = list(BASIS_FILES) if which == "all" else [which]
    present = {n: folder / BASIS_FILES[n] for n in names if (folder / BASIS_FILES[n]).is_file()}
    if present:
        return present
    if which == "interaction":
        fail(f"{folder} holds no interaction basis ({BASIS_FILES['interaction']}): the analysis ran without the "
             f"'jacobians' stage. Export PCA with --basis pca, or rerun `tl-degeneracy analyze --out {folder} "
             "--overwrite` with the jacobians stage.")
    fail(f"{folder} holds report.json but no {' or '.join(BASIS_FILES[n] for n in names)}; rebuild the bases with "
         f"`tl-degeneracy report {folder} --rebuild`.")


def load_bases(files: dict[str, Path]) -> dict[str, Any]:
    from ..basis.bases import InteractionBasis

    bases = {}
    for name, path in files.items():
        try:
            bases[name] = InteractionBasis.load(path)
        except Exception as exc:  # noqa: BLE001  (safetensors, JSON and OS errors all mean "cannot be read")
            fail(f"cannot read {path} ({type(exc).__name__}: {paragraph(exc)}); rebuild the bases with "
                 f"`tl-degeneracy report {path.parent} --rebuild`.")
    return bases


def chosen_hooks(bases: dict[str, Any], patterns: list[str] | None) -> tuple[str, ...]:
    """The hooks the chosen bases cover that ``--hooks`` names (exact names or glob patterns)."""
    covered = list(dict.fromkeys(h for b in bases.values() for h in b.hooks))
    if patterns is None:
        return tuple(covered)
    unmatched = [p for p in patterns if not fnmatch.filter(covered, p)]
    if unmatched:
        fail(f"--hooks {' '.join(unmatched)}: no basis at {'this hook' if len(unmatched) == 1 else 'these hooks'}. "
             f"The bases of this analysis cover: {', '.join(covered)}.")
    return tuple(h for h in covered if any(fnmatch.fnmatchcase(h, p) for p in patterns))


def read_request(folder: Path) -> dict[str, Any] | None:
    """analysis.json as plain JSON (None when missing or unreadable: only the model's name is read from it)."""
    import json

    try:
        record = json.loads((folder / ANALYSIS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run(args: argparse.Namespace) -> int:
    folder = check_run_dir(args.dir, [])
    files = chosen_bases(folder, args.basis)
    report = load_report(folder)
    bases = load_bases(files)
    hooks = chosen_hooks(bases, args.hooks)
    recorded = str(report.model.get("dtype", "")).removeprefix("torch.")
    dtype = args.dtype or (recorded if recorded in DTYPES else "float32")
    out = args.out if args.out is not None else folder / args.format.replace("-", "_")
    created = check_out_dir(out)
    export = Export(run_dir=folder, out=out, bases=bases, hooks=hooks, dtype=dtype, report=report,
                    request=read_request(folder))
    with interruptible(None, created, nothing="before the export finished; the analysis is untouched"):
        try:
            written = FORMATS[args.format](export)
        except ValueError as exc:
            fail(paragraph(exc))
    print(f"wrote {len(written)} {args.format} folder(s) under {out} ({', '.join(bases)} basis, {len(hooks)} "
          f"hook(s), {dtype})")
    return 0
