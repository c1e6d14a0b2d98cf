"""Grouping heads or neurons whose pairwise distance is below a threshold (docs/theory.md §4).

Head synchronisation (``heads``) and neuron synchronisation (``neurons``) both end in the same
question — which members are mutually within ``threshold`` — answered here once.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

Linkage = Literal["components", "complete"]


def blocks_below(
    distance: Float[Tensor, "n n"],
    threshold: float,
    linkage: Linkage = "components",
    candidates: Iterable[int] | None = None,
) -> list[list[int]]:
    """Groups (size ≥ 2) of indices whose pairwise ``distance`` is at most ``threshold``.

    ``components``: connected components of the graph ``distance ≤ threshold`` (exact
    synchronisation is transitive, so with exact ties this is the right grouping; with
    approximate ties a chain can join far-apart members — report the worst pair).
    ``complete``: agglomerative clustering with complete linkage, stopped at
    ``threshold``, so every pair inside a block is within it.
    """
    idx = list(range(distance.shape[0])) if candidates is None else sorted(int(i) for i in candidates)
    if len(idx) < 2:
        return []
    # a few heads or neurons: grouped on the host, wherever the statistics were summed
    d = distance[idx][:, idx].to(device="cpu", dtype=torch.float64)
    d = torch.maximum(d, d.T)  # symmetric: the worse direction decides
    close = d <= threshold
    if linkage == "components":
        label = torch.full((len(idx),), -1, dtype=torch.long)
        groups: list[list[int]] = []
        for start in range(len(idx)):
            if label[start] >= 0:
                continue
            label[start] = len(groups)
            members, frontier = [start], torch.tensor([start])
            while frontier.numel():
                reach = close[frontier].any(0) & (label < 0)
                frontier = reach.nonzero().flatten()
                label[frontier] = len(groups)
                members += frontier.tolist()
            groups.append(sorted(members))
    elif linkage == "complete":
        groups = [[i] for i in range(len(idx))]
        cd = d.clone()
        cd.fill_diagonal_(float("inf"))
        alive = torch.ones(len(idx), dtype=torch.bool)
        while True:
            masked = torch.where(alive[:, None] & alive[None, :], cd, torch.tensor(float("inf"), dtype=cd.dtype))
            flat = int(masked.argmin())
            i, j = divmod(flat, len(idx))
            if not masked[i, j] <= threshold:
                break
            groups[i] += groups[j]
            groups[j] = []
            alive[j] = False
            cd[i] = torch.maximum(cd[i], cd[j])  # complete linkage: the farthest pair
            cd[:, i] = cd[i]
            cd[i, i] = float("inf")
    else:
        raise ValueError(f"linkage must be 'components' or 'complete', got {linkage!r}")
    return [sorted(idx[i] for i in g) for g in groups if len(g) >= 2]


def worst_within(distance: Float[Tensor, "n n"], members: list[int]) -> float:
    sub = distance[members][:, members]
    return float(torch.maximum(sub, sub.T).max())
