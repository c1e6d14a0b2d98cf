"""Files that survive a crash and runs that refuse to mix: the package's on-disk conventions.

- ``atomic_save_safetensors`` writes a safetensors file through a temporary and ``os.replace``, so a
  crash mid-write leaves the previous file intact; ``read_safetensors_metadata`` reads the JSON the
  package keeps in a file's header.
- ``check_resumable`` refuses to resume (or merge) a run whose recorded identity differs from this
  one's, naming every differing field.
- ``rank_path``: each ``torch.distributed`` rank checkpoints to its own file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor


class CheckpointMismatchError(ValueError):
    pass


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples → lists, as they come back from disk


def differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Every leaf where two JSON-able identities differ, as ``field.sub: then → now``."""
    saved, current = _norm(saved), _norm(current)
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in list(dict.fromkeys([*saved, *current])):
            out += differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return out
    if saved == current:
        return []
    return [f"{path or 'identity'}: checkpoint has {saved!r}, this run has {current!r}"]


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise, naming each differing field, if the checkpoint's identity differs from this run's."""
    problems = differences(saved, current)
    if problems:
        raise CheckpointMismatchError(
            f"cannot resume from {path}: it was written by a different run ("
            + "; ".join(problems)
            + "). Resuming would mix two runs' sums. Delete the checkpoint or pass a new path to start afresh."
        )


def rank_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """``run.safetensors`` for one process, ``run.rank{r}.safetensors`` for rank ``r`` of several."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, each with its own storage: safetensors refuses tensors that share memory
    (e.g. the same input Gram held by every query head of a grouped-query layer); later sharers are copied."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        t = value.detach().contiguous().cpu()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def atomic_save_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: str | os.PathLike) -> None:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically (temporary file, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_unshared(tensors), tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors_metadata(path: str | os.PathLike, key: str = "tl_degeneracy") -> dict[str, Any]:
    """The package's JSON entry ``key`` in a safetensors file's header (ValueError if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    if key not in header:
        raise ValueError(f"{path} is not a tl_degeneracy file (no {key!r} entry in its safetensors metadata)")
    return json.loads(header[key])


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on an output folder, so that two runs never write into one folder at once.

    ``fcntl.flock`` on ``DIR/.tl_degeneracy.lock`` (released by the system if the process dies); the
    file records the holder's pid. Where ``fcntl`` does not exist (Windows) no lock is taken.
    """

    NAME = ".tl_degeneracy.lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self.handle: Any = None

    def __enter__(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:
            return self
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderBusyError(f"{self.path.parent} is in use by another tl-degeneracy run ({holder}); wait for it "
                                  "to finish, or pass another --out folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            import fcntl

            self.path.unlink(missing_ok=True)  # a waiting run would have been refused, not queued (LOCK_NB)
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
