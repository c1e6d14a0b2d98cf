"""Running sums that merge exactly.

Every statistic tl_degeneracy streams is a set of *sums* over datapoints (docs/theory.md §2): two
accumulators over disjoint data merge by adding their tensors, which is what makes
batching, checkpoint/resume and multi-process collection give the same numbers.
``AdditiveAccumulator`` holds that mechanism once; subclasses only say which tensors they
keep and how one batch updates them.
"""
from __future__ import annotations

from typing import ClassVar, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from ..triangular import add_packed_, pack, packed_size, unpack

_A = TypeVar("_A", bound="AdditiveAccumulator")
_T = TypeVar("_T", bound="TopKAccumulator")
ACCUMULATOR_KINDS: dict[str, type[AdditiveAccumulator]] = {}


class AdditiveAccumulator:
    """A named set of float64 (or int64 count) tensors whose only operation is ``+``."""

    fields: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "additive"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ACCUMULATOR_KINDS[cls.kind] = cls  # so a saved file can name its accumulator classes

    def __init__(self, tensors: dict[str, Tensor]):
        missing = set(self.fields) - set(tensors)
        if missing:
            raise ValueError(f"{type(self).__name__} needs tensors {sorted(missing)}")
        self.tensors = {name: tensors[name] for name in self.fields}

    # -- exact algebra ---------------------------------------------------------------------
    def add_(self: _A, other: AdditiveAccumulator) -> _A:
        self._check_compatible(other)
        for name in self.fields:
            self.tensors[name] += other.tensors[name].to(self.tensors[name].device)
        return self

    def __add__(self: _A, other: AdditiveAccumulator) -> _A:
        """A new accumulator holding the sums over both data sets (``add_`` adds in place)."""
        return self.copy().add_(other)

    def copy(self: _A) -> _A:
        return type(self)({k: v.clone() for k, v in self.tensors.items()})

    def _check_compatible(self, other: AdditiveAccumulator) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name in self.fields:
            a, b = self.tensors[name], other.tensors[name]
            if a.shape != b.shape:
                raise ValueError(f"cannot merge: {name} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")

    def all_reduce(self, group=None) -> AdditiveAccumulator:
        """Sum every tensor over the processes of ``torch.distributed`` (in place)."""
        import torch.distributed as dist

        for tensor in self.tensors.values():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return self

    def to(self, device: str | torch.device) -> AdditiveAccumulator:
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    # -- serialisation -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor]) -> AdditiveAccumulator:
        return cls({k: v.clone() for k, v in tensors.items()})

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self)
                and all(_same(self.tensors[k], other.tensors[k]) for k in self.fields))  # type: ignore[attr-defined]


def _same(a: Tensor, b: Tensor) -> bool:
    """Exactly equal, NaN equal to NaN (an empty slot's payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


class GramAccumulator(AdditiveAccumulator):
    """``S = Σ f fᵀ``, ``s = Σ f``, ``n`` over the datapoints of one hook point, in float64.

    Used both for activation Grams ``G`` and Jacobian Grams ``M`` (docs/theory.md §2), where ``f``
    is then the probe-backpropagated ``g = Jᵀ v`` and each batch is scaled by 1/(number of
    probes). ``S`` is symmetric and kept as its upper triangle (``S_triu``, ``triangular.pack``):
    half the memory and the checkpoint of a square sum; ``.S`` gives the square matrix.
    """

    fields = ("S_triu", "s", "n")
    kind = "gram"

    @classmethod
    def zeros(cls, dim: int, device: str | torch.device = "cpu") -> GramAccumulator:
        return cls({
            "S_triu": torch.zeros(packed_size(dim), dtype=torch.float64, device=device),
            "s": torch.zeros(dim, dtype=torch.float64, device=device),
            "n": torch.zeros((), dtype=torch.int64, device=device),
        })

    @classmethod
    def from_sums(cls, S: Float[Tensor, "d d"], s: Float[Tensor, " d"], n: int | Tensor) -> GramAccumulator:
        """An accumulator holding given sums (``S`` square and symmetric; float64)."""
        S = S.to(torch.float64)
        return cls({"S_triu": pack((S + S.T) / 2), "s": s.to(torch.float64),
                    "n": torch.as_tensor(n, dtype=torch.int64, device=S.device).reshape(())})

    @classmethod
    def from_batch(cls, f: Float[Tensor, "n d"], weight: float = 1.0, count: int | None = None) -> GramAccumulator:
        """The sums of one batch of datapoints (``f`` is cast to float64 first).

        ``weight`` multiplies ``S`` and ``s`` (not ``n``): the 1/S of a probe average. ``count``: the
        datapoints ``n`` stands for (default: the rows of ``f``).
        """
        f64 = f.detach().to(torch.float64)
        S_triu = pack(f64.T @ f64)
        return cls({
            "S_triu": S_triu.mul_(weight) if weight != 1.0 else S_triu,
            "s": f64.sum(0) * weight,
            # full(), not tensor(): a host scalar copied to a GPU would wait for the stream
            "n": torch.full((), f.shape[0] if count is None else count, dtype=torch.int64, device=f.device),
        })

    def add_batch_(self, f: Float[Tensor, "n d"], weight: float = 1.0, count: int | None = None) -> GramAccumulator:
        """Add one batch's sums in place (one GEMM; the square temporary is one hook's, freed at once, so
        a GB-sized collection never holds a second copy of its state). Returns self."""
        f64 = f.detach().to(torch.float64)
        add_packed_(self.tensors["S_triu"], f64.T @ f64, alpha=weight)
        self.tensors["s"].add_(f64.sum(0), alpha=weight)
        self.tensors["n"] += f.shape[0] if count is None else count
        return self

    @property
    def dim(self) -> int:
        return self.tensors["s"].shape[0]

    @property
    def S(self) -> Float[Tensor, "d d"]:
        """The square sum ``Σ f fᵀ`` (a new tensor, unpacked from ``S_triu``)."""
        return unpack(self.tensors["S_triu"])

    @property
    def n(self) -> int:
        return int(self.tensors["n"])

    def _require_data(self) -> None:
        if self.n == 0:
            raise ValueError("no datapoints were accumulated (n = 0); check the data and position selection")

    @property
    def gram(self) -> Float[Tensor, "d d"]:
        """Uncentered second moment ``S / n``."""
        self._require_data()
        return self.S.div_(self.n)

    @property
    def mean(self) -> Float[Tensor, " d"]:
        self._require_data()
        return self.tensors["s"] / self.n

    @property
    def covariance(self) -> Float[Tensor, "d d"]:
        """Centered (biased, 1/n) covariance ``S/n − μμᵀ``."""
        mu = self.mean
        return self.gram - torch.outer(mu, mu)


def datapoint_ids(batch_index: int, rows: int, positions: int, device: torch.device | str = "cpu") -> Tensor:
    """``[rows, positions]`` int64 identities of a batch's datapoints, unique over a run and increasing in
    data order: ``batch_index·2³² + row·2¹⁶ + position`` (rows and positions below 65,536)."""
    if rows >= 1 << 16 or positions >= 1 << 16:
        raise ValueError(f"a batch of {rows} rows × {positions} positions is too large for datapoint ids "
                         "(< 65,536 each)")
    row = torch.arange(rows, dtype=torch.int64, device=device)[:, None] << 16
    pos = torch.arange(positions, dtype=torch.int64, device=device)[None, :]
    return (int(batch_index) << 32) + row + pos


class TopKAccumulator(AdditiveAccumulator):
    """For each of ``m`` lists, the ``k`` largest values seen, with the datapoint id and integer records of each.

    The merge is not ``+`` but "the ``k`` largest of both", which is associative and commutative too, so
    batches, checkpoints, resumes and ranks merge exactly. **Tie rule**: larger value first; among equal
    values, the smaller datapoint id (earlier data) first. Empty slots hold ``-inf`` and id ``-1``.
    Fields: ``values`` ``[m, k]`` float64, ``ids`` ``[m, k]`` int64, ``records`` ``[m, k, w]`` int64; a
    subclass may carry more per-entry payload fields (``[m, k, ...]``: gathered with the entries; empty
    slots hold -1, or NaN for floating fields).
    """

    fields: ClassVar[tuple[str, ...]] = ("values", "ids", "records")
    kind = "topk"

    @property
    def m(self) -> int:
        return int(self.tensors["values"].shape[0])

    @property
    def k(self) -> int:
        return int(self.tensors["values"].shape[1])

    @classmethod
    def top(cls: type[_T], values: Float[Tensor, "m c"], ids: Tensor, payload: dict[str, Tensor], k: int) -> _T:
        """The top ``k`` of each row of candidates by the tie rule (any candidate order), with their payload."""
        values = values.to(torch.float64)
        # two stable sorts: by id (ascending), then by value (descending) — ties keep the id order
        order = torch.argsort(ids, dim=1, stable=True)
        order = order.gather(1, torch.argsort(values.gather(1, order), dim=1, descending=True, stable=True))[:, :k]
        out = {"values": values.gather(1, order), "ids": ids.gather(1, order)}
        for name, t in payload.items():
            index = order.reshape(*order.shape, *([1] * (t.ndim - 2))).expand(*order.shape, *t.shape[2:])
            out[name] = t.gather(1, index)
        if out["values"].shape[1] < k:  # fewer candidates than k: pad
            pad = k - out["values"].shape[1]
            for name, t in out.items():
                fill = -torch.inf if name == "values" else (torch.nan if t.is_floating_point() else -1)
                out[name] = torch.cat([t, t.new_full((t.shape[0], pad, *t.shape[2:]), fill)], 1)
        return cls(out)

    @classmethod
    def select(cls, values: Float[Tensor, "m c"], ids: Tensor, records: Tensor, k: int) -> TopKAccumulator:
        """The top ``k`` of each row of candidates, by the tie rule (any candidate order)."""
        return cls.top(values, ids, {"records": records}, k)

    def _payload(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: tensors[name] for name in self.fields if name not in ("values", "ids")}

    def add_(self, other: AdditiveAccumulator) -> TopKAccumulator:
        self._check_compatible(other)
        t, o = self.tensors, {k: v.to(self.tensors[k].device) for k, v in other.tensors.items()}
        both = {name: torch.cat([t[name], o[name]], 1) for name in self.fields}
        merged = type(self).top(both["values"], both["ids"], self._payload(both), self.k)
        self.tensors = merged.tensors
        return self

    def all_reduce(self, group=None) -> TopKAccumulator:
        """Every rank ends with the top ``k`` over all ranks (gathered, then merged)."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        parts = {name: [torch.empty_like(t) for _ in range(world)] for name, t in self.tensors.items()}
        for name, t in self.tensors.items():
            dist.all_gather(parts[name], t.contiguous(), group=group)
        both = {name: torch.cat(parts[name], 1) for name in self.fields}
        merged = type(self).top(both["values"], both["ids"], self._payload(both), self.k)
        self.tensors = merged.tensors
        return self
