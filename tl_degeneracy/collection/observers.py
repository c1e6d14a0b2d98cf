"""Observers: collectors beyond the Grams, passed to ``collect`` as explicit objects.

An observer names the hook points it reads, turns one batch of their activations into
additive accumulators, and describes itself for the run identity. ``collect`` knows nothing
about any particular observer; ``HeadSync`` and ``NeuronSync`` are two, and new ones
subclass ``Observer``:

    stats = collect(model, data, hooks, observers=[HeadSync(), NeuronSync(layers=[0])])
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Union

from jaxtyping import Bool
from torch import Tensor

from ..generations import HookedModel
from .accumulators import AdditiveAccumulator

# One batch's accumulators by (group, name): a dict, or pairs yielded one at a time (an observer of many
# layers can yield layer by layer, so that only one layer's contribution is alive at once).
Contribution = Union[Mapping[tuple[str, str], AdditiveAccumulator],
                     Iterable[tuple[tuple[str, str], AdditiveAccumulator]]]


@dataclass(frozen=True)
class BatchView:
    """What an observer that asks for it (``wants_batch``) is told about the batch besides activations."""

    tokens: Tensor  # [batch, pos] token ids, on the host
    index: int  # the batch's number in the data (datapoint ids: accumulators.datapoint_ids)


@dataclass(frozen=True)
class Observer(ABC):
    """Base class. ``kind`` is the ``Stats`` group its accumulators are stored under.

    ``wants_batch``: ``compute`` is also given ``batch=BatchView(...)`` (token ids, batch number), for
    observers that record where something happened (top-k examples, outlier sites).
    """

    kind: ClassVar[str]
    wants_batch: ClassVar[bool] = False

    def resolve(self, model: HookedModel) -> Observer:
        """A copy with every default made explicit for ``model``, validated (called once per run)."""
        return self

    @abstractmethod
    def hooks(self) -> list[str]:
        """The hook points whose activations ``compute`` receives."""

    @abstractmethod
    def compute(self, cache: dict[str, Tensor], mask: Bool[Tensor, "batch pos"],
                batch: BatchView | None = None) -> Contribution:
        """One batch: ``cache`` maps each of ``hooks()`` to its detached activation; ``mask`` the datapoints
        (on the host); ``batch`` when ``wants_batch``."""

    def to_dict(self) -> dict[str, Any]:
        fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        return {"kind": self.kind, **fields}


@dataclass(frozen=True)
class LayerObserver(Observer, ABC):
    """An observer of some layers (``layers=None``: every layer of the model)."""

    layers: Sequence[int] | None = None

    def resolve(self, model: HookedModel) -> LayerObserver:
        n_layers = int(model.cfg.n_layers)
        chosen = list(range(n_layers)) if self.layers is None else (
            [int(self.layers)] if isinstance(self.layers, int) else [int(l) for l in self.layers])
        bad = [l for l in chosen if not 0 <= l < n_layers]
        if bad or not chosen:
            raise ValueError(f"{type(self).__name__}(layers={self.layers!r}): layers {bad or chosen} do not exist "
                             f"(the model has layers 0..{n_layers - 1})")
        return replace(self, layers=tuple(chosen))

    @property
    def layer_list(self) -> list[int]:
        if self.layers is None:
            raise RuntimeError(f"{type(self).__name__} is not resolved against a model yet")
        return [int(l) for l in self.layers]  # type: ignore[union-attr]
