"""What a direction responds to: its top-activating contexts, streamed exactly (feature dashboards for a basis).

For each hook and each chosen direction ``i`` of a basis (any kind: ``encode`` gives the coordinates), an
observer keeps, over every datapoint streamed,

- the ``n_examples`` largest ``f̂_i`` and the ``n_examples`` most negative (basis coordinates are signed),
  each with its datapoint id, the token ids of a window around it (``before`` tokens before, ``after``
  after; ``-1`` beyond the sequence) and the direction's coordinate at every token of the window (NaN
  beyond the sequence or on padding) — ``ExampleTopK``, exact under the tie rule of ``TopKAccumulator``
  (larger value first, then the earlier datapoint);
- a histogram of ``|f̂_i| / s_i`` per sign over fixed log-spaced bins (``s_i`` the coordinate's RMS on the
  data the basis was fitted on, fixed in advance so that the bins are the same for every batch, rank and
  resume), with an underflow bin (zeros included) and an overflow bin, and the sums ``Σ f̂``, ``Σ f̂²``, ``n``
  — ``ActivationHistogram``. The density above ``τ = s_i`` (one RMS) is read exactly from it (``1`` is
  a bin edge).

Both merge exactly (top-k by the tie rule; counts and float64 sums by ``+``), so batches, checkpoints,
resumes and ranks give what one pass gives.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..basis.protocol import Basis
from ..collection.accumulators import AdditiveAccumulator, TopKAccumulator, datapoint_ids
from ..collection.observers import BatchView, Observer
from ..validation import positive_int

EXAMPLES = "direction_examples"
SIGNS = ("positive", "negative")


class ExampleTopK(TopKAccumulator):
    """Rows ``2·i`` / ``2·i + 1``: direction ``i``'s largest ``+f̂`` / ``−f̂`` examples. ``records`` are the
    window's token ids ``[m, k, w]`` (int64, ``-1`` outside the sequence), ``window`` the coordinate at each
    window token ``[m, k, w]`` (float64, NaN outside the sequence or on padding; the example's own token is
    at index ``before``)."""

    fields = ("values", "ids", "records", "window")
    kind = "example_topk"


class ActivationHistogram(AdditiveAccumulator):
    """``counts[i, sign, b]``: datapoints with ``|f̂_i| / s_i`` in bin ``b`` (0: below the first edge, zeros
    included; last: at or above the last edge), sign 0 for ``f̂ ≥ 0``, 1 for ``f̂ < 0``; ``s = Σ f̂``,
    ``s2 = Σ f̂²`` per direction; ``n`` datapoints."""

    fields = ("counts", "s", "s2", "n")
    kind = "activation_histogram"


@dataclass(frozen=True)
class HistogramBins:
    """Log-spaced edges ``10^lo … 10^hi`` of ``|f̂| / s`` with ``per_decade`` bins per decade."""

    lo: int = -4
    hi: int = 3
    per_decade: int = 8

    @property
    def n_bins(self) -> int:
        return (self.hi - self.lo) * self.per_decade + 2  # and the underflow and overflow bins

    def edges(self) -> Tensor:
        return torch.logspace(self.lo, self.hi, (self.hi - self.lo) * self.per_decade + 1, dtype=torch.float64)

    def index(self, r: Tensor) -> Tensor:
        """The bin of each ``r = |f̂| / s ≥ 0``."""
        with torch.no_grad():
            x = (torch.log10(r.clamp_min(1e-300)) - self.lo) * self.per_decade
            b = torch.floor(x + 1e-9).to(torch.int64) + 1  # the 1e-9 puts values on an edge in the bin above it
        return b.clamp_(0, self.n_bins - 1).masked_fill_(r < 10.0 ** self.lo, 0)

    def bin_of_edge(self, value: float) -> int:
        """The first bin whose lower edge is ``value`` (a power of ten inside the range)."""
        return int(round((math.log10(value) - self.lo) * self.per_decade)) + 1


@dataclass(frozen=True)
class DirectionExamples(Observer):
    """Observer: top-activating contexts and histograms of chosen directions of one or more bases.

    ``bases``: ``(name, (basis per hook, ...))`` pairs, e.g. ``(("interaction", ib_layers), ("pca", pca_layers))``;
    ``directions[name][j]``: the direction indices of basis ``name``'s ``j``-th layer (default: its
    ``n_directions`` most important, by ``importance``); ``scales[name][j]``: each chosen direction's RMS ``s_i``
    (``from_stats`` computes them; default 1). Build with ``DirectionExamples.build(...)``.
    """

    kind: ClassVar[str] = EXAMPLES
    wants_batch: ClassVar[bool] = True
    bases: tuple[tuple[str, tuple[Basis, ...]], ...] = ()
    directions: tuple[tuple[tuple[int, ...], ...], ...] = ()
    scales: tuple[tuple[tuple[float, ...], ...], ...] = ()
    n_examples: int = 20
    before: int = 12
    after: int = 4
    bins: HistogramBins = HistogramBins()

    @classmethod
    def build(cls, bases: Mapping[str, Sequence[Basis]], n_directions: int | None = 32, n_examples: int = 20,
              before: int = 12, after: int = 4, scales: Mapping[str, Sequence[Sequence[float]]] | None = None,
              stats: Any = None, bins: HistogramBins | None = None) -> DirectionExamples:
        """Choose each layer's ``n_directions`` most important directions (None: all) and their scales: given,
        from ``stats`` (the coordinate's RMS over the statistics' data, ``coordinate_rms``), or 1."""
        positive_int(n_examples, "n_examples")
        if before < 0 or after < 0:
            raise ValueError(f"before and after are token counts ≥ 0, got {before}, {after}")
        names, chosen, scaled = [], [], []
        for name, layers in bases.items():
            layers = tuple(layers)
            idx = tuple(_most_important(layer, n_directions) for layer in layers)
            if scales is not None:
                s = tuple(tuple(float(v) for v in layer_scales) for layer_scales in scales[name])
            elif stats is not None:
                s = tuple(tuple(coordinate_rms(layer, stats)[list(i)].tolist()) for layer, i in zip(layers, idx))
            else:
                s = tuple(tuple(1.0 for _ in i) for i in idx)
            names.append((name, layers))
            chosen.append(idx)
            scaled.append(s)
        return cls(tuple(names), tuple(chosen), tuple(scaled), n_examples, before, after, bins or HistogramBins())

    def hooks(self) -> list[str]:
        return list(dict.fromkeys(layer.hook for _, layers in self.bases for layer in layers))

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_examples": self.n_examples, "before": self.before, "after": self.after,
                "bins": {"lo": self.bins.lo, "hi": self.bins.hi, "per_decade": self.bins.per_decade},
                "bases": {name: {layer.hook: {"fingerprint": layer.fingerprint(), "directions": list(d),
                                              "scales": list(s)}
                                 for layer, d, s in zip(layers, dirs, scales)}
                          for (name, layers), dirs, scales in zip(self.bases, self.directions, self.scales)}}

    def compute(self, cache: dict[str, Tensor], mask: Bool[Tensor, "batch pos"],
                batch: BatchView | None = None) -> Iterator[tuple[tuple[str, str], AdditiveAccumulator]]:
        assert batch is not None, "DirectionExamples needs the batch's tokens (wants_batch)"
        B, T = mask.shape
        device = next(iter(cache.values())).device
        select = mask.reshape(-1).nonzero().squeeze(1).to(device)  # the datapoints, flat b·T + t
        ids = datapoint_ids(batch.index, B, T).reshape(-1).to(device)[select]
        windows = _windows(batch.tokens.to(torch.int64), self.before, self.after).to(device)  # [B, T, w]
        windows = windows.reshape(B * T, -1)[select]
        invalid = ~mask.to(device)
        for (name, layers), dirs, scales in zip(self.bases, self.directions, self.scales):
            for layer, idx, s in zip(layers, dirs, scales):
                act = cache[layer.hook]
                coords = layer.encode(act.reshape(B, T, -1).to(torch.float64))[..., list(idx)].to(torch.float64)
                coords = coords.masked_fill(invalid[..., None], torch.nan)  # [B, T, D]; padding is no example
                a = coords.reshape(B * T, -1)[select]  # [n, D]
                yield (EXAMPLES, f"{name}:{layer.hook}"), self._examples(a, coords, ids, windows, select)
                yield (EXAMPLES, f"{name}:{layer.hook}#histogram"), self._histogram(a, s)

    def _examples(self, a: Tensor, coords: Tensor, ids: Tensor, windows: Tensor, select: Tensor) -> ExampleTopK:
        B, T, D = coords.shape
        k = min(self.n_examples, a.shape[0])
        signed = torch.stack([a.T, -a.T], dim=1).reshape(2 * D, -1)  # rows 2i, 2i+1: +f̂_i, −f̂_i
        # a stable descending sort keeps equal values in datapoint order (= id order): the tie rule
        order = torch.sort(signed, dim=1, descending=True, stable=True).indices[:, :k]  # [2D, k]
        flat = select[order]  # flat b·T + t of each example
        # the direction's coordinate over each example's window (NaN beyond the sequence)
        padded = torch.nn.functional.pad(coords.permute(0, 2, 1), (self.before, self.after), value=torch.nan)
        per_dir = padded.unfold(2, self.width, 1)  # [B, D, T, w]
        direction = torch.arange(2 * D, device=a.device)[:, None].expand_as(order) // 2
        window = per_dir[flat // T, direction, flat % T]  # [2D, k, w]: the signed f̂_i, for both signs' rows
        return ExampleTopK.top(signed.gather(1, order), ids[order], {"records": windows[order], "window": window},
                               self.n_examples)

    def _histogram(self, a: Tensor, scales: Sequence[float]) -> ActivationHistogram:
        D = a.shape[1]
        s = torch.tensor(scales, dtype=torch.float64, device=a.device)
        negative = (a < 0).to(torch.int64)
        b = self.bins.index(a.abs() / s)
        flat = (torch.arange(D, device=a.device) * 2 + negative) * self.bins.n_bins + b  # [n, D]
        counts = torch.bincount(flat.reshape(-1), minlength=2 * D * self.bins.n_bins).reshape(D, 2, -1)
        return ActivationHistogram({"counts": counts.to(torch.int64), "s": a.sum(0), "s2": a.square().sum(0),
                                    "n": torch.full((), a.shape[0], dtype=torch.int64, device=a.device)})


def _windows(tokens: Tensor, before: int, after: int) -> Tensor:
    """``[B, T, before + 1 + after]`` token ids around each position (``-1`` beyond the sequence)."""
    padded = torch.nn.functional.pad(tokens, (before, after), value=-1)
    return padded.unfold(1, before + 1 + after, 1)


def _most_important(layer: Basis, n: int | None) -> tuple[int, ...]:
    importance = torch.as_tensor(layer.importance, dtype=torch.float64)
    order = torch.argsort(importance, descending=True, stable=True)
    return tuple(int(i) for i in (order if n is None else order[:n]))


def coordinate_rms(layer: Basis, stats: Any) -> Float[Tensor, " k"]:
    """Each coordinate's RMS ``√E[f̂_i²]`` over the statistics' data, exactly from its sums: for an affine basis
    ``f̂ = C(f − μ_b)``, ``E[f̂_i²] = (C Σ Cᵀ)_ii + (C(μ − μ_b))_i²`` (``Σ``, ``μ`` the data's covariance and
    mean). A basis without ``C`` (a nonlinear kind) gets 1: its histogram is then in absolute units."""
    C, mean = getattr(layer, "C", None), getattr(layer, "mean", None)
    if C is None or mean is None:
        return torch.ones(layer.k, dtype=torch.float64)
    C = C.to(torch.float64)
    cov = stats.covariance(layer.hook).to(C.device)
    mu = stats.mean(layer.hook).to(C.device)
    shift = C @ (mu - mean.to(C))  # a basis centred elsewhere adds its offset
    second = ((C @ cov) * C).sum(1) + shift.square()
    return second.clamp_min(0).sqrt().cpu()
