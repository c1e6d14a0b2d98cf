"""The degeneracy account of a model (docs/theory.md §3, §4): free directions per weight matrix.

For a weight matrix ``W`` (``d_out × d_in``) reading hook ``in`` and writing hook ``out``:
- each (near-)zero eigenvalue of the activation Gram ``G`` at ``in`` gives ``d_out`` free
  directions (exact: ``ΔW f = 0`` for every datapoint);
- each (near-)zero eigenvalue of the Jacobian Gram ``K`` at ``out`` gives ``d_in`` (free to
  first order in the outputs, so a lower bound on the loss's degeneracy only to second order);
- K-FAC (eq. 37): the Gauss–Newton block of ``W`` is ≈ ``G ⊗ K``, with eigenvalues
  ``g_i·k_j``; ``#{(i,j): g_i·k_j > ε}`` estimates that block's Hessian rank, i.e. its
  effective parameter count at loss scale ε.
Synchronized heads and neurons (§3.2) add freedoms these per-matrix counts cannot see.

The weight matrices and their hooks are ``weights.weight_matrices``; the K-FAC count is ``kfac``'s.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..generations import HookedModel, describe_model, trainable_parameter_count
from ..hook_names import LOGITS
from ..linalg import DEFAULT_RTOL, rank
from ..sync.heads import HEAD_SYNC, SynchronizedHeads, synchronized_heads
from ..sync.neurons import NEURON_SYNC, SynchronizedNeurons, synchronized_neurons
from .kfac import KfacSpectra
from .weights import WeightMatrix, weight_matrices

DATA_FACTOR = 4  # fewer datapoints than this many times a Gram's width: its rank is limited by the data


def _data_limited(stats: Any, w: WeightMatrix) -> bool:
    """Whether G (width d_in) or K (width d_out) rests on too few datapoints for its rank to be the model's."""
    def short(hook: str, group: str, width: int) -> bool:
        acc = stats.accumulators.get((group, hook))
        return acc is not None and int(acc.tensors["n"]) < DATA_FACTOR * width

    return short(w.input_hook, "activations", w.d_in) or (
        w.output_hook != LOGITS and short(w.output_hook, "jacobians", w.d_out))

# -- results -----------------------------------------------------------------------------------

@dataclass
class MatrixAccount:
    layer: int | None
    matrix: str
    head: int | None
    input_hook: str
    output_hook: str
    d_in: int
    d_out: int
    nominal: int  # d_in·d_out
    rank_G: int | None = None  # eigenvalues of G above g_threshold
    g_threshold: float | None = None  # absolute: rtol × largest eigenvalue of G
    rank_K: int | None = None
    k_threshold: float | None = None
    free_from_G: int | None = None  # d_out · #{g ≤ g_threshold}
    free_from_K: int | None = None  # d_in · #{k ≤ k_threshold}; lower bound to second order only
    free_combined: int | None = None  # d_in·d_out − rank_G·rank_K (the union, counted once)
    kfac_rank: int | None = None  # #{(i,j): g_i·k_j > eps}; the implied effective parameter count
    eps: float | None = None
    missing: list[str] = field(default_factory=list)
    data_limited: bool | None = None  # G or K rests on fewer than DATA_FACTOR × width datapoints

    @property
    def label(self) -> str:
        where = "unembed" if self.layer is None else f"blocks.{self.layer}"
        return f"{where}.{self.matrix}" + ("" if self.head is None else f"[{self.head}]")


@dataclass
class LayerTotals:
    """One layer's sums over its matrices (``layer`` is the block index, or "unembed")."""

    nominal: int
    free_from_G: int
    free_from_K: int
    free_combined: int
    kfac_rank: int
    matrices_missing_counts: list[str] = field(default_factory=list)
    synchronized_head_freedoms: int | None = None
    synchronized_neuron_freedoms: int | None = None


@dataclass
class Totals:
    """The whole model's account (see ``DegeneracyReport.notes`` for the thresholds)."""

    nominal_weights: int  # Σ d_in·d_out over the covered weight matrices
    nominal_model: int  # distinct trainable parameters of the model, tied weights once
    free_from_G: int
    free_from_K: int
    free_combined: int
    kfac_rank: int
    synchronized_head_freedoms: int
    synchronized_neuron_freedoms: int
    generic_head_freedoms: int  # 2·d_head²·n_kv_heads·n_layers (informational, see below)
    matrices_with_kfac: int
    matrices: int
    effective_parameters: int  # K-FAC rank − synchronisation freedoms


@dataclass
class DegeneracyReport:
    rtol: float
    eps: float | None
    eps_meaning: str
    behavioral_loss: str
    matrices: list[MatrixAccount] = field(default_factory=list)
    # thresholds of the synchronisation results the totals subtract (the results themselves
    # are stored once, by whoever computed them: AnalysisReport.synchronized_heads/neurons)
    head_threshold: float | None = None
    neuron_threshold: float | None = None
    totals: Totals | None = None
    per_layer: dict[str, LayerTotals] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def matrix(self, name: str, layer: int | None = None, head: int | None = None) -> MatrixAccount:
        for m in self.matrices:
            if m.matrix == name and m.layer == layer and m.head == head:
                return m
        raise KeyError(f"no {name} (layer {layer}, head {head}) in the report")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegeneracyReport:
        data = dict(data)
        data["matrices"] = [MatrixAccount(**m) for m in data.get("matrices", [])]
        data["per_layer"] = {k: LayerTotals(**v) for k, v in data.get("per_layer", {}).items()}
        data["totals"] = None if data.get("totals") is None else Totals(**data["totals"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> DegeneracyReport:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A plain-text table: one line per layer, then the totals."""
        t = self.totals
        assert t is not None
        lines = [f"{'layer':>8} {'nominal':>10} {'free(G)':>9} {'free(K)':>9} {'free(G∪K)':>10} {'K-FAC rank':>11}"]
        for layer, row in self.per_layer.items():
            lines.append(f"{layer:>8} {row.nominal:>10} {row.free_from_G:>9} {row.free_from_K:>9} "
                         f"{row.free_combined:>10} {row.kfac_rank:>11}")
        heads = "" if self.head_threshold is None else f" (TV ≤ {self.head_threshold:g})"
        neurons = "" if self.neuron_threshold is None else f" (cost ≤ {self.neuron_threshold:g})"
        lines.append(f"total: {t.nominal_weights} weight parameters ({t.nominal_model} in the model), "
                     f"K-FAC effective count {t.kfac_rank} at eps={self.eps:.3g}, "
                     f"synchronized heads{heads} {_minus(t.synchronized_head_freedoms)}, "
                     f"neurons{neurons} {_minus(t.synchronized_neuron_freedoms)} → {t.effective_parameters}")
        return "\n".join(lines)


# -- computing ---------------------------------------------------------------------------------

def degeneracy_report(
    model: HookedModel,
    stats: Any,
    eps: float | None = None,
    rtol: float = DEFAULT_RTOL,
    *,
    heads: SynchronizedHeads | None = None,
    neurons: SynchronizedNeurons | None = None,
    head_threshold: float = 0.05,
    neuron_threshold: float = 1e-3,
    layers: Iterable[int] | None = None,
) -> DegeneracyReport:
    """Count nominal parameters, free directions and the K-FAC effective count per weight matrix.

    Args:
        model: the model ``stats`` was collected on (shapes and ``W_V`` ranks).
        stats: from ``collect(model, data, input_hooks(model), jacobians=True,
            jacobian_hooks=output_hooks(model), observers=[HeadSync(), NeuronSync()])``; whatever is
            missing is reported, not guessed.
        eps: absolute loss scale for the K-FAC count ``#{g_i·k_j > eps}``. Default: ``rtol``
            × the largest ``g_i·k_j`` over all weight matrices.
        rtol: eigenvalues of ``G`` and ``K`` at most ``rtol`` × that matrix's largest count
            as zero (the package convention, ``linalg``).
        heads, neurons: synchronisation results already computed (``synchronized_heads`` /
            ``synchronized_neurons``); when absent they are computed here from ``stats`` at
            ``head_threshold`` / ``neuron_threshold``. Either way they are not copied into the report.
        layers: only the weight matrices of these blocks (and ``W_U`` with the last); None: all.

    A matrix whose ``G`` or ``K`` rests on fewer datapoints than ``DATA_FACTOR`` times its width is
    marked ``data_limited``: its ranks (and free directions) may be the data's, not the model's.
    """
    chosen = None if layers is None else sorted({int(l) for l in layers})
    matrices = None if chosen is None else [w for w in weight_matrices(model, chosen)
                                            if w.layer is not None or int(model.cfg.n_layers) - 1 in chosen]
    spectra = KfacSpectra(model, stats, matrices)
    loss = spectra.loss.name
    report = DegeneracyReport(rtol=float(rtol), eps=None, eps_meaning="", behavioral_loss=loss)
    collected_on = None if stats.run is None else stats.run.model.get("weights_sha256")
    if collected_on is not None and collected_on != describe_model(model)["weights_sha256"]:
        report.notes.append("warning: the statistics were collected on a model with different weights "
                            "(checksum mismatch); counts below mix the two")
    # K-FAC count at one loss scale for the whole model.
    if eps is None:
        eps = rtol * spectra.largest_product()
        report.eps_meaning = (f"relative: rtol={rtol:g} × the largest g_i·k_j over all weight matrices "
                              f"(K-FAC Hessian eigenvalues at or below it count as zero)")
    else:
        report.eps_meaning = ("absolute curvature scale passed by the user (K-FAC Hessian eigenvalues g_i·k_j at "
                              "or below it count as zero)")
    report.eps = float(eps)
    for entry in spectra.matrices:
        w, g, k = entry.weight, entry.g, entry.k
        acc = MatrixAccount(w.layer, w.name, w.head, w.input_hook, w.output_hook, w.d_in, w.d_out,
                            nominal=w.d_in * w.d_out, missing=list(entry.missing))
        if g is not None:
            acc.rank_G, cut = rank(g, rtol)
            acc.g_threshold = cut.absolute
            acc.free_from_G = w.d_out * (w.d_in - acc.rank_G)
        if k is not None:
            acc.rank_K, cut = rank(k, rtol)
            acc.k_threshold = cut.absolute
            acc.free_from_K = w.d_in * (w.d_out - acc.rank_K)
        acc.data_limited = _data_limited(stats, w) if (g is not None or k is not None) else None
        if acc.rank_G is not None and acc.rank_K is not None:
            acc.free_combined = acc.nominal - acc.rank_G * acc.rank_K
            acc.eps = report.eps
            acc.kfac_rank = entry.count(report.eps)
        report.matrices.append(acc)
        report.missing += [f"{acc.label}: {m}" for m in acc.missing]

    groups = {group for group, _ in stats.accumulators}
    if heads is None and HEAD_SYNC in groups:
        heads = synchronized_heads(stats, head_threshold, model)
    if neurons is None and NEURON_SYNC in groups:
        neurons = synchronized_neurons(stats, threshold=neuron_threshold, model=model)
    if heads is None:
        report.missing.append("synchronized heads: not collected (collect with observers=[HeadSync()])")
    if neurons is None and not getattr(model.cfg, "attn_only", False):
        report.missing.append("synchronized neurons: not collected (collect with observers=[NeuronSync()])")
    report.head_threshold = None if heads is None else heads.threshold
    report.neuron_threshold = None if neurons is None else neurons.threshold
    _add_totals(report, model, heads, neurons)
    limited = [m.label for m in report.matrices if m.data_limited]
    if limited:
        report.notes.append(f"warning: {len(limited)} matrices have G or K from fewer than {DATA_FACTOR}× as many "
                            f"datapoints as their width (marked data_limited, e.g. {', '.join(limited[:3])}): their "
                            "ranks and free directions may be the data's, not the model's; collect more tokens.")
    report.notes += [
        f"G and K eigenvalues at or below rtol={rtol:g} × their matrix's largest count as zero; "
        "each matrix records the absolute threshold used (g_threshold, k_threshold).",
        "free_from_K is a lower bound on free directions only to second order in the loss.",
        "free_combined = d_in·d_out − rank_G·rank_K counts the union of G and K free directions once; "
        "kfac_rank is d_in·d_out minus the directions the K-FAC Hessian puts at or below eps.",
        "W_Q/W_K/W_V/W_O are counted per head (head slices of K resp. G); biases, embeddings and LayerNorm "
        "weights are not counted.",
    ]
    if loss == "kl":
        report.notes.append("behavioral loss 'kl': K at the logits is taken as one zero eigenvalue (logit shift) "
                            "and d_vocab − 1 unit eigenvalues.")
    else:
        report.notes.append("W_U: K is the output Hessian of the MSE behavioral loss, the identity.")
    return report


def _sum(values: list[int | None]) -> int:
    return sum(v for v in values if v is not None)


def _add_totals(report: DegeneracyReport, model: HookedModel, heads: SynchronizedHeads | None,
                neurons: SynchronizedNeurons | None) -> None:
    head_free = {} if heads is None else dict(heads.freedoms_per_layer)
    neuron_free = {} if neurons is None else {l: s.added_freedoms for l, s in neurons.layers.items()}
    keys = ("nominal", "free_from_G", "free_from_K", "free_combined", "kfac_rank")
    by_layer: dict[str, list[MatrixAccount]] = {}
    for m in report.matrices:
        by_layer.setdefault("unembed" if m.layer is None else str(m.layer), []).append(m)
    for layer, mats in by_layer.items():
        row = LayerTotals(**{k: _sum([getattr(m, k) for m in mats]) for k in keys},
                          matrices_missing_counts=[m.label for m in mats if m.missing])
        if layer != "unembed":
            row.synchronized_head_freedoms = head_free.get(int(layer))
            row.synchronized_neuron_freedoms = neuron_free.get(int(layer))
        report.per_layer[layer] = row
    sums = {k: _sum([getattr(m, k) for m in report.matrices]) for k in keys}
    cfg = model.cfg
    head_total, neuron_total = sum(head_free.values()), sum(neuron_free.values())
    report.totals = Totals(
        nominal_weights=sums["nominal"], nominal_model=trainable_parameter_count(model),
        free_from_G=sums["free_from_G"], free_from_K=sums["free_from_K"], free_combined=sums["free_combined"],
        kfac_rank=sums["kfac_rank"], synchronized_head_freedoms=head_total, synchronized_neuron_freedoms=neuron_total,
        # The paper's generic d_head² per head for each of the W_QK and W_OV factorisations
        # (GL(d_head) acting on both factors and their biases); with grouped-query attention one GL(d_head)
        # per key/value head (it must act on every query head of the group alike). Informational: these
        # directions move biases too, which the nominal (weights-only) count leaves out, so they are not
        # subtracted below; with biases held fixed d_head² − d_head of each remain (docs/kfac_vs_exact.md).
        generic_head_freedoms=2 * int(cfg.d_head) ** 2 * int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
        * int(cfg.n_layers),
        matrices_with_kfac=sum(m.kfac_rank is not None for m in report.matrices), matrices=len(report.matrices),
        # N_eff estimate: K-FAC rank of the covered matrices minus the synchronisation freedoms
        # (which the per-matrix counts cannot see).
        effective_parameters=max(0, sums["kfac_rank"] - head_total - neuron_total),
    )


def _minus(n: int) -> str:
    """A subtracted count as printed: "−3", and "none" rather than "−0"."""
    return f"−{n}" if n else "none"
