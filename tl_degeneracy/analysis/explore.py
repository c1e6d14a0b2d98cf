"""``explore``: direction dashboards for a finished analysis folder (``tl-degeneracy explore DIR``).

One more pass over the analysis's data, forward only and stopped after the last hook, streams the
``DirectionExamples`` of the interaction basis and PCA at every hook the analysis fitted them (the
``n_directions`` most important of each), checkpointed and resumable like the collection; the result is
``examples.safetensors``, then ``explore/index.html`` and a page per hook and basis
(``dashboards.pages``), linked from report.html. With an interaction graph in the folder
(``interactions.safetensors``) each direction also lists its strongest edges and its module.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..basis.bases import InteractionBasis
from ..collection.grams import collect
from ..collection.options import StreamOptions
from ..collection.stats import Stats
from ..dashboards.examples import DirectionExamples
from ..dashboards.facts import DirectionFacts
from ..dashboards.pages import DirectionView, write_pages
from ..dashboards.views import direction_views
from ..generations import HookedModel, describe_model
from ..validation import optional_positive_int, positive_int
from .files import BASIS_FILE, EDGES_FILE, PCA_FILE, REPORT_FILE, STATS_FILE
from .report import AnalysisReport

EXAMPLES_FILE = "examples.safetensors"
EXPLORE_CHECKPOINT_FILE = "explore_checkpoint.safetensors"
EXPLORE_DIR = "explore"
FACTS_FILE = "directions.json"  # in EXPLORE_DIR: every direction's facts (what the pages show beside the examples)
BASES = (("interaction", BASIS_FILE), ("pca", PCA_FILE))


@dataclass(frozen=True)
class ExploreConfig:
    """``max_tokens`` None: as many as the analysis streamed; ``batch_size`` None: the analysis's."""

    max_tokens: int | None = None
    n_directions: int = 32
    n_examples: int = 20
    before: int = 12
    after: int = 4
    batch_size: int | None = None
    shown: int = 10  # contexts per sign on a page before "more"

    def __post_init__(self) -> None:
        optional_positive_int(self.max_tokens, "max_tokens")
        optional_positive_int(self.batch_size, "batch_size")
        for name in ("n_directions", "n_examples", "shown"):
            positive_int(getattr(self, name), name)
        if self.before < 0 or self.after < 0:
            raise ValueError(f"before and after are token counts ≥ 0, got {self.before}, {self.after}")


def _decoder(model: HookedModel):
    tokenizer = getattr(model, "tokenizer", None)
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = tokenizer.decode([token]) if tokenizer is not None else f"<{token}>"
        return cache[token]

    return decode


def explore(model: HookedModel, data: Any, out: str | Path, config: ExploreConfig | None = None, *,
            resume: bool = False, progress: bool = True, checkpoint_every: int = 10,
            checkpoint_seconds: float = 60.0) -> Path:
    """Stream the examples, write ``examples.safetensors`` and the pages; return ``explore/index.html``."""
    config = config or ExploreConfig()
    out = Path(out)
    report = AnalysisReport.load(out / REPORT_FILE)
    stats = Stats.load(out / STATS_FILE, groups=["activations"])  # the covariances give each direction's scale
    if stats.run is None or describe_model(model) != stats.run.model:
        raise ValueError(f"the model differs from the one {out} was analysed with (its identity card: config, "
                         "weights checksum, dtype); pass the same model")
    bases = {name: InteractionBasis.load(out / file) for name, file in BASES if (out / file).is_file()}
    hooks = [h for h in report.spectra if all(h in b.layers for b in bases.values())]
    if not hooks:
        raise ValueError(f"{out} has no hook with fitted bases to explore")
    layers = {name: [b[h] for h in hooks] for name, b in bases.items()}
    observer = DirectionExamples.build(layers, n_directions=config.n_directions, n_examples=config.n_examples,
                                       before=config.before, after=config.after, stats=stats)
    run = stats.run.config
    start = time.time()
    examples = collect(model, data, [], observers=[observer], context=run.get("context"),
                       batch_size=config.batch_size or int(run.get("batch_size") or 8),
                       options=StreamOptions(max_tokens=config.max_tokens or stats.n_tokens,
                                             checkpoint=out / EXPLORE_CHECKPOINT_FILE, resume=resume,
                                             checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                                             progress=progress))
    seconds = time.time() - start
    examples.save(out / EXAMPLES_FILE)
    (out / EXPLORE_CHECKPOINT_FILE).unlink(missing_ok=True)
    index = write_explore_pages(model, out, examples, report, seconds=seconds, shown=config.shown)
    return index


def write_explore_pages(model: HookedModel, out: str | Path, examples: Stats, report: AnalysisReport | None = None,
                        *, seconds: float | None = None, shown: int = 10) -> Path:
    """The pages from a saved ``examples.safetensors`` (``explore`` calls it; so can a user, to redraw)."""
    out = Path(out)
    report = report or AnalysisReport.load(out / REPORT_FILE)
    assert examples.run is not None
    record = next(o for o in examples.run.config["observers"] if o["kind"] == DirectionExamples.kind)
    bases = {name: InteractionBasis.load(out / file).layers for name, file in BASES if (out / file).is_file()}
    graphs = modules = None
    if (out / EDGES_FILE).is_file() and report.interactions is not None:
        from ..interactions.graph import load_graphs

        graphs = load_graphs(out / EDGES_FILE)
        modules = _reference_modules(report)
    views = direction_views(examples, record, bases, _decoder(model), model=model, graphs=graphs, modules=modules)
    timing = "" if seconds is None else f" in {seconds:.1f} s"
    notes = [
        f"{examples.n_tokens:,} tokens streamed{timing}; for each hook the {record_directions(record)} most important "
        "directions of each basis (by Λ for the interaction basis, variance for PCA), side by side.",
        "Contexts: each token's background is the direction's coordinate f̂ there (blue +, red −, scaled to the "
        "direction's largest |f̂| among its examples); the example's own token is outlined; hover for values. Ties "
        "between equal values go to the earlier token.",
        "Histogram: counts of |f̂| / RMS on log-spaced bins from 10⁻⁴ to 10³ (negative values mirrored left), log "
        "heights. Density: the share of tokens with f̂ above +1 RMS or below −1 RMS, where RMS is the coordinate's "
        "root mean square on the analysis's data.",
        "Direct logit effect: the direction's decoder vector through the final normalisation's weight (a "
        "LayerNorm's centring applied, the per-token 1/rms scale dropped: it rescales a token's logits alike) and "
        "the unembedding; the direct path only.",
    ]
    cfg = report.model.get("cfg", {}) if isinstance(report.model, dict) else {}
    facts = {hook: {basis: [v.facts.to_dict() for v in per] for basis, per in by_basis.items()}
             for hook, by_basis in views.items()}
    decode = _decoder(model)
    used = sorted({int(t) for acc in examples.accumulators.values() if "records" in acc.tensors
                   for t in acc.tensors["records"].unique().tolist() if t >= 0})
    (out / EXPLORE_DIR).mkdir(exist_ok=True)
    (out / EXPLORE_DIR / FACTS_FILE).write_text(json.dumps({"facts": facts, "tokens": {t: decode(t) for t in used}}))
    name = str(cfg.get("model_name") or "the model")
    name = Path(name).name if "/" in name else name  # a local folder: its name, not where it lies
    title = f"Directions of {name} — {report.provenance.dataset}"
    folder = out / EXPLORE_DIR
    write_pages(folder, views, {"title": title, "notes": notes, "report": "../report.html"}, n_show=shown)
    return folder / "index.html"


def record_directions(record: dict[str, Any]) -> int:
    return max((len(r["directions"]) for per in record["bases"].values() for r in per.values()), default=0)


def _reference_modules(report: AnalysisReport) -> dict[str, dict[str, list[int]]] | None:
    """Module labels per node and vertex, per basis, at the grid's ε nearest ``DEFAULT_EPS_RTOL`` (the plots'
    reference)."""
    from ..interactions.modules import DEFAULT_EPS_RTOL

    section = report.interactions
    if section is None:
        return None
    chosen: dict[str, dict[str, list[int]]] = {}
    for basis, rows in section.modules.items():
        rows = [r for r in rows if r.modules is not None and r.eps_rtol is not None]
        if rows:
            best = min(rows, key=lambda r: abs(float(r.eps_rtol or 0.0) - DEFAULT_EPS_RTOL))
            assert best.modules is not None
            chosen[basis] = best.modules
    return chosen or None


def load_views(out: str | Path) -> tuple[dict[str, dict[str, list[DirectionView]]], dict[str, Any], Stats]:
    """The explored directions of a folder (``examples.safetensors`` and ``explore/directions.json``) without the
    model: ``(views[hook][basis], the DirectionExamples record, the examples' Stats)``."""
    out = Path(out)
    examples = Stats.load(out / EXAMPLES_FILE)
    assert examples.run is not None
    record = next(o for o in examples.run.config["observers"] if o["kind"] == DirectionExamples.kind)
    bases = {name: InteractionBasis.load(out / file).layers for name, file in BASES if (out / file).is_file()}
    saved = json.loads((out / EXPLORE_DIR / FACTS_FILE).read_text())
    tokens = {int(t): text for t, text in saved["tokens"].items()}
    views = direction_views(examples, record, bases, lambda t: tokens.get(t, f"<{t}>"), model=None)
    decoded: dict[str, dict[str, list[DirectionView]]] = {}
    for hook, per in views.items():
        for basis, items in per.items():
            facts = [DirectionFacts.from_dict(f) for f in saved["facts"][hook][basis]]
            for view, fact in zip(items, facts):
                view.facts = fact
            decoded.setdefault(hook, {})[basis] = items
    return decoded, record, examples
