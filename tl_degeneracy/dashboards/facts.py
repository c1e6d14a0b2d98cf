"""What a direction is and does, beside its examples: importance, scale, density, direct logit effect.

**Direct logit effect.** A residual-stream direction's decoder vector ``u = C⁺[:, i]`` (what adding one unit of
``f̂_i`` adds to the stream) is pushed through the final normalisation and the unembedding, ``(u ⊙ w) W_U``,
where ``w`` is the final normalisation's weight when it is not folded into ``W_U``; a LayerNorm's centring is
applied (``u − mean(u)``). **Approximation**: the normalisation's per-token scale ``1/rms(x)`` is dropped — it
multiplies every logit of a token alike, so it changes the size of the effect but not which tokens rank
top or bottom — and so are the later layers (the *direct* path only). The same convention as SAE dashboards'
``W_dec[i] @ W_U``.

**Density.** The share of datapoints with ``f̂_i > s_i`` and with ``f̂_i < −s_i``, ``s_i`` the coordinate's RMS
(one standard unit), read exactly from the histogram (``examples.ActivationHistogram``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..degeneracy.weights import norm_affine
from ..generations import HookedModel
from .examples import ActivationHistogram, HistogramBins

IMPORTANCE_NAMES = {"interaction": "Λ", "pca": "variance", "standard": "variance"}
LOGIT_BINS = 40


@dataclass
class TokenEffect:
    token: str
    value: float


@dataclass
class Edge:
    """An edge of the interaction graph to or from this direction: ``hook`` direction ``index`` (``None``:
    the node's rest vertex), ``E`` its weight, ``share`` its share of this direction's incoming or outgoing
    total."""

    hook: str
    index: int | None
    E: float
    share: float


@dataclass
class DirectionFacts:
    basis: str
    hook: str
    index: int  # the direction's index in its basis
    rank: int  # 0 = the most important
    importance: float
    importance_name: str  # "Λ" for the interaction basis, "variance" for PCA and the model's coordinates
    rms: float  # the scale s_i of the histogram (√E[f̂²] on the basis's data)
    mean: float  # E[f̂] over the streamed data
    n: int  # datapoints streamed
    density_positive: float  # share with f̂ > s_i
    density_negative: float  # share with f̂ < −s_i
    logits_top: list[TokenEffect] = field(default_factory=list)
    logits_bottom: list[TokenEffect] = field(default_factory=list)
    in_edges: list[Edge] = field(default_factory=list)
    out_edges: list[Edge] = field(default_factory=list)
    module: int | None = None  # module label at the report's reference ε (interaction graph), if any
    logits_hist_values: list[float] = field(default_factory=list)  # bin centres of the whole logit effect
    logits_hist_heights: list[int] = field(default_factory=list)  # tokens per bin (LOGIT_BINS bins)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DirectionFacts:
        data = dict(data)
        for key in ("logits_top", "logits_bottom"):
            data[key] = [TokenEffect(**t) for t in data.get(key, [])]
        for key in ("in_edges", "out_edges"):
            data[key] = [Edge(**e) for e in data.get(key, [])]
        return cls(**data)


def densities(hist: ActivationHistogram, bins: HistogramBins) -> tuple[Tensor, Tensor, Tensor]:
    """``(share above +s, share below −s, n)`` per direction, exactly from the histogram's counts."""
    counts = hist.tensors["counts"].to(torch.float64)  # [D, 2, bins]
    n = hist.tensors["n"].clamp(min=1).to(torch.float64)
    first = bins.bin_of_edge(1.0)
    # a value exactly at s_i lands in the bin starting at 1 (an edge goes to the bin above): "≥ s" then; the
    # boundary itself has measure zero for continuous activations
    above = counts[:, :, first:].sum(-1) / n
    return above[:, 0], above[:, 1], n


def decoder_vectors(layer: Any, indices: list[int]) -> Float[Tensor, "d n"] | None:
    """``C⁺[:, i]`` of the chosen directions (None for a basis without an affine decoder)."""
    C_pinv = getattr(layer, "C_pinv", None)
    return None if C_pinv is None else C_pinv.to(torch.float64)[:, indices]


def direct_logit_effects(model: HookedModel, vectors: Float[Tensor, "d n"]) -> Float[Tensor, "n vocab"] | None:
    """``(u ⊙ w) W_U`` per column ``u`` (module docstring); None when ``u`` is not residual-stream sized."""
    W_U = getattr(model, "W_U", None)
    if not isinstance(W_U, Tensor) or vectors.shape[0] != W_U.shape[0]:
        return None
    u = vectors.to(torch.float64)
    norm = str(getattr(model.cfg, "normalization_type", None) or "")
    if norm.startswith("LN"):  # LayerNorm (LN, LNPre) centres its input; RMSNorm does not
        u = u - u.mean(0, keepdim=True)
    affine = norm_affine(model, "ln_final")
    if affine is not None:
        u = u * affine[0].to(u)[:, None]
    return u.T @ W_U.detach().to(torch.float64)


def top_tokens(effects: Float[Tensor, " vocab"], decode: Any, n: int = 10
               ) -> tuple[list[TokenEffect], list[TokenEffect]]:
    """The ``n`` tokens a direction raises most and lowers most, with their logit changes."""
    top = torch.topk(effects, min(n, effects.numel()))
    bottom = torch.topk(-effects, min(n, effects.numel()))
    return ([TokenEffect(decode(int(i)), float(v)) for v, i in zip(top.values, top.indices)],
            [TokenEffect(decode(int(i)), float(-v)) for v, i in zip(bottom.values, bottom.indices)])


def logit_histogram(effects: Float[Tensor, " vocab"], bins: int = LOGIT_BINS) -> tuple[list[float], list[int]]:
    """Centres and counts of ``bins`` equal bins over the range of a direction's logit effect."""
    lo, hi = float(effects.min()), float(effects.max())
    counts = torch.histc(effects.to(torch.float64), bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    return [lo + width * (i + 0.5) for i in range(bins)], [int(c) for c in counts.tolist()]
