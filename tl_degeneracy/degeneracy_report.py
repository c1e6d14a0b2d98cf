"""The degeneracy account of a model (MATH.md §3, §4): free directions per weight matrix.

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
from jaxtyping import Float
from torch import Tensor

from .generations import describe_model
from .head_sync import HEAD_SYNC, synchronized_heads
from .neuron_sync import NEURON_SYNC, synchronized_neurons

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


def _uses_ln(model: torch.nn.Module) -> bool:
    return getattr(model.cfg, "normalization_type", None) is not None


def weight_matrices(model: torch.nn.Module) -> list[WeightMatrix]:
    """Every weight matrix the account covers, with its input and output hook."""
    cfg = model.cfg
    L, d, H, dh = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
    V = int(getattr(cfg, "d_vocab_out", -1) or -1)
    V = V if V > 0 else int(cfg.d_vocab)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or H)  # grouped-query attention: fewer K/V heads
    ln = _uses_ln(model)
    out: list[WeightMatrix] = []
    for l in range(L):
        b = f"blocks.{l}"
        attn_in = f"{b}.ln1.hook_normalized" if ln else f"{b}.hook_resid_pre"
        for m in "QKV":
            for h in range(H if m == "Q" else n_kv):
                out.append(WeightMatrix(l, f"W_{m}", h, attn_in, f"{b}.attn.hook_{m.lower()}", d, dh,
                                        out_slice=(h * dh, (h + 1) * dh)))
        for h in range(H):
            out.append(WeightMatrix(l, "W_O", h, f"{b}.attn.hook_z", f"{b}.hook_attn_out", dh, d,
                                    in_slice=(h * dh, (h + 1) * dh)))
        if not getattr(cfg, "attn_only", False):
            d_mlp = int(cfg.d_mlp)
            mlp_in = f"{b}.ln2.hook_normalized" if ln else f"{b}.hook_resid_mid"
            out.append(WeightMatrix(l, "W_in", None, mlp_in, f"{b}.mlp.hook_pre", d, d_mlp))
            out.append(WeightMatrix(l, "W_out", None, f"{b}.mlp.hook_post", f"{b}.hook_mlp_out", d_mlp, d))
    unembed_in = "ln_final.hook_normalized" if ln else f"blocks.{L - 1}.hook_resid_post"
    out.append(WeightMatrix(None, "W_U", None, unembed_in, LOGITS, d, V))
    return out


def degeneracy_hooks(model: torch.nn.Module) -> list[str]:
    """The hook points to collect for a full account:
    ``collect(model, data, degeneracy_hooks(model), jacobians=True, head_sync=True, neuron_sync=True)``."""
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
class DegeneracyReport:
    rtol: float
    eps: float | None
    eps_meaning: str
    behavioral_loss: str
    matrices: list[MatrixAccount] = field(default_factory=list)
    synchronized_heads: dict[str, Any] | None = None
    synchronized_neurons: dict[str, Any] | None = None
    totals: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
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
    def from_dict(cls, data: dict[str, Any]) -> "DegeneracyReport":
        data = dict(data)
        data["matrices"] = [MatrixAccount(**m) for m in data.get("matrices", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "DegeneracyReport":
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A plain-text table: one line per layer, then the totals."""
        t = self.totals
        lines = [f"{'layer':>8} {'nominal':>10} {'free(G)':>9} {'free(K)':>9} {'free(G∪K)':>10} {'K-FAC rank':>11}"]
        for layer, row in self.per_layer.items():
            lines.append(f"{layer:>8} {row['nominal']:>10} {row['free_from_G']:>9} {row['free_from_K']:>9} "
                         f"{row['free_combined']:>10} {row['kfac_rank']:>11}")
        lines.append(f"total: {t['nominal_weights']} weight parameters ({t['nominal_model']} in the model), "
                     f"K-FAC effective count {t['kfac_rank']} at eps={self.eps:.3g}, "
                     f"synchronized heads −{t['synchronized_head_freedoms']}, neurons −{t['synchronized_neuron_freedoms']} "
                     f"→ {t['effective_parameters']}")
        return "\n".join(lines)


# -- computing ---------------------------------------------------------------------------------

def _eigvals(matrix: Float[Tensor, "d d"]) -> Float[Tensor, " d"]:
    m = matrix.to(torch.float64)
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0.0)  # PSD up to rounding


def _threshold(eig: Tensor, rtol: float) -> float:
    return rtol * float(eig.max()) if eig.numel() else 0.0


def _rank(eig: Tensor, threshold: float) -> int:
    return int((eig > threshold).sum())


def _jacobian_settings(stats: Any) -> dict[str, Any]:
    return stats.meta.get("jacobians") or {}


def _unembed_K_eigs(stats: Any, d_vocab: int) -> tuple[Tensor | None, str | None]:
    """Eigenvalues of ``K`` at the logits: the output Hessian of the behavioral loss."""
    settings = _jacobian_settings(stats)
    output = settings.get("output", LOGITS)
    if output != LOGITS:
        return None, f"Jacobians were taken to {output!r}, not the logits: no K for W_U"
    if settings.get("behavioral_loss", "mse") == "kl":
        # E[diag(p) − ppᵀ] always annihilates the all-ones (logit shift) direction; its other
        # eigenvalues are positive but unknown here: 1 stands in for them.
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.ones(d_vocab - 1, dtype=torch.float64)]), None
    return torch.ones(d_vocab, dtype=torch.float64), None


def degeneracy_report(
    model: torch.nn.Module,
    stats: Any,
    eps: float | None = None,
    rtol: float = 1e-8,
    *,
    head_threshold: float = 0.05,
    neuron_threshold: float = 1e-3,
) -> DegeneracyReport:
    """Count nominal parameters, free directions and the K-FAC effective count per weight matrix.

    Args:
        model: the model ``stats`` was collected on (shapes and ``W_V`` ranks).
        stats: from ``collect(model, data, degeneracy_hooks(model), jacobians=True,
            head_sync=True, neuron_sync=True)``; whatever is missing is reported, not guessed.
        eps: absolute loss scale for the K-FAC count ``#{g_i·k_j > eps}``. Default: ``rtol``
            × the largest ``g_i·k_j`` over all weight matrices.
        rtol: eigenvalues of ``G`` and ``K`` at most ``rtol`` × that matrix's largest count
            as zero.
        head_threshold, neuron_threshold: see ``synchronized_heads`` / ``synchronized_neurons``.
    """
    settings = _jacobian_settings(stats)
    loss = settings.get("behavioral_loss", "mse")
    report = DegeneracyReport(rtol=float(rtol), eps=None, eps_meaning="", behavioral_loss=loss)
    collected_on = stats.meta.get("model", {}).get("weights_sha256")
    if collected_on is not None and collected_on != describe_model(model)["weights_sha256"]:
        report.notes.append("warning: the statistics were collected on a model with different weights "
                            "(checksum mismatch); counts below mix the two")
    eig_cache: dict[tuple[str, str, tuple | None], Tensor] = {}

    def gram_eigs(hook: str, sl: tuple[int, int] | None) -> Tensor | None:
        key = ("G", hook, sl)
        if key not in eig_cache:
            try:
                G = stats.gram(hook)
            except KeyError:
                return None
            eig_cache[key] = _eigvals(G if sl is None else G[sl[0]:sl[1], sl[0]:sl[1]])
        return eig_cache[key]

    def jac_eigs(hook: str, sl: tuple[int, int] | None) -> Tensor | None:
        key = ("K", hook, sl)
        if key not in eig_cache:
            try:
                K = stats.jacobian_gram(hook)
            except KeyError:
                return None
            eig_cache[key] = _eigvals(K if sl is None else K[sl[0]:sl[1], sl[0]:sl[1]])
        return eig_cache[key]

    pending: list[tuple[MatrixAccount, Tensor | None, Tensor | None]] = []
    for w in weight_matrices(model):
        acc = MatrixAccount(w.layer, w.name, w.head, w.input_hook, w.output_hook, w.d_in, w.d_out,
                            nominal=w.d_in * w.d_out)
        g = gram_eigs(w.input_hook, w.in_slice)
        if g is None:
            acc.missing.append(f"no activation Gram at {w.input_hook} (add it to collect's hooks)")
        else:
            acc.g_threshold = _threshold(g, rtol)
            acc.rank_G = _rank(g, acc.g_threshold)
            acc.free_from_G = w.d_out * (w.d_in - acc.rank_G)
        if w.output_hook == LOGITS:
            k, why = _unembed_K_eigs(stats, w.d_out)
            if why:
                acc.missing.append(why)
        else:
            k = jac_eigs(w.output_hook, w.out_slice)
            if k is None:
                acc.missing.append(f"no Jacobian Gram at {w.output_hook} (collect it with jacobians=True)")
        if k is not None:
            acc.k_threshold = _threshold(k, rtol)
            acc.rank_K = _rank(k, acc.k_threshold)
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
        report.eps_meaning = "absolute loss scale passed by the user (K-FAC Hessian eigenvalues g_i·k_j at or below it count as zero)"
    report.eps = float(eps)
    for acc, g, k in pending:
        if g is not None and k is not None:
            acc.eps = report.eps
            acc.kfac_rank = int((torch.outer(g, k) > eps).sum())
        report.matrices.append(acc)
        report.missing += [f"{acc.label}: {m}" for m in acc.missing]

    _add_synchronization(report, model, stats, head_threshold, neuron_threshold)
    _add_totals(report, model)
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


def _add_synchronization(report: DegeneracyReport, model: torch.nn.Module, stats: Any,
                         head_threshold: float, neuron_threshold: float) -> None:
    groups = {group for group, _ in stats.accumulators}
    if HEAD_SYNC in groups:
        report.synchronized_heads = synchronized_heads(stats, head_threshold, model).to_dict()
    else:
        report.missing.append("synchronized heads: not collected (collect with head_sync=True)")
    if NEURON_SYNC in groups:
        report.synchronized_neurons = synchronized_neurons(stats, threshold=neuron_threshold, model=model).to_dict()
    elif not getattr(model.cfg, "attn_only", False):
        report.missing.append("synchronized neurons: not collected (collect with neuron_sync=True)")


def _sum(values: list[int | None]) -> int:
    return sum(v for v in values if v is not None)


def _add_totals(report: DegeneracyReport, model: torch.nn.Module) -> None:
    heads = report.synchronized_heads or {}
    neurons = report.synchronized_neurons or {}
    head_free = {int(k): v for k, v in heads.get("freedoms_per_layer", {}).items()}
    neuron_free = {int(k): v["added_freedoms"] for k, v in neurons.get("layers", {}).items()}
    keys = ("nominal", "free_from_G", "free_from_K", "free_combined", "kfac_rank")
    by_layer: dict[str, list[MatrixAccount]] = {}
    for m in report.matrices:
        by_layer.setdefault("unembed" if m.layer is None else str(m.layer), []).append(m)
    for layer, mats in by_layer.items():
        row: dict[str, Any] = {k: _sum([getattr(m, k) for m in mats]) for k in keys}
        row["matrices_missing_counts"] = [m.label for m in mats if m.missing]
        if layer != "unembed":
            row["synchronized_head_freedoms"] = head_free.get(int(layer))
            row["synchronized_neuron_freedoms"] = neuron_free.get(int(layer))
        report.per_layer[layer] = row
    t = {k: _sum([getattr(m, k) for m in report.matrices]) for k in keys}
    t["nominal_weights"] = t.pop("nominal")
    t["nominal_model"] = sum(p.numel() for p in model.parameters())
    t["synchronized_head_freedoms"] = sum(head_free.values())
    t["synchronized_neuron_freedoms"] = sum(neuron_free.values())
    # The paper's generic d_head² per head for each of the W_QK and W_OV factorisations
    # (GL(d_head) acting on both factors and their biases). Informational: these directions
    # move biases too, which the nominal (weights-only) count leaves out, so they are not
    # subtracted below; with biases held fixed d_head² − d_head of each remain (docs/kfac_vs_exact.md).
    cfg = model.cfg
    t["generic_head_freedoms"] = 2 * int(cfg.d_head) ** 2 * int(cfg.n_heads) * int(cfg.n_layers)
    t["matrices_with_kfac"] = sum(m.kfac_rank is not None for m in report.matrices)
    t["matrices"] = len(report.matrices)
    # N_eff estimate: K-FAC rank of the covered matrices minus the synchronisation freedoms
    # (which the per-matrix counts cannot see).
    t["effective_parameters"] = max(0, t["kfac_rank"] - t["synchronized_head_freedoms"]
                                    - t["synchronized_neuron_freedoms"])
    report.totals = t
