"""The embedded default model and text: no hub, no network.

A small GPT-2-architecture language model (4 layers, d_model 128, 4 heads, n_ctx 256,
byte-level BPE with 2048 tokens) that this project trained on Jane Austen's novels (public
domain), shipped as package data with its tokenizer. ``config.json`` beside this file holds
the TransformerLens config, the data source and license, and the train/validation losses;
``scripts/train_default_model.py`` in the repository reproduces every file here.

The default text is *Persuasion*, the novel held out from training (the validation split),
one row per chapter.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "default_model_dir",
    "default_model_config",
    "default_tl_config",
    "default_state_dict",
    "default_tokenizer",
    "load_default_model",
    "default_texts",
    "default_text_dataset",
    "DEFAULT_MODEL_NAME",
]

DEFAULT_MODEL_NAME = "tl-degeneracy-austen-4l128"
_TEXT_FILE = "default_text.jsonl.gz"


def default_model_dir() -> Path:
    """The folder holding the shipped weights, config, tokenizer and text."""
    return Path(str(resources.files(__name__)))


@lru_cache(maxsize=1)
def default_model_config() -> dict[str, Any]:
    """The whole ``config.json``: TL config, tokenizer, data, training facts and losses."""
    return json.loads((default_model_dir() / "config.json").read_text())


def default_tl_config() -> dict[str, Any]:
    """The TransformerLens config dict (``HookedTransformerConfig``/``TransformerBridgeConfig`` kwargs)."""
    return dict(default_model_config()["tl_config"])


def default_state_dict() -> dict[str, torch.Tensor]:
    """The weights as a HookedTransformer-format state dict (float32, unprocessed)."""
    from safetensors.torch import load_file

    return load_file(str(default_model_dir() / "model.safetensors"))


def default_tokenizer() -> Any:
    """The byte-level BPE tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    BOS, EOS and pad are all ``<|endoftext|>`` (id 0). It is loaded from the package folder,
    so TransformerLens can reload it with ``add_bos_token=True`` as it does for hub models.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(default_model_dir()))


def load_default_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """The default model in the installed TransformerLens generation, tokenizer attached.

    TL 3.x: a ``HookedTransformer``; TL 4.x: a ``TransformerBridge`` booted natively. The
    weights are loaded as trained (no LayerNorm folding or other processing), exactly as
    ``tl_degeneracy.generations.model_from_tl_state_dict`` loads them, so both generations
    compute the same logits.
    """
    from ..generations import model_from_tl_state_dict

    return model_from_tl_state_dict(default_tl_config(), default_state_dict(), dtype=dtype, device=device,
                                    tokenizer=default_tokenizer())


def default_texts() -> list[str]:
    """The default text as a list of documents (the chapters of *Persuasion*)."""
    with gzip.open(default_model_dir() / _TEXT_FILE, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def default_text_dataset() -> Any:
    """The default text as a ``datasets.Dataset`` with one column, ``text`` (one chapter a row).

    Built in memory from the shipped file: no hub, no cache folder.
    """
    from datasets import Dataset

    return Dataset.from_dict({"text": default_texts()})


EMBEDDED_NAMES = ("default", "embedded")


def load_model_or_default(name: str | None, device: str | torch.device | None = None,
                          dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, str]:
    """``(model, name)``: the embedded model for None/"default"/"embedded", else a TL name or local
    HF folder; when the Hugging Face hub is unreachable, say so and fall back to the embedded model."""
    from ..loading import HubUnavailableError, load_pretrained

    if name is None or name in EMBEDDED_NAMES:
        return load_default_model(dtype=dtype, device=device), DEFAULT_MODEL_NAME
    try:
        return load_pretrained(name, dtype=dtype, device=device), name
    except HubUnavailableError:
        print(f"note: cannot load {name!r} (the Hugging Face hub is unreachable); "
              f"falling back to the embedded default model {DEFAULT_MODEL_NAME}")
        return load_default_model(dtype=dtype, device=device), DEFAULT_MODEL_NAME
