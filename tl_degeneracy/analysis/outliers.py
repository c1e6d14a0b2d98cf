"""Massive-activation directions: residual coordinates whose second moment dwarfs the others.

From some layer on, language models keep a few residual coordinates at values thousands of times the
rest, on a few tokens (the first position, a delimiter). One such coordinate dominates the activation
Gram: PCA's leading direction and "directions for 99% of the variance" then describe it alone.

- ``ExtremeActivations`` (an observer) records, per hook, the ``k`` datapoints with the largest
  ``max_c |f_c|`` — the value, the coordinate, the position and the token — exactly and mergeably
  (``TopKAccumulator``), and the second moment of every coordinate at the first positions.
- ``find_outliers`` flags a coordinate ``c`` when ``E[f_c²] > ratio ×`` the median coordinate's
  (``ratio`` = ``OUTLIER_RATIO`` = 100 unless given; the threshold is reported with each flag), and
  says where it lives from the observer's records.
- ``without`` restricts ``G`` and ``M`` to the other coordinates, so summaries can be given with and
  without them.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool
from torch import Tensor

from ..collection.accumulators import AdditiveAccumulator, TopKAccumulator, datapoint_ids
from ..collection.observers import BatchView, Observer

EXTREMES = "extreme_activations"
OUTLIER_RATIO = 100.0
POSITIONS = 4  # second moments kept separately for positions 0..3; the rest pooled


class PositionMoments(AdditiveAccumulator):
    """``sq[b, c] = Σ f_c²`` over datapoints in position bucket ``b`` (0..P−1, then the rest), ``n[b]``."""

    fields = ("sq", "n")
    kind = "position_moments"


@dataclass(frozen=True)
class ExtremeActivations(Observer):
    """Per hook: the top-``k`` datapoints by ``max_c |f_c|`` and the second moments by position."""

    kind: ClassVar[str] = EXTREMES
    wants_batch: ClassVar[bool] = True
    hook_names: tuple[str, ...] = ()
    k: int = 32

    def hooks(self) -> list[str]:
        return list(self.hook_names)

    def compute(self, cache: dict[str, Tensor], mask: Bool[Tensor, "batch pos"],
                batch: BatchView | None = None) -> Iterator[tuple[tuple[str, str], AdditiveAccumulator]]:
        assert batch is not None
        B, T = mask.shape
        device = cache[self.hook_names[0]].device
        # which datapoints, where and what: built on the host (where the mask is), moved once
        select = mask.reshape(-1).nonzero().squeeze(1)
        positions = torch.arange(T).expand(B, T).reshape(-1)[select]
        meta = torch.stack([positions, batch.tokens.reshape(-1)[select].to(torch.int64)], dim=1).to(device)
        ids = datapoint_ids(batch.index, B, T).reshape(-1)[select].to(device)
        bucket = positions.clamp(max=POSITIONS).to(device)
        select = select.to(device)
        for hook in self.hook_names:
            act = cache[hook]
            f = act.reshape(B * T, -1).index_select(0, select).to(torch.float64)
            value, coordinate = f.abs().max(dim=1)
            records = torch.cat([coordinate[:, None], meta], dim=1)  # (coordinate, position, token)
            yield (EXTREMES, hook), TopKAccumulator.select(value[None], ids[None], records[None], self.k)
            sq = torch.zeros(POSITIONS + 1, f.shape[1], dtype=torch.float64, device=device)
            sq.index_add_(0, bucket, f.square())
            n = torch.bincount(bucket, minlength=POSITIONS + 1).to(torch.int64)
            yield (EXTREMES, f"{hook}#positions"), PositionMoments({"sq": sq, "n": n})


@dataclass
class OutlierSite:
    value: float  # |f_c| at the datapoint
    position: int
    token: int
    text: str | None = None  # the token, decoded (when the report had the tokenizer)


@dataclass
class OutlierCoordinate:
    coordinate: int
    rms: float  # √E[f_c²]
    ratio: float  # E[f_c²] / median coordinate's E[f²]
    position_share: list[float]  # share of Σ f_c² at positions 0, 1, …, P−1 and beyond
    sites: list[OutlierSite] = field(default_factory=list)  # its largest activations among the top-k kept


@dataclass
class HookOutliers:
    hook: str
    ratio_threshold: float
    median_rms: float
    coordinates: list[OutlierCoordinate] = field(default_factory=list)
    variance_share: float = 0.0  # of Σ_c E[f_c²] the flagged coordinates carry

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HookOutliers:
        coords = [OutlierCoordinate(**{**c, "sites": [OutlierSite(**s) for s in c.get("sites", [])]})
                  for c in data.get("coordinates", [])]
        return cls(**{**data, "coordinates": coords})


def find_outliers(stats: Any, hook: str, ratio: float = OUTLIER_RATIO, decode: Any = None) -> HookOutliers:
    """Coordinates of ``hook`` with ``E[f_c²] > ratio × median_c E[f_c²]``, and where they live (when the
    ``ExtremeActivations`` observer ran; ``decode(token_id) -> str`` names the tokens)."""
    second = stats.gram(hook).diagonal()
    median = float(second.median())
    flagged = ((second > ratio * median) if median > 0 else (second > 0)).nonzero().flatten().tolist()
    result = HookOutliers(hook, float(ratio), median ** 0.5,
                          variance_share=float(second[flagged].sum() / second.sum()) if flagged else 0.0)
    top = stats.accumulators.get((EXTREMES, hook))
    moments = stats.accumulators.get((EXTREMES, f"{hook}#positions"))
    for c in sorted(flagged, key=lambda c: -float(second[c])):
        share: list[float] = []
        if moments is not None:
            col = moments.tensors["sq"][:, c]
            share = (col / col.sum()).tolist() if float(col.sum()) > 0 else []
        coord = OutlierCoordinate(c, float(second[c]) ** 0.5, float(second[c]) / median if median > 0 else float("inf"),
                                  share)
        if top is not None:
            values, records = top.tensors["values"][0], top.tensors["records"][0]
            for v, (coordinate, position, token) in zip(values.tolist(), records.tolist()):
                if coordinate == c and v != float("-inf") and len(coord.sites) < 5:
                    coord.sites.append(OutlierSite(v, position, token, None if decode is None else decode(token)))
        result.coordinates.append(coord)
    return result


def without(matrix: Tensor, coordinates: list[int]) -> Tensor:
    """``matrix`` (``d × d``) restricted to every coordinate but ``coordinates``."""
    keep = [i for i in range(matrix.shape[0]) if i not in set(coordinates)]
    return matrix[keep][:, keep]
