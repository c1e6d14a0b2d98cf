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
from collections.abc import Iterable, Sequence  # noqa: F401  (HeadSync.__init__ annotates layers with it)
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from ..collection.accumulators import AdditiveAccumulator
from ..collection.observers import BatchView, Contribution, LayerObserver
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

    def compute(self, cache: dict[str, Tensor], mask: Bool[Tensor, "batch pos"],
                batch: BatchView | None = None) -> Contribution:
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
    value_ranks: list[int]  # rank of each head's W_V (its key/value head's, with GQA; d_head when assumed full)
    freedoms: int  # block_freedoms: (Σr)² − Σr² without GQA (2·r_h·r_h' per pair)
    kv_heads: list[int] | None = None  # the key/value head of each query head (grouped-query attention)


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
    closest: dict[int, tuple[int, int, float]] = field(default_factory=dict)  # per layer: nearest pair, distance

    @property
    def total_freedoms(self) -> int:
        return sum(self.freedoms_per_layer.values())

    def blocks_in(self, layer: int) -> list[HeadBlock]:
        return [b for b in self.blocks if b.layer == layer]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["freedoms_per_layer"] = {str(k): v for k, v in self.freedoms_per_layer.items()}
        out["closest"] = {str(k): list(v) for k, v in self.closest.items()}
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
        data["closest"] = {int(k): (int(v[0]), int(v[1]), float(v[2])) for k, v in data.get("closest", {}).items()}
        return cls(**data)


_MEANINGS = {
    "tv": "mean total-variation distance ½Σ_k|A_h−A_h'| between the heads' attention rows, in [0, 1] "
          "(fraction of attention mass placed differently); pairs at or below the threshold are synchronized",
    "squared": "mean squared distance E‖A_h−A_h'‖² between attention rows, in [0, 2]; pairs at or below "
               "the threshold are synchronized",
}


def _cfg(stats: Any, model: HookedModel | None) -> dict[str, Any]:
    """The attention shape: from the model, else from the statistics' record of it."""
    keys = ("d_head", "d_model", "n_heads", "n_key_value_heads")
    if model is not None:
        return {k: getattr(model.cfg, k, None) for k in keys}
    cfg = (stats.run.model if stats.run is not None else {}).get("cfg", {})
    if any(k not in cfg for k in keys[:3]):
        raise ValueError("the attention shape (d_head, d_model, n_heads) is unknown: pass model= (the statistics' "
                         "record does not hold it)")
    return {k: cfg.get(k) for k in keys}


def kv_head_of(n_heads: int, n_kv_heads: int) -> list[int]:
    """The key/value head each query head reads (grouped-query attention repeats each KV head over
    ``n_heads / n_kv_heads`` consecutive query heads, as TransformerLens and Hugging Face do)."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly")
    return [h // (n_heads // n_kv_heads) for h in range(n_heads)]


def value_ranks(model: HookedModel, layer: int, rtol: float = DEFAULT_RTOL) -> list[int]:
    """Rank of each key/value head's ``W_V`` (``[d_model, d_head]``) under the package convention (``linalg``).

    Without grouped-query attention there is one per query head. TL 3.x stores a GQA model's own
    ``_W_V`` (``[n_kv, ...]``) and repeats it in ``W_V``; the bridge's ``W_V`` is ``[n_kv, ...]`` already.
    """
    attn = model.blocks[layer].attn
    cfg = getattr(model, "cfg", None)
    own = getattr(attn, "_W_V", None)  # TL 3.x's stored key/value heads
    W_V = (own if isinstance(own, Tensor) else attn.W_V).detach().to(torch.float64)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or getattr(cfg, "n_heads", None) or W_V.shape[0])
    if W_V.shape[0] != n_kv:  # repeated to the query heads
        W_V = W_V[:: W_V.shape[0] // n_kv]
    return [matrix_rank(w, rtol) for w in W_V]


def block_freedoms(heads: list[int], kv_head: list[int], ranks: list[int], d_model: int) -> int:
    """Free directions a block of mutually synchronized heads adds beyond the generic ones (docs/theory.md §4).

    ``kv_head[h]``: the key/value head of query head ``h``; ``ranks[g]``: the rank of KV head ``g``'s ``W_V``.
    With a shared pattern ``A`` the block computes ``A X Σ_g V_g (Σ_{h∈B, g(h)=g} O_h)``:
    - heads of the block sharing a KV head ``g`` can trade output directions, ``O_h → O_h + Δ``,
      ``O_h' → O_h' − Δ``: ``(m_g − 1)·r_g·d_model`` per KV head with ``m_g`` heads in the block;
    - a KV head all of whose query heads are in the block can mix its values with those of any other KV
      head the block reads, ``V_g → V_g + V_g' M``, the latter's heads absorbing it: ``r_g·r_g'``.
    Without grouped-query attention (one head per KV head) this is ``(Σ r)² − Σ r²``, the paper's
    ``2·r_h·r_h'`` per pair.
    """
    in_block: dict[int, int] = {}
    for h in heads:
        in_block[kv_head[h]] = in_block.get(kv_head[h], 0) + 1
    group_size = {g: kv_head.count(g) for g in in_block}
    whole = [g for g, m in in_block.items() if m == group_size[g]]
    trade = sum((m - 1) * ranks[g] * d_model for g, m in in_block.items())
    mix = sum(ranks[g] * ranks[other] for g in whole for other in in_block if other != g)
    return trade + mix


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
        model: when given, each key/value head's ``W_V`` rank adjusts the count (``block_freedoms``;
            ``2·r_h·r_h'`` per pair without grouped-query attention); otherwise ``W_V`` is assumed full
            rank (``2·d_head²`` per pair).
        metric: ``"tv"`` (mean total variation, in [0,1]) or ``"squared"`` (``D_hh'``).
        linkage: ``"components"`` or ``"complete"`` (see ``blocks_below``).
    """
    if metric not in _MEANINGS:
        raise ValueError(f"metric must be 'tv' or 'squared', got {metric!r}")
    chosen = _head_sync_layers(stats) if layers is None else [int(l) for l in layers]
    if not chosen:
        raise KeyError("no head-synchronisation statistics: collect with observers=[HeadSync()]")
    cfg = _cfg(stats, model)
    d_head, d_model, n_heads = int(cfg["d_head"]), int(cfg["d_model"]), int(cfg["n_heads"])
    n_kv = int(cfg.get("n_key_value_heads") or n_heads)
    kv_head = kv_head_of(n_heads, n_kv)
    gqa = n_kv < n_heads
    result = SynchronizedHeads(
        threshold=float(threshold), metric=metric, linkage=linkage, meaning=_MEANINGS[metric],
        rank_source=(f"rank of each {'key/value ' if gqa else ''}head's W_V from the model "
                     f"(σ² > {rank_rtol:g}·σ_max²)" if model is not None
                     else f"W_V assumed full rank (d_head = {d_head}); pass model= to rank-adjust")
        + (f"; grouped-query attention: {n_heads} query heads share {n_kv} key/value heads" if gqa else ""),
        layers=chosen,
    )
    for layer in chosen:
        dist = head_sync_matrices(stats, layer).metric(metric)
        if dist.shape[0] > 1:  # the nearest pair, named even when nothing is synchronized
            off = torch.maximum(dist, dist.T).cpu() + torch.diag(torch.full((dist.shape[0],), torch.inf,
                                                                            dtype=dist.dtype))
            a, b = divmod(int(off.argmin()), dist.shape[0])
            result.closest[layer] = (min(a, b), max(a, b), float(off[a, b]))
        ranks = value_ranks(model, layer, rank_rtol) if model is not None else [d_head] * n_kv
        total = 0
        for heads in blocks_below(dist, threshold, linkage):
            freedoms = block_freedoms(heads, kv_head, ranks, d_model)
            result.blocks.append(HeadBlock(layer, heads, worst_within(dist, heads), [ranks[kv_head[h]] for h in heads],
                                           freedoms, [kv_head[h] for h in heads] if gqa else None))
            total += freedoms
        result.freedoms_per_layer[layer] = total
    return result
