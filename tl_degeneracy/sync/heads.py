"""Synchronized attention heads (docs/theory.md §4, paper §3.2 "Attention").

Two heads of one layer are synchronized when their attention patterns agree on the data.
Then the value/output maps of the two heads can exchange value directions (``W_V`` rows
mixed, ``W_O`` undoing it) without changing the model: ``2·r_h·r_h'`` free directions per
pair, ``r`` the rank of each head's ``W_V`` (``2·d_head²`` at full rank), on top of the
generic ``d_head²`` per head.

Streaming: per layer we keep ``Σ⟨A_h, A_h'⟩`` (an ``n_heads × n_heads`` Gram of attention
rows), ``Σ ½‖A_h − A_h'‖₁`` and the number of query rows, summed over the datapoints
(non-padding query positions the position mask selects). Only one batch of patterns is
ever alive; the float64 work is chunked over query positions.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from ..collection.accumulators import AdditiveAccumulator
from ..collection.observers import Contribution, LayerObserver
from ..generations import HookedModel
from ..hook_names import act_name, layer_of
from ..linalg import DEFAULT_RTOL, matrix_rank
from .clustering import Linkage, blocks_below, worst_within

HEAD_SYNC = "head_sync"
Metric = Literal["tv", "squared"]

# float64 elements per chunk of attention rows (8 MB): bounds the extra memory beyond
# the batch of patterns the forward pass already holds.
_CHUNK_ELEMENTS = 2**20


def pattern_hook(layer: int) -> str:
    return act_name("pattern", layer)


class HeadSyncAccumulator(AdditiveAccumulator):
    """Sums over query rows of one layer: ``gram[h,h'] = Σ⟨A_h,A_h'⟩``, ``tv[h,h'] = Σ ½‖A_h−A_h'‖₁``, ``n``."""

    fields = ("gram", "tv", "n")
    kind = "head_sync"

    @classmethod
    def zeros(cls, n_heads: int, device: str | torch.device = "cpu") -> HeadSyncAccumulator:
        return cls({
            "gram": torch.zeros(n_heads, n_heads, dtype=torch.float64, device=device),
            "tv": torch.zeros(n_heads, n_heads, dtype=torch.float64, device=device),
            "n": torch.zeros((), dtype=torch.int64, device=device),
        })

    @classmethod
    def from_batch(
        cls,
        pattern: Float[Tensor, "batch head query key"],
        mask: Bool[Tensor, "batch query"],
    ) -> HeadSyncAccumulator:
        """The sums over the query rows ``mask`` selects.

        Causal masking zeroes the same keys for every head of a layer, so comparing full
        rows compares exactly the keys both heads can see.
        """
        B, H, Q, K = pattern.shape
        acc = cls.zeros(H, device=pattern.device)
        gram, tv = acc.tensors["gram"], acc.tensors["tv"]
        # which query chunks hold any datapoint, decided where the mask is (the host, in a collect)
        rows = max(1, _CHUNK_ELEMENTS // max(1, B * H * K))
        starts = [q0 for q0 in range(0, Q, rows) if bool(mask[:, q0:q0 + rows].any())]
        mask = mask.to(pattern.device, non_blocking=True)
        # Half-precision patterns: the L1 distances in float32 (a sum of K terms in [0, 1] per row),
        # every sum over rows in float64.
        work = pattern.dtype if pattern.dtype in (torch.float64, torch.float32) else torch.float32
        for q0 in starts:
            m = mask[:, q0:q0 + rows]
            # where(), not multiplication: padded query rows may hold NaN.
            a = torch.where(m[:, None, :, None], pattern[:, :, q0:q0 + rows].to(torch.float64), 0.0)
            gram += einsum(a, a, "b h q k, b g q k -> h g")
            # ½‖A_h − A_g‖₁ of every head pair per query row: cdist holds no [h, g, k] differences
            rows_hk = rearrange(a if work == torch.float64 else a.to(work), "b h q k -> (b q) h k")
            tv += 0.5 * torch.cdist(rows_hk, rows_hk, p=1).to(torch.float64).sum(0)
        acc.tensors["tv"] = tv
        acc.tensors["n"] = mask.sum().to(torch.int64)
        return acc


@dataclass(frozen=True)
class HeadSync(LayerObserver):
    """Observer: per-layer sums for head synchronisation (``layers=None``: every layer)."""

    kind: ClassVar[str] = HEAD_SYNC

    def hooks(self) -> list[str]:
        return [pattern_hook(l) for l in self.layer_list]

    def compute(self, cache: dict[str, Tensor], mask: Bool[Tensor, "batch pos"]) -> Contribution:
        return {(HEAD_SYNC, name): HeadSyncAccumulator.from_batch(cache[name], mask) for name in self.hooks()}


# -- reading the sums --------------------------------------------------------------------------

def _head_sync_layers(stats: Any) -> list[int]:
    return sorted(l for l in (layer_of(name) for name in stats.names(HEAD_SYNC)) if l is not None)


@dataclass(frozen=True)
class HeadSyncMatrices:
    """Per-pair head statistics of one layer (float64, ``n_heads × n_heads``).

    ``distance`` = ``D_hh' = E‖A_h − A_h'‖²`` over query rows (in [0, 2]), ``tv`` = mean
    total-variation distance ``E ½‖A_h − A_h'‖₁`` (in [0, 1]), ``gram`` = ``E⟨A_h, A_h'⟩``,
    ``n`` = query rows seen.
    """

    layer: int
    distance: Float[Tensor, "head head"]
    tv: Float[Tensor, "head head"]
    gram: Float[Tensor, "head head"]
    n: int

    def metric(self, name: str) -> Float[Tensor, "head head"]:
        return self.tv if name == "tv" else self.distance


def head_sync_matrices(stats: Any, layer: int) -> HeadSyncMatrices:
    """The head-synchronisation matrices of one layer from ``collect(..., observers=[HeadSync()])``."""
    key = (HEAD_SYNC, pattern_hook(layer))
    if key not in stats.accumulators:
        have = _head_sync_layers(stats)
        raise KeyError(f"no head-synchronisation statistics for layer {layer}: collect with "
                       f"observers=[HeadSync()] (they exist for layers {have or 'none'})")
    acc = stats.accumulators[key]
    n = int(acc.tensors["n"])
    if n == 0:
        raise ValueError(f"no query rows were accumulated for layer {layer}")
    gram = acc.tensors["gram"] / n
    diag = gram.diagonal()
    distance = (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0.0)
    distance.fill_diagonal_(0.0)
    return HeadSyncMatrices(layer, distance, acc.tensors["tv"] / n, gram, n)


# -- results -----------------------------------------------------------------------------------

@dataclass
class HeadBlock:
    layer: int
    heads: list[int]
    worst_distance: float  # largest within-block value of the chosen metric
    value_ranks: list[int]  # rank of each head's W_V (d_head when assumed full rank)
    freedoms: int  # Σ_{pairs} 2·r_h·r_h'


@dataclass
class SynchronizedHeads:
    threshold: float
    metric: str
    linkage: str
    meaning: str
    rank_source: str
    blocks: list[HeadBlock] = field(default_factory=list)
    freedoms_per_layer: dict[int, int] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)

    @property
    def total_freedoms(self) -> int:
        return sum(self.freedoms_per_layer.values())

    def blocks_in(self, layer: int) -> list[HeadBlock]:
        return [b for b in self.blocks if b.layer == layer]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["freedoms_per_layer"] = {str(k): v for k, v in self.freedoms_per_layer.items()}
        out["total_freedoms"] = self.total_freedoms
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynchronizedHeads:
        data = dict(data)
        data.pop("total_freedoms", None)
        data["blocks"] = [HeadBlock(**b) for b in data.get("blocks", [])]
        data["freedoms_per_layer"] = {int(k): v for k, v in data.get("freedoms_per_layer", {}).items()}
        return cls(**data)


_MEANINGS = {
    "tv": "mean total-variation distance ½Σ_k|A_h−A_h'| between the heads' attention rows, in [0, 1] "
          "(fraction of attention mass placed differently); pairs at or below the threshold are synchronized",
    "squared": "mean squared distance E‖A_h−A_h'‖² between attention rows, in [0, 2]; pairs at or below "
               "the threshold are synchronized",
}


def _d_head(stats: Any, model: HookedModel | None) -> int:
    if model is not None:
        return int(model.cfg.d_head)
    cfg = (stats.run.model if stats.run is not None else {}).get("cfg", {})
    if "d_head" not in cfg:
        raise ValueError("d_head is unknown: pass model= (the stats' metadata does not record it)")
    return int(cfg["d_head"])


def value_ranks(model: HookedModel, layer: int, rtol: float = DEFAULT_RTOL) -> list[int]:
    """Rank of each head's ``W_V`` (``[d_model, d_head]``) under the package convention (``linalg``)."""
    W_V = model.blocks[layer].attn.W_V.detach().to(torch.float64)
    return [matrix_rank(w, rtol) for w in W_V]


def synchronized_heads(
    stats: Any,
    threshold: float = 0.05,
    model: HookedModel | None = None,
    *,
    metric: Metric = "tv",
    linkage: Linkage = "components",
    layers: Iterable[int] | None = None,
    rank_rtol: float = DEFAULT_RTOL,
) -> SynchronizedHeads:
    """Blocks of mutually synchronized heads per layer and the free directions they add.

    Args:
        threshold: largest ``metric`` value at which two heads count as synchronized
            (default 0.05: on average at most 5% of the attention mass placed differently).
        model: when given, each head's ``W_V`` rank adjusts the count
            (``2·r_h·r_h'`` per pair); otherwise ``W_V`` is assumed full rank (``2·d_head²``).
        metric: ``"tv"`` (mean total variation, in [0,1]) or ``"squared"`` (``D_hh'``).
        linkage: ``"components"`` or ``"complete"`` (see ``blocks_below``).
    """
    if metric not in _MEANINGS:
        raise ValueError(f"metric must be 'tv' or 'squared', got {metric!r}")
    chosen = _head_sync_layers(stats) if layers is None else [int(l) for l in layers]
    if not chosen:
        raise KeyError("no head-synchronisation statistics: collect with observers=[HeadSync()]")
    d_head = _d_head(stats, model)
    result = SynchronizedHeads(
        threshold=float(threshold), metric=metric, linkage=linkage, meaning=_MEANINGS[metric],
        rank_source=(f"rank of each head's W_V from the model (σ² > {rank_rtol:g}·σ_max²)"
                     if model is not None
                     else f"W_V assumed full rank (d_head = {d_head}); pass model= to rank-adjust"),
        layers=chosen,
    )
    for layer in chosen:
        dist = head_sync_matrices(stats, layer).metric(metric)
        ranks = value_ranks(model, layer, rank_rtol) if model is not None else [d_head] * dist.shape[0]
        total = 0
        for heads in blocks_below(dist, threshold, linkage):
            r = [ranks[h] for h in heads]
            # GL(Σr) mixing minus the generic Π GL(r_h): (Σr)² − Σr² = 2 Σ_{pairs} r r'.
            freedoms = sum(r) ** 2 - sum(x * x for x in r)
            result.blocks.append(HeadBlock(layer, heads, worst_within(dist, heads), r, freedoms))
            total += freedoms
        result.freedoms_per_layer[layer] = total
    return result
