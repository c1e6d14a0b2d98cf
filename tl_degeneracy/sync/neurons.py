"""Synchronized MLP neurons (docs/theory.md §4, paper §3.2, eqs. 17–22).

A neuron's output is its *gate* times its *linear part*, ``f = r·p``:
- plain MLPs (ReLU, GELU): ``p`` = ``mlp.hook_pre``, ``f`` = ``mlp.hook_post``, ``r = f/p`` the firing
  pattern (``1[p > 0]`` for ReLU);
- gated MLPs (SwiGLU, GeGLU: ``f = act(W_gate x) ⊙ W_in x``): ``p`` = ``mlp.hook_pre_linear`` (the
  up-projection), ``r = f/p = act(gate)``, a smooth gate.
Either way ``r = f/p`` (``= 1`` where ``p = 0``). Neurons with the same gate on the data form
synchronized blocks ``S_a``: the linear parts of a block can be mixed by an invertible matrix (a
positive one for ReLU, which must keep the firing pattern; any for a gate that does not read ``p``) and
the output columns unmixed, giving ``s_a²`` directions (``s_a = dim span{p_k : k ∈ S_a}``, eq. 21–22)
instead of the generic ``|S_a|`` per-neuron rescalings. A neuron is *dead* when its output vanishes on
the data: ``E[f²] ≤ rtol × the layer's largest`` (ReLU: never fired; a smooth gate: ``act(gate) ≈ 0``).

Cost of treating neuron ``j`` as synchronized with ``i``:
``c_ij = E[((r_i − r_j) p_j)²] / E[f_j²]`` = ``(E[r_i²p_j²] − 2E[r_i r_j p_j²] + E[f_j²]) / E[f_j²]``
(``r_j p_j = f_j``), so two ``d_mlp × d_mlp`` products per batch stream it exactly.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence  # noqa: F401  (NeuronSync.__init__ annotates layers with it)
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..collection.accumulators import AdditiveAccumulator
from ..collection.observers import BatchView, LayerObserver
from ..generations import HookedModel
from ..hook_names import act_name, layer_of
from ..linalg import DEFAULT_RTOL, gram_rank
from ..triangular import pack, unpack
from .clustering import Linkage, blocks_below, worst_within

NEURON_SYNC = "neuron_sync"


def pre_hook(layer: int) -> str:
    return act_name("pre", layer)


def post_hook(layer: int) -> str:
    return act_name("post", layer)


def linear_hook(layer: int, gated: bool) -> str:
    """Where a neuron's linear part ``p`` is read: the up-projection of a gated MLP, else the preactivation."""
    return act_name("pre_linear", layer) if gated else act_name("pre", layer)


class NeuronSyncAccumulator(AdditiveAccumulator):
    """Sums over datapoints of one MLP layer (float64; ``fires`` and ``n`` int64).

    ``r2p2[i,j] = Σ r_i² p_j²``, ``rrp2[i,j] = Σ r_i r_j p_j²``, ``f2[j] = Σ f_j²``,
    ``fires[j]`` = datapoints where the gate's input is positive (``p_j > 0``; gated: ``act(gate_j) > 0``,
    i.e. the gate's preactivation is positive), ``S = Σ p pᵀ`` (the linear parts' Gram, for ``s_a``;
    symmetric, kept as its upper triangle ``S_triu``), ``s = Σ p``, ``n``.
    """

    fields = ("r2p2", "rrp2", "f2", "fires", "S_triu", "s", "n")
    kind = "neuron_sync"

    @classmethod
    def from_batch(
        cls,
        pre: Float[Tensor, "n d_mlp"],
        post: Float[Tensor, "n d_mlp"],
        gated: bool = False,
    ) -> NeuronSyncAccumulator:
        p = pre.detach().to(torch.float64)
        f = post.detach().to(torch.float64)
        # r = f/p, and 1 where p == 0 (eq. 17); the dummy divisor avoids 0/0.
        zero = p == 0
        r = torch.where(zero, 1.0, f / torch.where(zero, 1.0, p))
        p2 = p.square()
        return cls({
            "r2p2": r.square().T @ p2,
            "rrp2": r.T @ (r * p2),
            "f2": f.square().sum(0),
            "fires": (((r > 0) & ~zero) if gated else (p > 0)).sum(0).to(torch.int64),
            "S_triu": pack(p.T @ p),
            "s": p.sum(0),
            "n": torch.full((), p.shape[0], dtype=torch.int64, device=p.device),
        })


@dataclass(frozen=True)
class NeuronSync(LayerObserver):
    """Observer: per-MLP-layer sums for neuron synchronisation (``layers=None``: every layer).

    ``gated`` (resolved from ``cfg.gated_mlp``): the linear part ``p`` is the up-projection
    ``mlp.hook_pre_linear`` instead of ``mlp.hook_pre``.
    """

    kind: ClassVar[str] = NEURON_SYNC
    gated: bool | None = None

    def resolve(self, model: HookedModel) -> NeuronSync:
        if getattr(model.cfg, "attn_only", False):
            raise ValueError("NeuronSync needs MLP layers; this model is attention-only")
        resolved = super().resolve(model)
        assert isinstance(resolved, NeuronSync)
        return replace(resolved, gated=bool(getattr(model.cfg, "gated_mlp", False)))

    def linear_hook(self, layer: int) -> str:
        return linear_hook(layer, bool(self.gated))

    def hooks(self) -> list[str]:
        return [h for l in self.layer_list for h in (self.linear_hook(l), post_hook(l))]

    def compute(self, cache: dict[str, Tensor], mask: Bool[Tensor, "batch pos"],
                batch: BatchView | None = None) -> Iterator[tuple[tuple[str, str], NeuronSyncAccumulator]]:
        # one layer at a time: three d_mlp × d_mlp float64 sums each, added before the next is made
        for l in self.layer_list:
            pre, post = cache[self.linear_hook(l)], cache[post_hook(l)]
            # indices found where the mask is (the host, in a collect), so the device never waits
            idx = mask.reshape(-1).nonzero().squeeze(1).to(pre.device, non_blocking=True)
            p, f = (a.reshape(-1, a.shape[-1]).index_select(0, idx) for a in (pre, post))
            yield (NEURON_SYNC, pre_hook(l)), NeuronSyncAccumulator.from_batch(p, f, gated=bool(self.gated))


# -- reading the sums --------------------------------------------------------------------------

def _neuron_sync_layers(stats: Any) -> list[int]:
    return sorted(l for l in (layer_of(name) for name in stats.names(NEURON_SYNC)) if l is not None)


@dataclass(frozen=True)
class NeuronSyncMatrices:
    """Per-pair neuron statistics of one MLP layer (float64).

    ``cost[i, j] = c_ij = E[((r_i − r_j) p_j)²] / E[f_j²]`` (NaN in column ``j`` when
    ``E[f_j²] = 0``), ``f2`` = ``E[f²]``, ``fires`` = datapoints with ``p > 0``,
    ``preact_gram`` = ``E[p pᵀ]``, ``n`` = datapoints.
    """

    layer: int
    cost: Float[Tensor, "d_mlp d_mlp"]
    f2: Float[Tensor, " d_mlp"]
    fires: Tensor
    preact_gram: Float[Tensor, "d_mlp d_mlp"]
    n: int


def neuron_sync_matrices(stats: Any, layer: int) -> NeuronSyncMatrices:
    """The neuron-synchronisation matrices of one layer from ``collect(..., observers=[NeuronSync()])``."""
    key = (NEURON_SYNC, pre_hook(layer))
    if key not in stats.accumulators:
        have = _neuron_sync_layers(stats)
        raise KeyError(f"no neuron-synchronisation statistics for layer {layer}: collect with "
                       f"observers=[NeuronSync()] (they exist for layers {have or 'none'})")
    t = stats.accumulators[key].tensors
    n = int(t["n"])
    if n == 0:
        raise ValueError(f"no datapoints were accumulated for layer {layer}")
    f2 = t["f2"]
    num = (t["r2p2"] - 2 * t["rrp2"] + f2[None, :]).clamp_min(0.0)  # ≥ 0 up to rounding
    cost = num / f2[None, :]
    cost.fill_diagonal_(0.0)
    return NeuronSyncMatrices(layer, cost, f2 / n, t["fires"].clone(), unpack(t["S_triu"]).div_(n), n)


def span_dim(gram: Float[Tensor, "k k"], rtol: float) -> int:
    """Rank of a Gram matrix under the package convention (``linalg``)."""
    return gram_rank(gram, rtol)


# -- results -----------------------------------------------------------------------------------

@dataclass
class NeuronBlock:
    layer: int
    neurons: list[int]
    s_a: int  # dim span of the block's preactivations over the data
    worst_cost: float  # largest within-block max(c_ij, c_ji)


@dataclass
class NeuronLayerSync:
    layer: int
    d_mlp: int
    dead: list[int]  # output ≈ 0 on the data (E[f²] ≤ dead_threshold); not in any block
    blocks: list[NeuronBlock] = field(default_factory=list)
    d_live: int = 0
    sum_s_squared: int = 0  # Σ_a s_a² over all live neurons' blocks, singletons included (eq. 22)
    sum_s_squared_minus_d: int = 0  # docs/theory.md §4: Σ s_a² − d (d = live neurons); can be < 0
    added_freedoms: int = 0  # Σ_blocks max(0, s_a² − |S_a|): what the degeneracy report adds
    dead_threshold: float | None = None  # absolute: dead_rtol × the layer's largest E[f²]
    closest: tuple[int, int, float] | None = None  # the live pair with the smallest max(c_ij, c_ji), and that cost


@dataclass
class SynchronizedNeurons:
    threshold: float
    span_rtol: float
    linkage: str
    meaning: str
    layers: dict[int, NeuronLayerSync] = field(default_factory=dict)
    dead_rtol: float | None = None  # a neuron is dead when E[f²] ≤ dead_rtol × its layer's largest

    @property
    def blocks(self) -> list[NeuronBlock]:
        return [b for layer in self.layers.values() for b in layer.blocks]

    @property
    def dead(self) -> dict[int, list[int]]:
        return {l: s.dead for l, s in self.layers.items()}

    @property
    def total_added_freedoms(self) -> int:
        return sum(s.added_freedoms for s in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = {str(k): {**v, "closest": None if v["closest"] is None else list(v["closest"])}
                         for k, v in out["layers"].items()}
        out["total_added_freedoms"] = self.total_added_freedoms
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynchronizedNeurons:
        data = dict(data)
        data.pop("total_added_freedoms", None)
        layers = {}
        for k, v in data.get("layers", {}).items():
            v = dict(v)
            v["blocks"] = [NeuronBlock(**b) for b in v.get("blocks", [])]
            if v.get("closest") is not None:
                v["closest"] = (int(v["closest"][0]), int(v["closest"][1]), float(v["closest"][2]))
            layers[int(k)] = NeuronLayerSync(**v)
        data["layers"] = layers
        return cls(**data)


_MEANING = ("symmetric cost max(c_ij, c_ji), c_ij = E[((r_i − r_j) p_j)²]/E[f_j²]: the relative squared error in "
            "neuron j's output if it used neuron i's firing pattern; pairs at or below the threshold are synchronized")


def synchronized_neurons(
    stats: Any,
    layer: int | Iterable[int] | None = None,
    threshold: float = 1e-3,
    model: HookedModel | None = None,
    *,
    span_rtol: float = DEFAULT_RTOL,
    dead_rtol: float = DEFAULT_RTOL,
    linkage: Linkage = "components",
) -> SynchronizedNeurons:
    """Blocks of synchronized neurons, their ``s_a`` and ``Σ s_a² − d``, and dead neurons.

    Args:
        layer: one layer, several, or None for every layer with statistics.
        threshold: largest symmetric cost ``max(c_ij, c_ji)`` for a synchronized pair.
        model: optional; only checked against the statistics (``d_mlp``).
        span_rtol: ``s_a`` counts eigenvalues of the block's linear parts' Gram above
            ``span_rtol`` × its largest.
        dead_rtol: a neuron is dead when ``E[f_j²] ≤ dead_rtol ×`` the layer's largest ``E[f²]``.

    Dead neurons (output ≈ 0 on the data: a ReLU that never fired, a gate that stays shut) are
    listed apart and left out of blocks and of ``d``: every dead neuron is trivially synchronized
    with every other, and its free directions already show as zero eigenvalues of ``G`` at
    ``mlp.hook_post`` and of ``K`` at its linear part's hook. ``Σ s_a² − d`` (paper eq. 22 minus the generic
    rescalings) is negative when a block's preactivations are linearly dependent
    (``s_a < |S_a|``, e.g. duplicated neurons): those freedoms are the ``G`` zero
    eigenvalues at ``mlp.hook_post``. ``added_freedoms`` counts only the surplus
    ``max(0, s_a² − |S_a|)`` so that nothing is subtracted from the ``G``/``K`` counts.
    """
    if layer is None:
        chosen = _neuron_sync_layers(stats)
    elif isinstance(layer, int):
        chosen = [layer]
    else:
        chosen = [int(l) for l in layer]
    if not chosen:
        raise KeyError("no neuron-synchronisation statistics: collect with observers=[NeuronSync()]")
    result = SynchronizedNeurons(threshold=float(threshold), span_rtol=float(span_rtol), linkage=linkage,
                                 meaning=_MEANING, dead_rtol=float(dead_rtol))
    for l in chosen:
        mats = neuron_sync_matrices(stats, l)
        cost, gram = mats.cost, mats.preact_gram
        d_mlp = cost.shape[0]
        if model is not None and int(model.cfg.d_mlp) != d_mlp:
            raise ValueError(f"the statistics have d_mlp = {d_mlp}, the model {model.cfg.d_mlp}")
        # dead: the output vanishes on the data, relative to the layer (the package's threshold convention)
        cut = dead_rtol * float(mats.f2.max()) if mats.f2.numel() else 0.0
        dead = (mats.f2 <= cut).nonzero().flatten().tolist()
        dead_set = set(dead)
        live = [i for i in range(d_mlp) if i not in dead_set]
        out = NeuronLayerSync(layer=l, d_mlp=d_mlp, dead=dead, d_live=len(live), dead_threshold=cut)
        if len(live) > 1:  # the nearest pair, named even when nothing is synchronized
            sym = torch.maximum(cost, cost.T)[live][:, live].nan_to_num(nan=torch.inf)
            sym.fill_diagonal_(torch.inf)
            flat = int(torch.argmin(sym))
            a, b = live[flat // len(live)], live[flat % len(live)]
            out.closest = (min(a, b), max(a, b), float(sym.reshape(-1)[flat]))
        in_blocks: set[int] = set()
        for members in blocks_below(cost, threshold, linkage, candidates=live):
            s_a = span_dim(gram[members][:, members], span_rtol)
            out.blocks.append(NeuronBlock(l, members, s_a, worst_within(cost, members)))
            in_blocks.update(members)
            out.added_freedoms += max(0, s_a * s_a - len(members))
        singletons = [span_dim(gram[i:i + 1, i:i + 1], span_rtol) for i in live if i not in in_blocks]
        out.sum_s_squared = sum(b.s_a ** 2 for b in out.blocks) + sum(s * s for s in singletons)
        out.sum_s_squared_minus_d = out.sum_s_squared - len(live)
        result.layers[l] = out
    return result
