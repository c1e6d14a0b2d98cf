"""The behavioural loss ``L_B`` as a function of a chosen subset of parameters (docs/llc.md §1).

A target owns three things: the parameter entries the chains move (``ParamSlot``s; every
other entry stays at θ*), the outputs ``z_θ*`` of the analysed model on the sampling data
(cached once per minibatch), and ``loss(b)``, an unbiased estimate of

    L_B(θ) = 1/n Σ_datapoints ℓ(z_θ, z_θ*),   ℓ = ½‖z − z*‖² (MSE) or KL(softmax z* ‖ softmax z)

from minibatch ``b`` (``n_batches/n · Σ_{i∈b} ℓ_i``: a minibatch drawn uniformly from a fixed
partition gives the full-data mean on average, whatever the batch sizes).

``TransformerTarget`` reads a TransformerLens model's logits or a hook (datapoints:
``(sequence, position)`` pairs, as in docs/theory.md §1); ``FunctionTarget`` reads any
``nn.Module`` whose output rows are the datapoints (toy models with known learning
coefficients). Parameter names are TransformerLens's on both generations: a
``TransformerBridge``'s own parameters are mapped to them by writing index codes into its
parameters and reading them back through ``tl_named_parameters()`` (then restoring θ*).
"""
from __future__ import annotations

import difflib
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data import TokenBatch
from ..forward import output_at
from ..generations import HookedModel, describe_model
from ..hook_names import LOGITS, resolve_hooks
from ..losses import BehavioralLoss
from ..positions import position_mask
from .config import LLCConfig, ParamSubset

HEAD_TENSORS = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "attn.b_Q", "attn.b_K", "attn.b_V")


@dataclass
class ParamSlot:
    """The sampled entries of one model parameter (``index`` None: all of them)."""

    name: str  # the parameter's name in the model
    label: str  # what the user selected (TransformerLens names, head slices)
    param: torch.nn.Parameter
    index: Int[Tensor, " k"] | None = None  # sorted flat indices into the parameter
    layout: dict[str, Tensor] = field(default_factory=dict, repr=False)  # TL name → the parameter's flat
    # indices, shaped like that TL tensor (how K-FAC finds a weight matrix's entries)

    @property
    def numel(self) -> int:
        return self.param.numel() if self.index is None else int(self.index.numel())

    def read(self) -> Tensor:
        """The sampled entries, flat (a view of the parameter when it is whole)."""
        flat = self.param.detach().reshape(-1)
        return flat if self.index is None else flat[self.index]

    def write(self, values: Tensor) -> None:
        with torch.no_grad():
            if self.index is None:
                self.param.copy_(values.reshape(self.param.shape))
            else:
                self.param.view(-1).index_copy_(0, self.index, values)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "parameter": self.name, "numel": self.numel}


# -- parameter names ---------------------------------------------------------------------------

GQA_ALIASES = {"attn._W_K": "attn.W_K", "attn._W_V": "attn.W_V", "attn._b_K": "attn.b_K", "attn._b_V": "attn.b_V"}


def _module_parameters(model: torch.nn.Module) -> dict[str, tuple[str, Tensor | None]]:
    """``{name: (parameter name, None)}``: a module's own names, every entry (identity map). TL 3's
    grouped-query ``attn._W_K`` (one slice per key/value head) is named ``attn.W_K``, as the bridge names it."""
    out: dict[str, tuple[str, Tensor | None]] = {}
    for name, _ in model.named_parameters():
        alias = next((name[:-len(k)] + v for k, v in GQA_ALIASES.items() if name.endswith(k)), name)
        out[alias] = (name, None)
    return out


def _view_index(view: Tensor, param: Tensor) -> Tensor | None:
    """Flat indices into ``param`` of a tensor that is a view of its storage (None when it is not one)."""
    if view.numel() == 0 or not param.is_contiguous() or view.dtype != param.dtype:
        return None
    if view.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return None
    index = torch.full(tuple(view.shape), int(view.storage_offset() - param.storage_offset()), dtype=torch.long)
    for axis, (size, stride) in enumerate(zip(view.shape, view.stride())):
        shape = [1] * view.dim()
        shape[axis] = size
        index = index + (torch.arange(size) * stride).reshape(shape)
    if int(index.min()) < 0 or int(index.max()) >= param.numel():
        return None
    return index


def _unique_heads(index: Tensor) -> Tensor | None:
    """``index`` with repeated leading slices removed (grouped-query attention: the bridge's ``W_K`` repeats
    each key/value head for the query heads that share it); None when entries repeat in any other way."""
    if index.unique().numel() == index.numel():
        return index
    if index.dim() < 2:
        return None
    heads = [h for h in range(index.shape[0]) if h == 0 or not torch.equal(index[h], index[h - 1])]
    reduced = index[heads]
    if reduced.unique().numel() != reduced.numel() or index.shape[0] % len(heads):
        return None
    group = index.shape[0] // len(heads)
    if not torch.equal(reduced.repeat_interleave(group, dim=0), index):
        return None
    return reduced


def _bridge_parameters(model: Any, keep: Callable[[str], bool]) -> dict[str, tuple[str, Tensor | None]]:
    """TransformerLens names of a ``TransformerBridge`` → (its parameter, flat index per entry).

    A TL tensor that is a view of a parameter's storage is read off its strides. The others (the
    grouped-query ``W_K``/``W_V``, computed on every call) are found by writing codes into the
    parameters (number + 1, then the flat index, in base-256 digits: exact in every float dtype; zero
    stays "no parameter"), reading ``tl_named_parameters()`` back and restoring θ*; the index digits are
    written only into the parameters those tensors came from. A TL tensor that is not a re-arrangement
    of one parameter's entries (up to repeated key/value heads) is left out.
    """
    named = list(model.named_parameters())
    tl = {k: v for k, v in model.tl_named_parameters() if keep(k)}
    out: dict[str, tuple[str, Tensor | None]] = {}
    rest = []
    by_storage = {p.untyped_storage().data_ptr(): (name, p) for name, p in named}
    for key, view in tl.items():
        hit = by_storage.get(view.untyped_storage().data_ptr()) if view.numel() else None
        index = None if hit is None else _view_index(view.detach(), hit[1])
        if hit is not None and index is not None:
            out[key] = (hit[0], index)
        else:
            rest.append(key)
    if not rest:
        return out

    def read() -> dict[str, Tensor]:
        values = dict(model.tl_named_parameters())
        return {k: values[k].detach().round().to(torch.int64) for k in rest}

    saved = [p.detach().clone() for _, p in named]
    try:
        with torch.no_grad():
            for i, (_, p) in enumerate(named):  # first the parameter number + 1, in two base-256 digits
                p.fill_(float((i + 1) % 256))
            low = read()
            for i, (_, p) in enumerate(named):
                p.fill_(float((i + 1) // 256))
            high = read()
            numbers = {k: low[k] + 256 * high[k] - 1 for k in rest}
            firsts = {k: int(v.reshape(-1)[0]) for k, v in numbers.items() if v.numel()}
            involved = {i for k, i in firsts.items() if bool((numbers[k] == i).all()) and 0 <= i < len(named)}
            size = max([named[i][1].numel() for i in involved], default=1)
            digits = max(1, math.ceil(math.log(size + 1, 256)))
            index_digits = []
            for d in range(digits):
                for i in involved:
                    p = named[i][1]
                    p.copy_((torch.arange(p.numel(), device=p.device) // 256 ** d % 256).reshape(p.shape).to(p.dtype))
                index_digits.append(read())
    finally:
        with torch.no_grad():
            for (_, p), value in zip(named, saved):
                p.copy_(value)
    for key in rest:
        which = numbers[key]
        number = int(which.reshape(-1)[0]) if which.numel() else -1
        if number not in involved or not bool((which == number).all()):
            continue
        name, p = named[number]
        index = sum(index_digits[d][key] * 256 ** d for d in range(digits))
        assert isinstance(index, Tensor)
        if int(index.min()) < 0 or int(index.max()) >= p.numel():
            continue
        reduced = _unique_heads(index)
        if reduced is not None:
            out[key] = (name, reduced)
    return out


def parameter_map(model: torch.nn.Module, keep: Callable[[str], bool] | None = None
                  ) -> dict[str, tuple[str, Tensor | None]]:
    """The names users select by → (the model's parameter name, flat indices shaped like the TL
    tensor; None for the identity), for the names ``keep`` accepts (default: all). Grouped-query
    ``W_K``/``W_V`` (and their biases) have one slice per key/value head on both generations."""
    keep = keep or (lambda name: True)
    if hasattr(model, "tl_named_parameters"):  # TransformerBridge: its own names are the HF module tree's
        return _bridge_parameters(model, keep)
    return {k: v for k, v in _module_parameters(model).items() if keep(k)}


def _all_names(model: Any) -> list[str]:
    if hasattr(model, "tl_named_parameters"):
        return [k for k, _ in model.tl_named_parameters()]
    return list(_module_parameters(model))


def resolve_subset(model: torch.nn.Module, subset: ParamSubset) -> list[ParamSlot]:
    """The parameter slots a subset selects; one ``ValueError`` naming what to change if none."""
    mapping = parameter_map(model, subset.selects)
    params = dict(model.named_parameters())
    chosen = list(mapping)
    if not chosen:
        every = _all_names(model)
        close = sorted({m for p in subset.patterns for m in difflib.get_close_matches(p, every, n=4, cutoff=0.5)})
        hint = f" Close names: {close}." if close else f" Parameter names look like {every[:4]}."
        raise ValueError(f"the parameter subset {subset.describe()!r} matches no parameter of this model.{hint} "
                         "Pass names= glob patterns of TransformerLens parameter names (e.g. 'blocks.0.attn.W_Q', "
                         "'blocks.1.*', 'unembed.W_U'), a layer that exists, or omit the subset for every parameter.")
    indices: dict[str, list[Tensor]] = {}
    labels: dict[str, list[str]] = {}
    layouts: dict[str, dict[str, Tensor]] = {}
    for name in chosen:
        pname, index = mapping[name]
        p = params[pname]
        full = torch.arange(p.numel(), device=p.device).reshape(p.shape) if index is None else index.to(p.device)
        layouts.setdefault(pname, {})[name] = full
        label = name
        if subset.head is not None:
            if not name.endswith(HEAD_TENSORS):
                raise ValueError(f"head={subset.head} selects one attention head's slice, but the subset also matches "
                                 f"{name!r}, which has no head axis; narrow names= to attention matrices "
                                 "(e.g. 'blocks.0.attn.W_[QKV]' or 'blocks.0.attn.W_O').")
            if subset.head >= full.shape[0]:
                raise ValueError(f"head={subset.head} does not exist: {name} has {full.shape[0]} heads "
                                 f"(0..{full.shape[0] - 1}).")
            full = full[subset.head]
            label = f"{name}[{subset.head}]"
        indices.setdefault(pname, []).append(full.reshape(-1))
        labels.setdefault(pname, []).append(label)
    slots = []
    for pname, parts in indices.items():
        p = params[pname]
        if not p.is_floating_point():
            continue
        index = torch.cat(parts).unique()
        slots.append(ParamSlot(pname, "+".join(labels[pname]), p, None if index.numel() == p.numel() else index,
                               layouts[pname]))
    return slots


# -- behavioural loss values -------------------------------------------------------------------

def datapoint_losses(loss: BehavioralLoss, z: Float[Tensor, "n d"], z_star: Float[Tensor, "n d"]
                     ) -> Float[Tensor, " n"]:
    """ℓ per datapoint: ``½‖z − z*‖²`` (MSE) or ``KL(p* ‖ p)`` with ``z_star`` holding ``log p*`` (KL)."""
    if loss.needs_logits:  # KL: z_star is log softmax of the analysed model's logits
        log_p = torch.log_softmax(z, dim=-1)
        return (z_star.exp() * (z_star - log_p)).sum(-1)
    return 0.5 * (z - z_star).square().sum(-1)


def reference_output(loss: BehavioralLoss, z: Tensor) -> Tensor:
    """What ``datapoint_losses`` compares against: ``z*`` itself, or ``log softmax z*`` for KL."""
    z = z.detach()
    return torch.log_softmax(z, dim=-1) if loss.needs_logits else z.clone()


# -- targets -----------------------------------------------------------------------------------

class Target(ABC):
    """``L_B`` restricted to ``slots``; minibatches ``0..n_batches-1`` partition the data."""

    slots: list[ParamSlot]
    n_datapoints: int
    module: Any  # a TransformerLens model or a plain nn.Module

    @property
    @abstractmethod
    def n_batches(self) -> int: ...

    @abstractmethod
    def outputs(self, batch: int) -> Tensor:
        """The current model's output at the datapoints of minibatch ``batch``, ``[n_b, d]``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity (model, data, output) for checkpoints."""

    def prepare(self, loss: BehavioralLoss) -> None:
        """Cache ``z_θ*`` per minibatch (call at θ*); refuse non-finite outputs."""
        self.loss_fn = loss
        self.centers = [s.read().detach().clone() for s in self.slots]  # θ* of the sampled entries
        self.reference: list[Tensor] = []
        with torch.no_grad():
            for b in range(self.n_batches):
                z = self.outputs(b)
                if not bool(torch.isfinite(z).all()):
                    raise ValueError(f"the model's output at θ* is not finite (NaN or Inf) on minibatch {b}: the "
                                     "behavioural loss has no reference. Check the model's dtype (float16 "
                                     "overflows) and the data.")
                self.reference.append(reference_output(loss, z))

    def loss(self, batch: int) -> Tensor:
        """Unbiased minibatch estimate of ``L_B`` (float64, differentiable w.r.t. the slots)."""
        ell = datapoint_losses(self.loss_fn, self.outputs(batch), self.reference[batch])
        return ell.to(torch.float64).sum() * (self.n_batches / self.n_datapoints)

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.slots)

    @contextmanager
    def grads_for_slots(self) -> Iterator[list[torch.nn.Parameter]]:
        """Only the slots' parameters require grad while sampling (restored afterwards)."""
        model = self.module
        before = {id(p): p.requires_grad for p in model.parameters()}
        chosen = {id(s.param) for s in self.slots}
        try:
            for p in model.parameters():
                p.requires_grad_(id(p) in chosen)
            yield [s.param for s in self.slots]
        finally:
            for p in model.parameters():
                p.requires_grad_(before[id(p)])


def _digest(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TransformerTarget(Target):
    """A TransformerLens model's logits (or a hook's activation) on token batches."""

    def __init__(self, model: HookedModel, batches: list[TokenBatch], config: LLCConfig, slots: list[ParamSlot]):
        if not batches:
            raise ValueError("the sampling data is empty: pass token ids or a dataset with at least one sequence")
        self.module = model
        self.batches = batches
        self.output = config.output
        self.output_positions: tuple[int, ...] | None = config.output_positions  # type: ignore[assignment]
        self.slots = slots
        self.device = next(iter(model.parameters())).device
        if self.output != LOGITS:
            resolve_hooks(model, [self.output])
        positions = None if self.output_positions is None else list(self.output_positions)
        self.masks = [position_mask(positions, b.tokens.shape[0], b.tokens.shape[1], b.attention_mask,
                                    device=self.device) for b in batches]
        self.whole = [bool(m.all()) for m in self.masks]
        self.n_datapoints = int(sum(int(m.sum()) for m in self.masks))
        if self.n_datapoints == 0:
            raise ValueError("the sampling data has no datapoints (every output position is padding)")

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def outputs(self, batch: int) -> Tensor:
        b = self.batches[batch]
        tokens = b.tokens.to(self.device)
        kwargs = {} if b.attention_mask is None else {"attention_mask": b.attention_mask.to(self.device)}
        # at a hook output nothing after the hook is computed
        z = (self.module(tokens, **kwargs) if self.output == LOGITS
             else output_at(self.module, tokens, self.output, kwargs))
        z = z.reshape(z.shape[0], z.shape[1], -1)
        mask = self.masks[batch]
        return z.reshape(-1, z.shape[-1]) if self.whole[batch] else z[mask]  # a view when every position counts

    def describe(self) -> dict[str, Any]:
        return {"kind": "transformer", "model": describe_model(self.module), "output": self.output,
                "output_positions": None if self.output_positions is None else list(self.output_positions),
                "n_sequences": sum(b.tokens.shape[0] for b in self.batches), "n_datapoints": self.n_datapoints,
                "data_sha256": _digest([b.tokens for b in self.batches]
                                       + [b.attention_mask for b in self.batches if b.attention_mask is not None])}


class FunctionTarget(Target):
    """Any ``nn.Module`` mapping input rows to outputs: each row is a datapoint."""

    def __init__(self, module: torch.nn.Module, inputs: Tensor, config: LLCConfig, slots: list[ParamSlot]):
        if not isinstance(inputs, Tensor) or inputs.ndim == 0 or inputs.shape[0] == 0:
            raise ValueError("a plain module needs its inputs as a tensor with one row per datapoint")
        if config.behavioral_loss.needs_logits and config.output != LOGITS:
            raise ValueError("KL needs logits")
        if config.output != LOGITS or config.output_positions is not None:
            raise ValueError("output= and output_positions= apply to TransformerLens models; a plain module's "
                             "output rows are the datapoints")
        self.module = module
        self.slots = slots
        size = inputs.shape[0] if config.batch_size is None else config.batch_size
        self.chunks = list(inputs.split(size))
        self.n_datapoints = int(inputs.shape[0])

    @property
    def n_batches(self) -> int:
        return len(self.chunks)

    def outputs(self, batch: int) -> Tensor:
        z = self.module(self.chunks[batch])
        return z.reshape(z.shape[0], -1)

    def describe(self) -> dict[str, Any]:
        sums = [float(p.detach().double().sum()) for p in self.module.parameters()]
        weights = hashlib.sha256(repr([f"{s:.12e}" for s in sums]).encode()).hexdigest()
        return {"kind": "module", "class": type(self.module).__name__, "weights_sha256": weights,
                "n_datapoints": self.n_datapoints, "data_sha256": _digest(self.chunks)}
