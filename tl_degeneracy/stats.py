"""``Stats``: everything one collection run accumulated, plus what it was run on.

On disk: one safetensors file. Tensors are stored as ``{group}/{name}/{field}`` (e.g.
``activations/blocks.0.hook_resid_pre/S``); the JSON metadata (model identity, hooks,
settings, progress) sits in the safetensors header under ``"tl_degeneracy"``. Files are
written atomically, so a crash mid-write leaves the previous file intact.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from .accumulators import ACCUMULATOR_KINDS, AdditiveAccumulator, GramAccumulator

FORMAT_VERSION = 1
ACTIVATIONS, JACOBIANS = "activations", "jacobians"


def atomic_save_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors_metadata(path: str | os.PathLike, key: str = "tl_degeneracy") -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    if key not in header:
        raise ValueError(f"{path} is not a tl_degeneracy file (no {key!r} entry in its safetensors metadata)")
    return json.loads(header[key])


class Stats:
    """Accumulators keyed by ``(group, name)`` and the metadata of the run that filled them.

    Groups: ``"activations"`` and ``"jacobians"`` (a ``GramAccumulator`` per hook, keyed by
    the hook name the user asked for), and further groups added by other collectors.
    """

    def __init__(self, accumulators: dict[tuple[str, str], AdditiveAccumulator] | None = None,
                 meta: dict[str, Any] | None = None):
        self.accumulators: dict[tuple[str, str], AdditiveAccumulator] = dict(accumulators or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self.meta.setdefault("n_tokens", 0)
        self.meta.setdefault("n_batches", 0)

    # -- reading ---------------------------------------------------------------------------------
    def _names(self, group: str) -> list[str]:
        have = [name for g, name in self.accumulators if g == group]
        asked = [h for h in self.meta.get("hooks", []) if h in have]  # the order the user gave
        return asked + [h for h in have if h not in asked]

    @property
    def hooks(self) -> list[str]:
        """Hook points with activation statistics, in the order they were asked for."""
        return self._names(ACTIVATIONS)

    @property
    def jacobian_hooks(self) -> list[str]:
        return self._names(JACOBIANS)

    @property
    def n_tokens(self) -> int:
        """Tokens (non-padding positions) run through the model."""
        return int(self.meta["n_tokens"])

    @property
    def n_batches(self) -> int:
        return int(self.meta["n_batches"])

    def accumulator(self, group: str, name: str) -> AdditiveAccumulator:
        try:
            return self.accumulators[(group, name)]
        except KeyError:
            have = sorted({n for g, n in self.accumulators if g == group})
            raise KeyError(
                f"no {group} statistics for {name!r}; these were collected: {have or 'none'}"
            ) from None

    def _gram(self, name: str, group: str = ACTIVATIONS) -> GramAccumulator:
        acc = self.accumulator(group, name)
        assert isinstance(acc, GramAccumulator)
        return acc

    def gram(self, hook: str) -> Float[Tensor, "d d"]:
        """Uncentered activation Gram ``G = S / n`` (float64)."""
        return self._gram(hook).gram

    def mean(self, hook: str) -> Float[Tensor, " d"]:
        return self._gram(hook).mean

    def covariance(self, hook: str) -> Float[Tensor, "d d"]:
        """Centered activation covariance ``S/n − μμᵀ`` (float64)."""
        return self._gram(hook).covariance

    def n_datapoints(self, hook: str) -> int:
        return self._gram(hook).n

    def jacobian_gram(self, hook: str) -> Float[Tensor, "d d"]:
        """Jacobian Gram ``M = 1/n Σ Jᵀ J`` (float64); exact or probe estimate, see ``meta``."""
        if (JACOBIANS, hook) not in self.accumulators:
            raise KeyError(
                f"no Jacobian statistics for {hook!r}: collect with jacobians=True "
                f"(Jacobian Grams exist for {self.jacobian_hooks or 'no hook'})"
            )
        return self._gram(hook, JACOBIANS).gram

    def head_sync(self, layer: int) -> dict:
        """Head-synchronisation matrices of one layer (``collect(..., head_sync=True)``)."""
        from .head_sync import head_sync_matrices

        return head_sync_matrices(self, layer)

    def neuron_sync(self, layer: int) -> dict:
        """Neuron-synchronisation sums of one MLP layer (``collect(..., neuron_sync=True)``)."""
        from .neuron_sync import neuron_sync_matrices

        return neuron_sync_matrices(self, layer)

    # -- algebra ---------------------------------------------------------------------------------
    def merge(self, other: "Stats") -> "Stats":
        """Stats over the union of both runs' data (sums add; metadata must agree)."""
        mine = {k: v for k, v in self.meta.items() if k not in ("n_tokens", "n_batches", "progress")}
        theirs = {k: v for k, v in other.meta.items() if k not in ("n_tokens", "n_batches", "progress")}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"cannot merge Stats collected differently; they differ in {diff}")
        if set(self.accumulators) != set(other.accumulators):
            raise ValueError("cannot merge Stats with different hooks or collectors")
        merged = Stats({k: acc.merge(other.accumulators[k]) for k, acc in self.accumulators.items()},
                       copy.deepcopy(self.meta))
        merged.meta["n_tokens"] = self.n_tokens + other.n_tokens
        merged.meta["n_batches"] = self.n_batches + other.n_batches
        merged.meta.pop("progress", None)
        return merged

    def all_reduce(self, group=None) -> "Stats":
        """Sum every accumulator and the token/batch counts over ``torch.distributed`` ranks."""
        import torch.distributed as dist

        for acc in self.accumulators.values():
            acc.all_reduce(group)
        device = next(iter(self.accumulators.values())).tensors["n"].device if self.accumulators else "cpu"
        counts = torch.tensor([self.n_tokens, self.n_batches], dtype=torch.int64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self.meta["n_tokens"], self.meta["n_batches"] = int(counts[0]), int(counts[1])
        return self

    # -- disk ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, Tensor] = {}
        kinds: dict[str, str] = {}
        for (group, name), acc in self.accumulators.items():
            kinds[f"{group}/{name}"] = acc.kind
            for field, tensor in acc.state_dict().items():
                tensors[f"{group}/{name}/{field}"] = tensor
        meta = {"format_version": FORMAT_VERSION, **self.meta, "accumulators": kinds}
        atomic_save_safetensors(tensors, {"tl_degeneracy": json.dumps(meta)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Stats":
        meta = read_safetensors_metadata(path)
        kinds = meta.pop("accumulators")
        meta.pop("format_version", None)
        tensors = load_file(str(path), device=str(device))
        accumulators: dict[tuple[str, str], AdditiveAccumulator] = {}
        for key, kind in kinds.items():  # JSON keeps insertion order: collection order survives
            group, name = key.split("/", 1)
            acc_cls = ACCUMULATOR_KINDS[kind]
            accumulators[(group, name)] = acc_cls({f: tensors[f"{key}/{f}"] for f in acc_cls.fields})
        return cls(accumulators, meta)

    def __repr__(self) -> str:
        groups: dict[str, int] = {}
        for group, _ in self.accumulators:
            groups[group] = groups.get(group, 0) + 1
        return f"Stats(n_tokens={self.n_tokens}, {', '.join(f'{g}: {c}' for g, c in groups.items())})"
