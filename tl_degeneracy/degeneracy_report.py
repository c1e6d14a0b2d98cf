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

Weight matrices and hooks (``ln*`` hooks become ``hook_resid_*`` without LayerNorm):
``W_Q/W_K/W_V[h]``: ``ln1.hook_normalized → attn.hook_q/k/v`` (head ``h``'s slice of ``K``);
``W_O[h]``: ``attn.hook_z`` (head ``h``'s slice of ``G``) ``→ hook_attn_out``;
``W_in``: ``ln2.hook_normalized → mlp.hook_pre``; ``W_out``: ``mlp.hook_post → hook_mlp_out``;
``W_U``: ``ln_final.hook_normalized → logits``, where ``K`` is the output Hessian of the
behavioral loss (identity for MSE). Biases, embeddings and LayerNorm weights are not counted.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import JacobianConfig
from .generations import HookedModel, describe_model
from .head_sync import HEAD_SYNC, SynchronizedHeads, synchronized_heads
from .hook_names import act_name
from .linalg import DEFAULT_RTOL, psd_eigenvalues, rank
from .losses import MSE
from .neuron_sync import NEURON_SYNC, SynchronizedNeurons, synchronized_neurons

LOGITS = "logits"


@dataclass
class WeightMatrix:
    """One weight matrix's slot in the account (the hooks it is read from)."""

    layer: int | None  # None for W_U
    name: str  # "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U"
    head: int | None
    input_hook: str
    output_hook: str
    d_in: int
    d_out: int
    in_slice: tuple[int, int] | None = None  # head slice of the input Gram (W_O)
    out_slice: tuple[int, int] | None = None  # head slice of the output Gram (W_Q/K/V)


def _uses_ln(model: HookedModel) -> bool:
    return getattr(model.cfg, "normalization_type", None) is not None


def weight_matrices(model: HookedModel) -> list[WeightMatrix]:
    """Every weight matrix the account covers, with its input and output hook."""
    cfg = model.cfg
    L, d, H, dh = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
    V = int(getattr(cfg, "d_vocab_out", -1) or -1)
    V = V if V > 0 else int(cfg.d_vocab)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or H)  # grouped-query attention: fewer K/V heads
    ln = _uses_ln(model)
    out: list[WeightMatrix] = []
    for l in range(L):
        attn_in = act_name("normalized", l, "ln1") if ln else act_name("resid_pre", l)
        for m in "qkv":
            for h in range(H if m == "q" else n_kv):
                out.append(WeightMatrix(l, f"W_{m.upper()}", h, attn_in, act_name(m, l), d, dh,
                                        out_slice=(h * dh, (h + 1) * dh)))
        for h in range(H):
            out.append(WeightMatrix(l, "W_O", h, act_name("z", l), act_name("attn_out", l), dh, d,
                                    in_slice=(h * dh, (h + 1) * dh)))
        if not getattr(cfg, "attn_only", False):
            d_mlp = int(cfg.d_mlp)
            mlp_in = act_name("normalized", l, "ln2") if ln else act_name("resid_mid", l)
            out.append(WeightMatrix(l, "W_in", None, mlp_in, act_name("pre", l), d, d_mlp))
            out.append(WeightMatrix(l, "W_out", None, act_name("post", l), act_name("mlp_out", l), d_mlp, d))
    unembed_in = act_name("normalized") if ln else act_name("resid_post", L - 1)
    out.append(WeightMatrix(None, "W_U", None, unembed_in, LOGITS, d, V))
    return out


def degeneracy_hooks(model: HookedModel) -> list[str]:
    """The hook points to collect for a full account:
    ``collect(model, data, degeneracy_hooks(model), jacobians=True, observers=[HeadSync(), NeuronSync()])``."""
    names: list[str] = []
    for w in weight_matrices(model):
        names += [w.input_hook] + ([w.output_hook] if w.output_hook != LOGITS else [])
    return list(dict.fromkeys(names))


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
    nominal_model: int  # every parameter of the model
    free_from_G: int
    free_from_K: int
    free_combined: int
    kfac_rank: int
    synchronized_head_freedoms: int
    synchronized_neuron_freedoms: int
    generic_head_freedoms: int  # 2·d_head²·n_heads·n_layers (informational, see below)
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
                     f"synchronized heads{heads} −{t.synchronized_head_freedoms}, "
                     f"neurons{neurons} −{t.synchronized_neuron_freedoms} → {t.effective_parameters}")
        return "\n".join(lines)


# -- computing ---------------------------------------------------------------------------------

def _unembed_K_eigs(jac: JacobianConfig | None, d_vocab: int) -> tuple[Tensor | None, str | None]:
    """Eigenvalues of ``K`` at the logits: the output Hessian of the behavioral loss."""
    if jac is None:
        return None, "no Jacobians were collected: no K for W_U"
    if jac.output != LOGITS:
        return None, f"Jacobians were taken to {jac.output!r}, not the logits: no K for W_U"
    return jac.behavioral_loss.logit_hessian_eigenvalues(d_vocab), None


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
) -> DegeneracyReport:
    """Count nominal parameters, free directions and the K-FAC effective count per weight matrix.

    Args:
        model: the model ``stats`` was collected on (shapes and ``W_V`` ranks).
        stats: from ``collect(model, data, degeneracy_hooks(model), jacobians=True,
            observers=[HeadSync(), NeuronSync()])``; whatever is missing is reported, not guessed.
        eps: absolute loss scale for the K-FAC count ``#{g_i·k_j > eps}``. Default: ``rtol``
            × the largest ``g_i·k_j`` over all weight matrices.
        rtol: eigenvalues of ``G`` and ``K`` at most ``rtol`` × that matrix's largest count
            as zero (the package convention, ``linalg``).
        heads, neurons: synchronisation results already computed (``synchronized_heads`` /
            ``synchronized_neurons``); when absent they are computed here from ``stats`` at
            ``head_threshold`` / ``neuron_threshold``. Either way they are not copied into the report.
    """
    jac = None if stats.run is None or stats.run.jacobians is None else JacobianConfig.from_dict(stats.run.jacobians)
    loss = (jac.behavioral_loss if jac is not None else MSE()).name
    report = DegeneracyReport(rtol=float(rtol), eps=None, eps_meaning="", behavioral_loss=loss)
    collected_on = None if stats.run is None else stats.run.model.get("weights_sha256")
    if collected_on is not None and collected_on != describe_model(model)["weights_sha256"]:
        report.notes.append("warning: the statistics were collected on a model with different weights "
                            "(checksum mismatch); counts below mix the two")
    eig_cache: dict[tuple[str, str, tuple | None], Tensor] = {}

    def eigs(kind: str, hook: str, sl: tuple[int, int] | None) -> Tensor | None:
        key = (kind, hook, sl)
        if key not in eig_cache:
            try:
                matrix = stats.gram(hook) if kind == "G" else stats.jacobian_gram(hook)
            except KeyError:
                return None
            eig_cache[key] = psd_eigenvalues(matrix if sl is None else matrix[sl[0]:sl[1], sl[0]:sl[1]])
        return eig_cache[key]

    pending: list[tuple[MatrixAccount, Tensor | None, Tensor | None]] = []
    for w in weight_matrices(model):
        acc = MatrixAccount(w.layer, w.name, w.head, w.input_hook, w.output_hook, w.d_in, w.d_out,
                            nominal=w.d_in * w.d_out)
        g = eigs("G", w.input_hook, w.in_slice)
        if g is None:
            acc.missing.append(f"no activation Gram at {w.input_hook} (add it to collect's hooks)")
        else:
            acc.rank_G, cut = rank(g, rtol)
            acc.g_threshold = cut.absolute
            acc.free_from_G = w.d_out * (w.d_in - acc.rank_G)
        if w.output_hook == LOGITS:
            k, why = _unembed_K_eigs(jac, w.d_out)
            if why:
                acc.missing.append(why)
        else:
            k = eigs("K", w.output_hook, w.out_slice)
            if k is None:
                acc.missing.append(f"no Jacobian Gram at {w.output_hook} (collect it with jacobians=True)")
        if k is not None:
            acc.rank_K, cut = rank(k, rtol)
            acc.k_threshold = cut.absolute
            acc.free_from_K = w.d_in * (w.d_out - acc.rank_K)
        if acc.rank_G is not None and acc.rank_K is not None:
            acc.free_combined = acc.nominal - acc.rank_G * acc.rank_K
        pending.append((acc, g, k))

    # K-FAC count at one loss scale for the whole model.
    products = [float(g.max()) * float(k.max()) for _, g, k in pending if g is not None and k is not None
                and g.numel() and k.numel()]
    if eps is None:
        eps = rtol * max(products, default=0.0)
        report.eps_meaning = (f"relative: rtol={rtol:g} × the largest g_i·k_j over all weight matrices "
                              f"(K-FAC Hessian eigenvalues at or below it count as zero)")
    else:
        report.eps_meaning = ("absolute curvature scale passed by the user (K-FAC Hessian eigenvalues g_i·k_j at "
                              "or below it count as zero)")
    report.eps = float(eps)
    for acc, g, k in pending:
        if g is not None and k is not None:
            acc.eps = report.eps
            acc.kfac_rank = int((torch.outer(g, k) > eps).sum())
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
        nominal_weights=sums["nominal"], nominal_model=sum(p.numel() for p in model.parameters()),
        free_from_G=sums["free_from_G"], free_from_K=sums["free_from_K"], free_combined=sums["free_combined"],
        kfac_rank=sums["kfac_rank"], synchronized_head_freedoms=head_total, synchronized_neuron_freedoms=neuron_total,
        # The paper's generic d_head² per head for each of the W_QK and W_OV factorisations
        # (GL(d_head) acting on both factors and their biases). Informational: these directions
        # move biases too, which the nominal (weights-only) count leaves out, so they are not
        # subtracted below; with biases held fixed d_head² − d_head of each remain (docs/kfac_vs_exact.md).
        generic_head_freedoms=2 * int(cfg.d_head) ** 2 * int(cfg.n_heads) * int(cfg.n_layers),
        matrices_with_kfac=sum(m.kfac_rank is not None for m in report.matrices), matrices=len(report.matrices),
        # N_eff estimate: K-FAC rank of the covered matrices minus the synchronisation freedoms
        # (which the per-matrix counts cannot see).
        effective_parameters=max(0, sums["kfac_rank"] - head_total - neuron_total),
    )
