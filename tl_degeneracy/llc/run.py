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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..degeneracy_report import LOGITS, WeightMatrix, _unembed_K_eigs, weight_matrices
from ..generations import HookedModel
from ..linalg import psd_eigenvalues
from ..stats import Stats
from .config import LLCConfig, ParamSubset
from .estimate import NeffResult, estimate_neff

LLC_FILE = "llc.json"
WHOLE = "model"
BOUND_NOTE = (
    "Quadratic L_B: N_eff(ε) = Σ h_k/(h_k + γε), a soft count of Hessian directions stiffer than γε, below the "
    "Hessian rank r_H; the K-FAC count #{g·k > γε} is the hard count at the same cut-off (neither bounds the other; "
    "they differ by the directions near γε). As ε → 0 the Hessian rank is a lower bound: r_H ≤ N_eff(0) ≤ N − f_G ≤ N "
    "(higher-order terms add to N_eff what a curvature count misses). Sampled parts include biases, LayerNorm and "
    "embeddings; the K-FAC count covers their weight matrices only ('K-FAC covers'). docs/llc.md §4.")
UNMIXED_NOTE = (
    "A chain starts at θ* where L_B = 0; a direction of curvature h relaxes in about 1/(η(t·h + γ)) steps, so the "
    "directions near the cut-off γε need about 1/(ηγ) steps ('steps to relax'). Where every chain drifted (still "
    "rising), no estimate is given; the mean of the drifted chains is shown as '≥', a lower bound for a quadratic "
    "L_B. More draws (--llc-draws), a larger ε or a larger γ mix in fewer steps.")


@dataclass(frozen=True)
class LLCAnalysisConfig:
    """Options of ``analyze --llc`` (recorded in report.json's ``llc.config``).

    The defaults are chosen for speed, not for mixing: 2 chains × 60 draws after 40 burn-in
    steps on 128 tokens, for the whole model and each layer (five parts for the embedded model:
    about 1.5–3 minutes on a 2-core CPU, most of it the automatic step size's pilot chain and
    curvature estimates). That relaxes the stiff directions only; the soft ones near the cut-off
    γε need about ``1/(ηγ)`` steps (reported; ~10⁵–10⁶ for a whole transformer at ε = 1e-3),
    so expect drifted chains and '≥' lower bounds — raise ``n_draws`` (or ε, γ) for a mixed estimate.
    """

    eps: tuple[float, ...]
    gamma: float = 100.0
    n_chains: int = 2
    n_draws: int = 60
    burn_in: int = 40
    max_tokens: int = 128
    layers: bool = True  # also every layer (ParamSubset(layer=l)) at the middle ε
    seed: int = 0
    step_size: float | None = None  # None: chosen per part and ε (pilot chain + curvature, docs/llc.md §2)

    def __post_init__(self) -> None:
        eps = (self.eps,) if isinstance(self.eps, (int, float)) else tuple(self.eps)
        object.__setattr__(self, "eps", tuple(sorted(float(e) for e in eps)))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.llc_config()  # every other check (eps, gamma, chains, draws, burn-in) is LLCConfig's

    def llc_config(self, eps: Sequence[float] | None = None) -> LLCConfig:
        return LLCConfig(eps=list(self.eps if eps is None else eps), gamma=self.gamma, n_chains=self.n_chains,
                         n_draws=self.n_draws, burn_in=self.burn_in, seed=self.seed,
                         step_size=self.step_size)

    @property
    def layer_eps(self) -> float:
        return self.eps[len(self.eps) // 2]

    def to_dict(self) -> dict[str, Any]:
        return {"eps": list(self.eps), "gamma": self.gamma, "n_chains": self.n_chains, "n_draws": self.n_draws,
                "burn_in": self.burn_in, "max_tokens": self.max_tokens, "layers": self.layers, "seed": self.seed,
                "step_size": self.step_size, "layer_eps": self.layer_eps}


def tl_name(w: WeightMatrix) -> str:
    """The TransformerLens parameter name of a weight matrix of the account (head slice as ``[h]``)."""
    base = ("unembed.W_U" if w.layer is None else
            f"blocks.{w.layer}.{'mlp' if w.name in ('W_in', 'W_out') else 'attn'}.{w.name}")
    return base if w.head is None else f"{base}[{w.head}]"


class KfacSpectra:
    """Per weight matrix of the account: the eigenvalues of ``G`` (input) and ``K`` (output) from
    the analysis' statistics, so that ``count`` gives ``#{g_i·k_j > c}`` at any cut-off ``c``."""

    def __init__(self, model: HookedModel, stats: Stats):
        from ..config import JacobianConfig

        jac = None if stats.run is None or stats.run.jacobians is None else JacobianConfig.from_dict(
            stats.run.jacobians)
        self.loss = "mse" if jac is None else jac.behavioral_loss.name
        self.matrices: list[tuple[WeightMatrix, torch.Tensor, torch.Tensor]] = []
        cache: dict[tuple[str, str, Any], torch.Tensor] = {}

        def eigs(kind: str, hook: str, sl: tuple[int, int] | None) -> torch.Tensor | None:
            key = (kind, hook, sl)
            if key not in cache:
                try:
                    m = stats.gram(hook) if kind == "G" else stats.jacobian_gram(hook)
                except KeyError:
                    return None
                cache[key] = psd_eigenvalues(m if sl is None else m[sl[0]:sl[1], sl[0]:sl[1]])
            return cache[key]

        for w in weight_matrices(model):
            g = eigs("G", w.input_hook, w.in_slice)
            k = _unembed_K_eigs(jac, w.d_out)[0] if w.output_hook == LOGITS else eigs("K", w.output_hook, w.out_slice)
            if g is not None and k is not None:
                self.matrices.append((w, g, k))

    def count(self, cutoff: float, covers: Callable[[WeightMatrix], bool]) -> tuple[int | None, int]:
        """``(#{g·k > cutoff}, nominal)`` summed over the covered matrices (None when none is)."""
        chosen = [(w, g, k) for w, g, k in self.matrices if covers(w)]
        if not chosen:
            return None, 0
        return (sum(int((torch.outer(g, k) > cutoff).sum()) for _, g, k in chosen),
                sum(w.d_in * w.d_out for w, _, _ in chosen))

    def covers_names(self, names: set[str]) -> Callable[[WeightMatrix], bool]:
        """Matrices whose TransformerLens name (or head slice) is among the sampled ``names``."""
        return lambda w: tl_name(w) in names or tl_name(w).split("[")[0] in names


def _part(result: NeffResult, kfac: KfacSpectra, gamma: float) -> dict[str, Any]:
    names = {p["label"] for p in result.parameters}
    covers = kfac.covers_names(names)
    counts, nominal = [], 0
    for e in result.eps:
        c, nominal = kfac.count(gamma * e, covers)
        counts.append(c)
    return {"result": result.to_dict(traces=False), "nominal": result.n_params, "kfac": counts,
            "kfac_nominal": nominal}


def llc_analysis(model: HookedModel, data: Any, out: str | Path, config: LLCAnalysisConfig, *,
                 progress: bool = True) -> dict[str, Any]:
    """Sample ``N_eff(ε)`` for the analysis in ``out`` and write its section (see the module docstring)."""
    from ..analysis import load_analysis

    out = Path(out)
    report, stats = load_analysis(out, model)
    assert stats.run is not None
    context = stats.run.config.get("context")
    start = time.time()
    kfac = KfacSpectra(model, stats)

    tokens = _first_tokens(data, model, config.max_tokens, context)  # read (and tokenised) once for every part

    def sample(eps: Sequence[float], subset: ParamSubset | None) -> NeffResult:
        return estimate_neff(model, tokens, config=config.llc_config(eps), params=subset, max_tokens=config.max_tokens,
                             context=context, progress=progress)

    results: dict[str, NeffResult] = {WHOLE: sample(config.eps, None)}
    if config.layers:
        for layer in range(int(model.cfg.n_layers)):
            results[f"blocks.{layer}"] = sample([config.layer_eps], ParamSubset(layer=layer))
    parts = {name: _part(r, kfac, config.gamma) for name, r in results.items()}
    section = {"config": config.to_dict(), "kfac_loss": kfac.loss, "tokens": config.max_tokens, "context": context,
               "seconds": round(time.time() - start, 1), "traces_file": LLC_FILE, "parts": parts,
               "notes": [BOUND_NOTE, UNMIXED_NOTE]}
    (out / LLC_FILE).write_text(json.dumps({name: r.to_dict(traces=True) for name, r in results.items()}))
    report.llc = section
    report.save(out / "report.json")
    return section


def _first_tokens(data: Any, model: HookedModel, max_tokens: int, context: int | None) -> torch.Tensor:
    """The first whole (unpadded) rows of ``data`` holding ``max_tokens`` tokens (at least one row)."""
    from ..data import iter_batches

    rows: list[torch.Tensor] = []
    seen = 0
    for batch in iter_batches(data, model, 8, context):
        if batch.attention_mask is not None and not bool(batch.attention_mask.all()):
            continue
        for row in batch.tokens:
            if rows and seen + row.numel() > max_tokens:
                return torch.stack(rows)
            rows.append(row)
            seen += row.numel()
    if not rows:
        raise ValueError("the data holds no whole row of tokens to sample the behavioural loss on")
    return torch.stack(rows)


# -- reading the section back -------------------------------------------------------------------

def load_results(out: Path, section: dict[str, Any]) -> dict[str, NeffResult]:
    """The parts' results, with traces from ``llc.json`` when it is there (else from report.json, without)."""
    path = out / section.get("traces_file", LLC_FILE)
    if path.is_file():
        saved = json.loads(path.read_text())
        return {name: NeffResult.from_dict(saved[name]) for name in section["parts"] if name in saved}
    return {name: NeffResult.from_dict(part["result"]) for name, part in section["parts"].items()}


def relax_steps(scale: dict[str, Any], gamma: float) -> float:
    """Steps for a direction at the cut-off γε to relax, ``1/(ηγ)`` (η: the scale's step size)."""
    eta = scale.get("step_size")
    return math.inf if not eta or not math.isfinite(eta) else 1 / (eta * gamma)


def unmixed_lower_bound(scale: dict[str, Any]) -> float | None:
    """Mean of the drifted chains' estimates where no chain was kept (a lower bound, quadratic L_B)."""
    if scale.get("kept"):
        return None
    values = [c["n_eff"] for c in scale["chains"] if c["status"] == "drifted" and c.get("n_eff") is not None]
    return sum(values) / len(values) if values else None


def table_rows(section: dict[str, Any]) -> list[list[object]]:
    """One row per (part, ε): the columns of the report's table."""
    gamma = section["config"]["gamma"]
    rows: list[list[object]] = []
    for name, part in section["parts"].items():
        result = part["result"]
        steps = result["config"]["burn_in"] + result["config"]["n_draws"]
        for scale, k in zip(result["scales"], part["kfac"]):
            n_eff, se = scale["n_eff"], scale["standard_error"]
            if n_eff is not None:
                value = f"{n_eff:,.4g} ± {se:.2g}" if se is not None else f"{n_eff:,.4g}"
            else:
                bound = unmixed_lower_bound(scale)
                value = "–" if bound is None else f"≥ {bound:,.4g} (unmixed)"
            flagged = len(scale["chains"]) - scale["kept"]
            rows.append([name, f"{scale['eps']:g}", value, f"{scale['kept']}/{len(scale['chains'])}",
                         flagged, f"{relax_steps(scale, gamma):,.3g} / {steps}",
                         "–" if k is None else f"{k:,}", f"{part['kfac_nominal']:,}", f"{part['nominal']:,}"])
    return rows


TABLE_HEADER = ["part", "ε", "N_eff ± s.e.", "chains kept", "flagged", "steps to relax / run",
                "K-FAC #{g·k > γε}", "K-FAC covers", "nominal"]


def llc_figures(out: Path, section: dict[str, Any]) -> dict[str, list[Path]]:
    """``llc_curve.png`` (the whole model's curve against nominal and K-FAC), ``llc_layers.png``
    (per-layer bars at the middle ε) and ``llc_traces.png`` (the whole model's loss traces)."""
    from .plots import layer_bars, loss_traces, neff_curve

    results = load_results(out, section)
    figures: dict[str, list[Path]] = {"llc": []}
    whole = results.get(WHOLE)
    if whole is not None:
        figures["llc"].append(neff_curve(whole, out / "plots" / "llc_curve.png", kfac=section["parts"][WHOLE]["kfac"]))
    layers = {name: r for name, r in results.items() if name != WHOLE}
    if layers:
        e = section["config"]["layer_eps"]
        kfac = {name: section["parts"][name]["kfac"][0] for name in layers}
        figures["llc"].append(layer_bars(layers, e, out / "plots" / "llc_layers.png", kfac=kfac))
    if whole is not None and any(c.trace for s in whole.scales for c in s.chains):
        figures["llc"].append(loss_traces(whole, out / "plots" / "llc_traces.png"))
    return figures


def add_analyze_options(p: Any) -> None:
    """``analyze``'s ``--llc`` options (an argument group)."""
    from ..cli import positive_float, positive_int

    g = p.add_argument_group("effective parameter count by SGLD (docs/llc.md)")
    g.add_argument("--llc", type=positive_float, nargs="+", default=None, metavar="EPS",
                   help="also sample N_eff(ε) = 2λ̂(ε) at these loss scales ε, for the whole model and (at the middle "
                        "ε) per layer, beside the K-FAC count at γε (default: off)")
    g.add_argument("--llc-gamma", type=positive_float, default=100.0, metavar="G",
                   help="localisation γ of the SGLD posterior; curvatures below γε count little (default: %(default)s)")
    g.add_argument("--llc-chains", type=positive_int, default=2, metavar="N",
                   help="SGLD chains per loss scale and part (default: %(default)s)")
    g.add_argument("--llc-draws", type=positive_int, default=60, metavar="N",
                   help="recorded SGLD steps per chain after the burn-in; more mix the soft directions "
                        "(default: %(default)s)")
    g.add_argument("--llc-burn-in", type=positive_int, default=40, metavar="N",
                   help="SGLD steps per chain discarded before the draws (default: %(default)s)")
    g.add_argument("--llc-tokens", type=positive_int, default=128, metavar="N",
                   help="tokens of the behavioural loss each SGLD step runs on (default: %(default)s)")
    g.add_argument("--llc-step-size", type=positive_float, default=None, metavar="ETA",
                   help="SGLD step η for every part and ε (default: chosen per part and ε from the curvature at θ* "
                        "and along a pilot chain, which costs about 60 steps and 24 Hessian-vector products)")
    g.add_argument("--llc-no-layers", action="store_true",
                   help="sample the whole model only, not also each layer at the middle ε (default: off)")


def config_from_args(args: Any) -> LLCAnalysisConfig | None:
    """The ``LLCAnalysisConfig`` of ``analyze``'s options (None without ``--llc``); ValueError on bad input."""
    if args.llc is None:
        return None
    return LLCAnalysisConfig(eps=tuple(args.llc), gamma=args.llc_gamma, n_chains=args.llc_chains,
                             n_draws=max(4, args.llc_draws), burn_in=args.llc_burn_in, max_tokens=args.llc_tokens,
                             layers=not args.llc_no_layers, step_size=args.llc_step_size)


def summary_lines(section: dict[str, Any]) -> list[str]:
    cfg = section["config"]
    rows: list[list[object]] = [list(TABLE_HEADER), *table_rows(section)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(TABLE_HEADER))]
    return [f"N_eff(ε) by SGLD ({section['seconds']} s, γ = {cfg['gamma']:g}, {cfg['n_chains']} chains × "
            f"{cfg['n_draws']} draws, {section['tokens']} tokens)"] + [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows]
