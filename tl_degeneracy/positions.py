"""Which (sequence, position) pairs count as datapoints."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from jaxtyping import Bool
from torch import Tensor

PositionSpec = Union[None, int, Sequence[int], Tensor]


def position_mask(
    positions: PositionSpec,
    batch: int,
    seq_len: int,
    attention_mask: Bool[Tensor, "batch pos"] | None = None,
    device: torch.device | str = "cpu",
) -> Bool[Tensor, "batch pos"]:
    """A ``[batch, pos]`` boolean mask of the datapoints to accumulate.

    ``positions``: None (all), an int or list of ints (negative counts from the end, like
    ``[-1]`` for the last position), or a boolean mask ``[pos]`` or ``[batch, pos]``.
    Padding (``attention_mask == 0``) is always excluded.
    """
    if positions is None:
        mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    elif isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape not in ((seq_len,), (batch, seq_len)):
            raise ValueError(
                f"a boolean position mask must be [pos] or [batch, pos] = [{seq_len}] or "
                f"[{batch}, {seq_len}], got {tuple(positions.shape)}"
            )
        mask = positions.to(device).expand(batch, seq_len).clone()
    else:
        idx = [int(positions)] if isinstance(positions, int) else [int(p) for p in positions]
        bad = [p for p in idx if not -seq_len <= p < seq_len]
        if bad:
            raise ValueError(f"positions {bad} are outside a sequence of length {seq_len}")
        mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        mask[:, [p % seq_len for p in idx]] = True
    if attention_mask is not None:
        mask &= attention_mask.to(device).bool()
    return mask
