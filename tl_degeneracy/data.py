"""Turning what users pass as data into batches of token ids.

Accepted: a ``[n_seq, seq_len]`` tensor of token ids; an iterable of such batches (or of
dicts with ``tokens``/``input_ids`` and an optional ``attention_mask``); a Hugging Face
``datasets`` dataset, either already tokenized (``tokens``/``input_ids`` column) or with a
``text`` column, which is tokenized with the model's tokenizer through TransformerLens's
``tokenize_and_concatenate``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .generations import HookedModel, tokenizer_of

TOKEN_COLUMNS = ("tokens", "input_ids")


@dataclass
class TokenBatch:
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"] | None = None

    @property
    def n_tokens(self) -> int:
        if self.attention_mask is None:
            return self.tokens.numel()
        return int(self.attention_mask.sum())

    def head(self, n_rows: int) -> TokenBatch:
        return self.rows(0, n_rows)

    def rows(self, start: int, stop: int) -> TokenBatch:
        if start == 0 and stop >= self.tokens.shape[0]:
            return self
        mask = None if self.attention_mask is None else self.attention_mask[start:stop]
        return TokenBatch(self.tokens[start:stop], mask)


class EmptyDataError(ValueError):
    pass


def _as_batch(item: Any) -> TokenBatch:
    if isinstance(item, TokenBatch):
        return item
    if isinstance(item, dict):
        key = next((k for k in TOKEN_COLUMNS if k in item), None)
        if key is None:
            raise ValueError(f"a data dict needs one of the keys {TOKEN_COLUMNS}, got {sorted(item)}")
        tokens = torch.as_tensor(item[key])
        mask = item.get("attention_mask")
        mask = None if mask is None else torch.as_tensor(mask).bool()
    else:
        tokens, mask = torch.as_tensor(item), None
    if tokens.ndim == 1:
        tokens = tokens[None]
        mask = None if mask is None else mask[None]
    if tokens.ndim != 2:
        raise ValueError(f"token batches must be [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point():
        raise TypeError("token ids must be integers; got a floating-point tensor")
    return TokenBatch(tokens.long(), mask)


def _is_hf_dataset(data: Any) -> bool:
    module = type(data).__module__
    return module.startswith("datasets.")


def _tokenize_dataset(data: Any, model: HookedModel, context: int) -> Any:
    columns = getattr(data, "column_names", None) or []
    if any(c in columns for c in TOKEN_COLUMNS):
        return data
    if "text" not in columns:
        raise ValueError(f"the dataset needs a 'text' or 'tokens' column, it has {columns}")
    from transformer_lens.utilities import tokenize_and_concatenate

    streaming = not hasattr(data, "__len__")
    return tokenize_and_concatenate(
        data, tokenizer_of(model), streaming=streaming, max_length=context, column_name="text",
        add_bos_token=True, num_proc=1,
    )


def iter_batches(
    data: Any,
    model: HookedModel | None = None,
    batch_size: int = 8,
    context: int | None = None,
) -> Iterator[TokenBatch]:
    """Yield ``TokenBatch``es of at most ``batch_size`` rows (tensors, datasets and iterables alike)."""
    if isinstance(data, (str, bytes)):
        raise TypeError("pass token ids or a datasets.Dataset of text, not a bare string")
    if isinstance(data, Tensor):
        tokens = data[None] if data.ndim == 1 else data
        for start in range(0, tokens.shape[0], batch_size):
            yield _as_batch(tokens[start:start + batch_size])
        return
    if _is_hf_dataset(data):
        if model is None:
            raise ValueError("a text dataset needs the model (for its tokenizer)")
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", 1024)
        data = _tokenize_dataset(data, model, context or min(n_ctx, 1024))
        rows: list[Tensor] = []
        for row in data:
            key = next(k for k in TOKEN_COLUMNS if k in row)
            rows.append(torch.as_tensor(row[key]))
            if len(rows) == batch_size:
                yield _as_batch(torch.stack(rows))
                rows = []
        if rows:
            yield _as_batch(torch.stack(rows))
        return
    for item in data:
        batch = _as_batch(item)
        # batch_size is honoured for iterables too: an oversized batch is cut (a list holding
        # one 3830-row tensor would otherwise be one batch, with its temporaries to match).
        for start in range(0, batch.tokens.shape[0], batch_size):
            yield batch.rows(start, start + batch_size)


def whole_rows(data: Any, model: HookedModel | None, n_tokens: int, context: int | None, *, skip_tokens: int = 0,
               batch_size: int = 8, at_most: bool = False) -> Int[Tensor, "n_seq pos"] | None:
    """The unpadded rows of ``data`` after its first ``skip_tokens`` tokens, up to ``n_tokens`` tokens:
    the last row may pass ``n_tokens``, or with ``at_most`` never does (beyond the first row).
    None when the data holds no such row."""
    rows: list[Tensor] = []
    seen = taken = 0
    for batch in iter_batches(data, model, batch_size, context):
        if batch.attention_mask is not None and not bool(batch.attention_mask.all()):
            continue  # padded rows would need a mask in every loss; whole rows are plenty
        for row in batch.tokens:
            if at_most and rows and taken + row.numel() > n_tokens:
                return torch.stack(rows)
            if seen >= skip_tokens and taken < n_tokens:
                rows.append(row)
                taken += row.numel()
            seen += row.numel()
        if taken >= n_tokens:
            break
    return torch.stack(rows) if rows else None
