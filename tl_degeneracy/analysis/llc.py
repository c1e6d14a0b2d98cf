"""``N_eff(ε)`` of a finished analysis folder: the ``llc`` section of report.json and its plots.

``llc_analysis(model, data, out, LLCAnalysisConfig(eps=[...]))`` reads ``stats.safetensors``
and ``report.json`` that ``analyze`` wrote to ``out``, samples ``N_eff(ε)`` of the whole model at
every ε and, per layer (``ParamSubset(layer=l)``), at the middle ε, computes the K-FAC counts
``#{g_i·k_j > γε}`` of the weight matrices each part covers from the analysis' own G and K, and
writes the ``llc`` section of ``report.json`` (``NeffResult.to_dict(traces=False)`` per part) and
``llc.json`` (the same results with their loss traces); ``llc_figures`` draws them for
``render``. ``tl-degeneracy analyze --llc EPS ...`` calls it (docs/llc.md §3).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import whole_rows
from ..degeneracy.kfac import KfacSpectra, covering
from ..generations import HookedModel
from ..llc.config import ParamSubset, Preconditioning
from ..llc.estimate import EveryChainDiverged, NeffResult, ScaleEstimate, estimate_neff
from .files import LLC_FILE, PLOTS_DIR, REPORT_FILE, load_analysis
from .sections import LLCAnalysisConfig, LLCPart, LLCSection

WHOLE = "model"
BOUND_NOTE = (
    "Quadratic L_B: N_eff(ε) = Σ h_k/(h_k + γε), a soft count of Hessian directions stiffer than γε, below the "
    "Hessian rank r_H; the K-FAC count #{g·k > γε} is the hard count at the same cut-off (neither bounds the other; "
    "they differ by the directions near γε). As ε → 0 the Hessian rank is a lower bound: r_H ≤ N_eff(0) ≤ N − f_G ≤ N "
    "(higher-order terms add to N_eff what a curvature count misses). Sampled parts include biases, LayerNorm and "
    "embeddings; the K-FAC count covers their weight matrices only ('K-FAC covers'). docs/llc.md §4.")
UNMIXED_NOTE = (
    "A chain starts at θ* where L_B = 0 and rises. Under the preconditioner P a direction of zero curvature relaxes "
    "in about 1/(ηγ·λ_max(P)) steps ('steps to relax'; 1/(ηγ) for plain SGLD), and directions whose curvature P "
    "overestimates take longer still. Where every chain drifted (still rising), or the burn-in is shorter than the "
    "steps to relax, the mean of the chains is shown as '≥', a lower bound for a quadratic L_B. More steps "
    "(--llc-burn-in, --llc-draws), a larger ε or a larger γ relax it.")


def _part(result: NeffResult, kfac: KfacSpectra, gamma: float) -> LLCPart:
    covers = covering(p["label"] for p in result.parameters)
    counts, nominal = [], 0
    for e in result.eps:
        c, nominal = kfac.count(gamma * e, covers)
        counts.append(c)
    return LLCPart(result, result.n_params, counts, nominal)


def llc_analysis(model: HookedModel, data: Any, out: str | Path, config: LLCAnalysisConfig, *,
                 progress: bool = True) -> LLCSection:
    """Sample ``N_eff(ε)`` for the analysis in ``out`` and write its section (see the module docstring)."""
    out = Path(out)
    report, stats = load_analysis(out, model)
    assert stats.run is not None
    context = stats.run.config.get("context")
    start = time.time()
    kfac = KfacSpectra(model, stats)

    # read (and tokenised) once for every part
    tokens = whole_rows(data, model, config.max_tokens, context, at_most=True)
    if tokens is None:
        raise ValueError("the data holds no whole row of tokens to sample the behavioural loss on")

    # plain K-FAC reads the analysis' own G and K; EK-FAC collects its own on the sampling tokens (it needs K
    # at hook_z, which the account does not collect)
    own = stats if config.preconditioner == Preconditioning.KFAC.value else None

    def sample(eps: Sequence[float], subset: ParamSubset | None) -> NeffResult:
        try:
            return estimate_neff(model, tokens, config=config.llc_config(eps), params=subset, context=context,
                                 max_tokens=config.max_tokens, progress=progress, statistics=own)
        except EveryChainDiverged as exc:  # reported as such (no estimate), not an error of the analysis
            return exc.result

    results: dict[str, NeffResult] = {WHOLE: sample(config.eps, None)}
    if config.layers:
        for layer in range(int(model.cfg.n_layers)):
            results[f"blocks.{layer}"] = sample([config.layer_eps], ParamSubset(layer=layer))
    parts = {name: _part(r, kfac, config.gamma) for name, r in results.items()}
    section = LLCSection(config=config, kfac_loss=kfac.loss.name, tokens=config.max_tokens, context=context,
                         seconds=round(time.time() - start, 1), traces_file=LLC_FILE, parts=parts,
                         notes=[BOUND_NOTE, UNMIXED_NOTE])
    (out / LLC_FILE).write_text(json.dumps({name: r.to_dict(traces=True) for name, r in results.items()}))
    report.llc = section
    report.save(out / REPORT_FILE)
    return section


# -- reading the section back -------------------------------------------------------------------

def load_results(out: Path, section: LLCSection) -> dict[str, NeffResult]:
    """The parts' results, with traces from ``llc.json`` when it is there (else from report.json, without)."""
    path = out / section.traces_file
    if path.is_file():
        saved = json.loads(path.read_text())
        return {name: NeffResult.from_dict(saved[name]) for name in section.parts if name in saved}
    return {name: part.result for name, part in section.parts.items()}


def relax_steps(scale: ScaleEstimate, gamma: float) -> float:
    """Steps for a direction of zero curvature to relax: ``1/(ηγ·λ_max(P))`` as the sampler recorded it, or
    ``1/(ηγ)`` for a result written before preconditioners (η: the scale's step size)."""
    if scale.relax_steps is not None:
        return scale.relax_steps
    eta = scale.step_size
    return math.inf if not eta or not math.isfinite(eta) else 1 / (eta * gamma)


def relaxed(scale: ScaleEstimate, burn_in: int, gamma: float) -> bool:
    """Chains kept and a burn-in at least the relaxation time (``relax_steps``)."""
    return scale.kept > 0 and burn_in >= relax_steps(scale, gamma)


def unmixed_lower_bound(scale: ScaleEstimate, burn_in: int | None = None, gamma: float | None = None
                        ) -> float | None:
    """Mean of the chains' estimates where none was kept (drifted) or, given ``burn_in`` and ``gamma``, the
    burn-in is shorter than the relaxation time: a lower bound for a quadratic L_B."""
    if scale.kept and (burn_in is None or gamma is None or relaxed(scale, burn_in, gamma)):
        return None
    status = "ok" if scale.kept else "drifted"
    values = [c.n_eff for c in scale.chains if c.status == status and math.isfinite(c.n_eff)]
    return sum(values) / len(values) if values else None


def table_rows(section: LLCSection) -> list[list[object]]:
    """One row per (part, ε): the columns of the report's table."""
    gamma = section.config.gamma
    rows: list[list[object]] = []
    for name, part in section.parts.items():
        result = part.result
        burn_in = int(result.config["burn_in"])
        steps = burn_in + result.config["n_draws"]
        for scale, k in zip(result.scales, part.kfac):
            n_eff, se = scale.n_eff, scale.standard_error
            bound = unmixed_lower_bound(scale, burn_in, gamma)
            if bound is not None:
                value = f"≥ {bound:,.4g} (unmixed)"
            elif math.isfinite(n_eff):
                value = f"{n_eff:,.4g} ± {se:.2g}" if math.isfinite(se) else f"{n_eff:,.4g}"
            else:
                value = "–"
            flagged = len(scale.chains) - scale.kept
            rows.append([name, f"{scale.eps:g}", value, f"{scale.kept}/{len(scale.chains)}",
                         flagged, f"{relax_steps(scale, gamma):,.3g} / {burn_in} + {steps - burn_in}",
                         "–" if k is None else f"{k:,}", f"{part.kfac_nominal:,}", f"{part.nominal:,}"])
    return rows


TABLE_HEADER = ["part", "ε", "N_eff ± s.e.", "chains kept", "flagged", "steps to relax / burn-in + draws",
                "K-FAC #{g·k > γε}", "K-FAC covers", "nominal"]


def llc_figures(out: Path, section: LLCSection) -> dict[str, list[Path]]:
    """``llc_curve.png`` (the whole model's curve against nominal and K-FAC), ``llc_layers.png``
    (per-layer bars at the middle ε) and ``llc_traces.png`` (the whole model's loss traces)."""
    from ..llc.plots import layer_bars, loss_traces, neff_curve

    results = load_results(out, section)
    folder = out / PLOTS_DIR
    figures: dict[str, list[Path]] = {"llc": []}
    whole = results.get(WHOLE)
    if whole is not None:
        figures["llc"].append(neff_curve(whole, folder / "llc_curve.png", kfac=section.parts[WHOLE].kfac))
    layers = {name: r for name, r in results.items() if name != WHOLE}
    if layers:
        kfac = {name: section.parts[name].kfac[0] for name in layers}
        figures["llc"].append(layer_bars(layers, section.config.layer_eps, folder / "llc_layers.png", kfac=kfac))
    if whole is not None and any(c.trace for s in whole.scales for c in s.chains):
        figures["llc"].append(loss_traces(whole, folder / "llc_traces.png"))
    return figures


def summary_lines(section: LLCSection) -> list[str]:
    cfg = section.config
    rows: list[list[object]] = [list(TABLE_HEADER), *table_rows(section)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(TABLE_HEADER))]
    return [f"N_eff(ε) by SGLD ({section.seconds} s, γ = {cfg.gamma:g}, {cfg.n_chains} chains × "
            f"{cfg.n_draws} draws after {cfg.burn_in} burn-in steps, {section.tokens} tokens, preconditioner "
            f"{cfg.preconditioner})"] + [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows]
