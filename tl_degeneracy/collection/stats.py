"""``Stats``: everything one collection run accumulated, plus what it was run on.

On disk: one safetensors file. Tensors are stored as ``{group}/{name}/{field}`` (e.g.
``activations/blocks.0.hook_resid_pre/S``); the JSON metadata (model identity, hooks,
settings, progress) sits in the safetensors header under ``"tl_degeneracy"``. Files are
written atomically, so a crash mid-write leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from ..checkpoint import atomic_save_safetensors, read_safetensors_metadata
from ..triangular import pack
from .accumulators import ACCUMULATOR_KINDS, AdditiveAccumulator, GramAccumulator

# Where the accumulator kinds defined above this layer live: a saved Stats may hold them (an analysis'
# stats.safetensors holds the massive-activation moments), and their class registers itself on import.
# Imported by name when a file needs one, as a plugin would be (this layer never imports them otherwise).
KIND_PROVIDERS = {
    "head_sync": "tl_degeneracy.sync.heads", "neuron_sync": "tl_degeneracy.sync.neurons",
    "edges": "tl_degeneracy.interactions.edges", "edge_rest_probes": "tl_degeneracy.interactions.edges",
    "example_topk": "tl_degeneracy.dashboards.examples", "activation_histogram": "tl_degeneracy.dashboards.examples",
    "position_moments": "tl_degeneracy.analysis.outliers",
}


def accumulator_kind(kind: str) -> type[AdditiveAccumulator]:
    """The registered class of an accumulator kind, importing the module that defines it if need be."""
    if kind not in ACCUMULATOR_KINDS and kind in KIND_PROVIDERS:
        import importlib

        importlib.import_module(KIND_PROVIDERS[kind])
    if kind not in ACCUMULATOR_KINDS:
        raise ValueError(f"the statistics hold an accumulator of kind {kind!r}, which no imported module registers; "
                         "import the module that defines it (a subclass of AdditiveAccumulator with that kind) first")
    return ACCUMULATOR_KINDS[kind]

FORMAT_VERSION = 3  # 3: symmetric sums kept as upper triangles (S → S_triu); format 2 is still read
ACTIVATIONS, JACOBIANS = "activations", "jacobians"


@dataclass(frozen=True)
class RunRecord:
    """What a run was: the model's identity card, its ``RunConfig.to_dict()`` and the tokenizer.

    ``identity()`` is what a resume or a merge must match exactly.
    """

    model: dict[str, Any]
    config: dict[str, Any]
    tokenizer: str | None = None
    package_version: str = ""

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "tokenizer": self.tokenizer, **self.config}

    @property
    def hooks(self) -> list[str]:
        return list(self.config.get("hooks", []))

    @property
    def jacobians(self) -> dict[str, Any] | None:
        """The recorded ``JacobianConfig.to_dict()``, or None."""
        return self.config.get("jacobians")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        return cls(**data)


@dataclass
class Progress:
    """Where a (possibly interrupted) run stands: batches and tokens consumed over all ranks,
    and a chained SHA-256 of the token ids of every batch consumed (resume re-reads and checks it)."""

    batches_seen: int = 0
    tokens_seen: int = 0
    data_sha256: str = ""
    world_size: int = 1


class Stats:
    """Accumulators keyed by ``(group, name)`` and the record of the run that filled them.

    Groups: ``"activations"`` and ``"jacobians"`` (a ``GramAccumulator`` per hook, keyed by
    the hook name the user asked for), and one group per observer kind (``"head_sync"``, ...).
    ``run`` is the ``RunRecord``; ``progress`` says how far the run got (None after a merge).
    """

    def __init__(self, accumulators: dict[tuple[str, str], AdditiveAccumulator] | None = None,
                 run: RunRecord | None = None, *, n_tokens: int = 0, n_batches: int = 0,
                 progress: Progress | None = None):
        self.accumulators: dict[tuple[str, str], AdditiveAccumulator] = dict(accumulators or {})
        self.run = run
        self.n_tokens = int(n_tokens)  # tokens (non-padding positions) this object's sums cover
        self.n_batches = int(n_batches)
        self.progress = progress

    # -- reading ---------------------------------------------------------------------------------
    def _names(self, group: str) -> list[str]:
        have = [name for g, name in self.accumulators if g == group]
        asked = [h for h in (self.run.hooks if self.run else []) if h in have]  # the order the user gave
        return asked + [h for h in have if h not in asked]

    @property
    def hooks(self) -> list[str]:
        """Hook points with activation statistics, in the order they were asked for."""
        return self._names(ACTIVATIONS)

    @property
    def jacobian_hooks(self) -> list[str]:
        return self._names(JACOBIANS)

    def groups(self) -> set[str]:
        return {g for g, _ in self.accumulators}

    def names(self, group: str) -> list[str]:
        """Names with accumulators in ``group`` (e.g. an observer's kind)."""
        return self._names(group)

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
        """Jacobian Gram ``M = 1/n Σ Jᵀ H J`` (float64); exact or probe estimate, see ``run``."""
        if (JACOBIANS, hook) not in self.accumulators:
            raise KeyError(
                f"no Jacobian statistics for {hook!r}: collect with jacobians=True "
                f"(Jacobian Grams exist for {self.jacobian_hooks or 'no hook'})"
            )
        return self._gram(hook, JACOBIANS).gram

    # -- algebra ---------------------------------------------------------------------------------
    def _check_mergeable(self, other: Stats) -> None:
        if not isinstance(other, Stats):
            raise TypeError(f"can only merge Stats, got {type(other).__name__}")
        mine = None if self.run is None else self.run.identity()
        theirs = None if other.run is None else other.run.identity()
        if mine != theirs:
            diff = sorted(k for k in set(mine or {}) | set(theirs or {})
                          if (mine or {}).get(k) != (theirs or {}).get(k))
            raise ValueError(f"cannot merge Stats collected differently; they differ in {diff}")
        if set(self.accumulators) != set(other.accumulators):
            raise ValueError("cannot merge Stats with different hooks or collectors")

    def to(self, device: str | torch.device) -> Stats:
        """Every accumulator on ``device`` (in place; returns self)."""
        for acc in self.accumulators.values():
            acc.to(device)
        return self

    def merge(self, other: Stats) -> None:
        """Add ``other``'s sums into this object, **in place** (like ``dict.update``: returns None).

        For a new object use ``a + b``. The two must come from the same run configuration
        over disjoint data.
        """
        self._check_mergeable(other)
        for key, acc in self.accumulators.items():
            acc.add_(other.accumulators[key])
        self.n_tokens += other.n_tokens
        self.n_batches += other.n_batches
        self.progress = None  # a merge of two data streams has no single resume point

    def __iadd__(self, other: Stats) -> Stats:
        self.merge(other)
        return self

    def __add__(self, other: Stats) -> Stats:
        """A new ``Stats`` over both data sets; neither operand changes."""
        self._check_mergeable(other)
        merged = Stats({k: acc.copy() for k, acc in self.accumulators.items()}, self.run,
                       n_tokens=self.n_tokens, n_batches=self.n_batches)
        merged.merge(other)
        return merged

    def all_reduce(self, group=None) -> Stats:
        """Sum every accumulator and the token/batch counts over ``torch.distributed`` ranks."""
        import torch.distributed as dist

        for acc in self.accumulators.values():
            acc.all_reduce(group)
        device = (next(iter(next(iter(self.accumulators.values())).tensors.values())).device
                  if self.accumulators else "cpu")
        counts = torch.tensor([self.n_tokens, self.n_batches], dtype=torch.int64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self.n_tokens, self.n_batches = int(counts[0]), int(counts[1])
        return self

    # -- disk ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, Tensor] = {}
        kinds: dict[str, str] = {}
        for (group, name), acc in self.accumulators.items():
            if "/" in group:  # the key is split at its first "/" on load
                raise ValueError(f"an accumulator group name cannot contain '/': {group!r}")
            kinds[f"{group}/{name}"] = acc.kind
            for field_name, tensor in acc.state_dict().items():
                tensors[f"{group}/{name}/{field_name}"] = tensor
        meta = {"format_version": FORMAT_VERSION, "run": None if self.run is None else self.run.to_dict(),
                "n_tokens": self.n_tokens, "n_batches": self.n_batches,
                "progress": None if self.progress is None else asdict(self.progress), "accumulators": kinds}
        atomic_save_safetensors(tensors, {"tl_degeneracy": json.dumps(meta)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             groups: Iterable[str] | None = None) -> Stats:
        """Read a saved ``Stats``; with ``groups``, only those groups' accumulators (the rest of a GB-sized
        file is not read)."""
        meta = read_safetensors_metadata(path)
        version = meta.get("format_version")
        if version not in (2, FORMAT_VERSION):
            raise ValueError(f"{path} has statistics format {version!r}; this version of "
                             f"tl_degeneracy reads formats 2 and {FORMAT_VERSION}. Collect them again.")
        wanted = None if groups is None else set(groups)
        accumulators: dict[tuple[str, str], AdditiveAccumulator] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            for key, kind in meta["accumulators"].items():  # JSON keeps insertion order: collection order survives
                group, name = key.split("/", 1)
                if wanted is not None and group not in wanted:
                    continue
                acc_cls = accumulator_kind(kind)
                accumulators[(group, name)] = acc_cls({f: _read_field(fh, key, f, version) for f in acc_cls.fields})
        run = None if meta.get("run") is None else RunRecord.from_dict(meta["run"])
        progress = None if meta.get("progress") is None else Progress(**meta["progress"])
        return cls(accumulators, run, n_tokens=meta["n_tokens"], n_batches=meta["n_batches"], progress=progress)

    def __repr__(self) -> str:
        groups: dict[str, int] = {}
        for group, _ in self.accumulators:
            groups[group] = groups.get(group, 0) + 1
        return f"Stats(n_tokens={self.n_tokens}, {', '.join(f'{g}: {c}' for g, c in groups.items())})"


def _read_field(fh: Any, key: str, field_name: str, version: int) -> Tensor:
    """One accumulator field; format 2 kept symmetric sums square (``S``), packed here."""
    if version == 2 and field_name == "S_triu":
        return pack(fh.get_tensor(f"{key}/S"))
    return fh.get_tensor(f"{key}/{field_name}")
