"""The interaction graph's edges, streamed over data (docs/theory.md §6).

Between consecutive nodes ``l → l+1`` (hook points with bases ``C_l``, ``C_{l+1}``), for input
direction ``j`` and output direction ``i``:

    E_ij = 1/n Σ_x Σ_t ( Σ_t' ∂f̂^{l+1}_i(x,t)/∂f̂^l_j(x,t') · f̂^l_j(x,t') )²  =  1/n Σ_x Σ_t a_tij²

``n`` counts the output node's datapoints; attention moves information across positions, so the
attribution sums over input positions ``t'`` inside the square.

- **forward** (exact, the default): ``a_tij`` for every output ``i, t`` is one Jacobian-vector
  product along the tangent ``C_l⁺[:, j] f̂_j(t')`` (every input position at once), so a pair costs
  one pass per input direction and basis. The passes of every basis are pooled and vmapped in
  chunks sized by a memory budget (``jvp_bytes_per_pass``). When a pair is one whole block
  (``blocks.l.hook_resid_pre`` → the next residual node) the block is called on its own with the
  arguments the model gave it, checked to reproduce the captured output; otherwise every pass
  reruns the model up to the source node.
- **backward** (exact): one vector-Jacobian product per (output position, output coordinate).
- **probes** (unbiased): Rademacher signs ``r_t`` over output positions, one VJP per probe and
  output coordinate; ``E[(Σ_t r_t a_t)²] = Σ_t a_t²`` because ``E[r_t r_s] = δ_ts``.
  The backward passes run along the output's own coordinates once and serve every basis.

**Direction budgets** (``DirectionBudget``, graph.py): edges among each node's most important
directions, the others lumped into one rest vertex whose edges are sums of its directions' edges,
so the graph's mass is the full graph's. Forward mode gets the rest *row* exactly for free (a pass
returns every output direction). The rest *column* ``E[i, ρ] = Σ_{j∈R} E_ij`` needs each rest
direction's own pass (``RestMode.EXACT``) or, by default, ``S`` Rademacher probes: the tangent
``Σ_{j∈R} s_j C⁺[:, j] f̂_j`` (one sign per sequence and rest direction, the same at every position
because positions are summed inside the square) gives ``b_ti = Σ_j s_j a_tij`` and
``E_s[b_ti²] = Σ_{j∈R} a_tij²`` because ``E[s_j s_k] = δ_jk``: unbiased, exact when ``|R| = 1``, used
only when ``|R| > S``. Per datapoint the relative spread of one probe is at most ``√2``
(``Var b² = 2[(Σ a²)² − Σ a⁴]``); the graph reports the standard error from the spread of the ``S``
probes' totals (``meta["rest_rel_stderr"]``).

``estimate_edge_cost`` counts the passes, FLOPs (``torch.utils.flop_counter`` on a calibration
chunk) and projects the time before a run. Under ``torchrun`` each rank takes every ``world``-th
batch (the stream driver); probes are seeded by batch index, so ranks change nothing.
Nodes should be cuts of the network (the residual stream): then ``∂f^{l+1}/∂f^l`` is the whole dependence.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..basis.bases import InteractionBasis
from ..basis.protocol import Basis, require_linear
from ..collection.accumulators import AdditiveAccumulator
from ..collection.batch_pass import NonFiniteError
from ..collection.config import describe_positions
from ..collection.options import StreamOptions
from ..collection.probes import batch_generator
from ..collection.stats import Stats
from ..collection.stream import stream
from ..data import TokenBatch
from ..forward import (
    ParamsRequireGrad,
    batched_vjp,
    forward_until,
    model_device,
    output_at,
    to_device,
)
from ..generations import HookedModel
from ..hook_names import HookSpec, act_name, bridge_resid_mid_partner, layer_of, residual_hooks, resolve_hooks
from ..linalg import DEFAULT_RTOL
from ..positions import PositionSpec, position_mask
from ..validation import one_of, positive_int
from .graph import DirectionBudget, InteractionGraph, RestMode, contract, pair_name, rest_of

EDGES = "edges"
REST_PROBES = "edges_rest"
DEFAULT_CHUNK_BUDGET = 1 << 30  # bytes of pass temporaries per vmapped call (CUDA: at least a quarter of free memory)


class EdgeMethod(str, Enum):
    """How ``a_tij`` is obtained (dispatched in ``edge_batch``; all three are tested against ``jacrev``).

    - ``FORWARD`` (exact): one Jacobian-vector product per input direction ``j`` and basis, with the
      tangent ``C⁺[:, j] f̂_j(t')`` at every input position; it yields ``a_tij`` for every output
      direction and position at once. ``k_in × bases`` passes per layer pair: the default exact mode.
    - ``BACKWARD`` (exact): one vector-Jacobian product per output position and output coordinate
      (``T × d_out`` passes, shared by every basis) — the reference implementation's loop, batched.
    - ``PROBES`` (unbiased estimate): Rademacher signs over output positions, one VJP per probe and
      output coordinate (``n_probes × d_out`` passes, shared by every basis).
    """

    FORWARD = "forward"
    BACKWARD = "backward"
    PROBES = "probes"


class EdgeAccumulator(AdditiveAccumulator):
    """``Σ_x Σ_t a²`` as ``E`` ``[k_out, k_in]`` (float64) and the output datapoint count ``n``."""

    fields = ("E", "n")
    kind = "edges"

    @property
    def edges(self) -> Float[Tensor, "k_out k_in"]:
        return self.tensors["E"] / self.tensors["n"].clamp(min=1)


class RestProbeAccumulator(AdditiveAccumulator):
    """Each rest probe's own total ``Σ_x Σ_t Σ_i b_ti²`` over the data (``[S]``): their spread is the
    standard error of the rest column (``rest_rel_stderr``)."""

    fields = ("mass",)
    kind = "edge_rest_probes"

    def rel_stderr(self) -> float | None:
        m = self.tensors["mass"].to(torch.float64)
        if m.numel() < 2 or float(m.mean()) <= 0:
            return None
        return float(m.std() / m.mean()) / math.sqrt(m.numel())


@dataclass(frozen=True)
class EdgeConfig:
    """One edge pass: nodes (forward order), the bases edges are taken in, and how.

    ``bases`` maps a basis name ("interaction", "pca", "standard", ...) to one affine basis per
    node (``basis.protocol.LinearMaps``: edges are defined through ``C`` and ``C⁺``). ``positions``:
    the datapoints of each *output* node (one spec, or ``{hook: spec}``); inputs always sum over every
    (unpadded) position. ``budget``: keep only each node's top directions, the rest lumped into one
    vertex (graph.py); ``kept`` (filled from it) holds the kept directions per basis and node.
    ``chunk_budget_bytes``: memory for one vmapped call's pass temporaries; ``pair_progress``: a progress
    bar over each batch's layer pairs (an LLM's batch can take minutes). ``to_dict()`` is the run
    identity: resuming with other bases (by fingerprint), budget or options is refused.
    """

    nodes: tuple[str, ...]
    bases: tuple[tuple[str, tuple[Basis, ...]], ...]
    exact: bool = False
    method: EdgeMethod = EdgeMethod.PROBES
    n_probes: int = 4
    seed: int = 0
    positions: Any = None
    batch_size: int = 8
    context: int | None = None
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET
    budget: DirectionBudget | None = None
    pair_progress: bool = field(default=False, compare=False)  # a bar over the pairs of each batch (how, not what)
    kept: tuple[tuple[tuple[int, ...], ...], ...] = field(init=False, default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget.keeps_all:
            object.__setattr__(self, "budget", None)  # every direction kept: the full graph, no rest vertex
        if self.budget is not None:
            select = self.budget.select
            object.__setattr__(self, "kept", tuple(tuple(tuple(select(layer.importance)) for layer in layers)
                                                   for _, layers in self.bases))

    @classmethod
    def build(cls, model: HookedModel, bases: Mapping[str, InteractionBasis | Sequence[Basis]],
              nodes: HookSpec = None, *, exact: bool = False, n_probes: int | None = None, seed: int = 0,
              positions: PositionSpec | Mapping[str, PositionSpec] = None, batch_size: int = 8,
              context: int | None = None, chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET,
              method: EdgeMethod | str | None = None, budget: DirectionBudget | None = None) -> EdgeConfig:
        names = residual_hooks(model) if nodes is None else resolve_hooks(model, nodes)
        if len(names) < 2:
            raise ValueError(f"an interaction graph needs at least two nodes, got {names}; pass nodes= in forward "
                             "order, e.g. tl_degeneracy.residual_hooks(model)")
        if not bases:
            raise ValueError("pass at least one basis, e.g. {'interaction': InteractionBasis.fit(stats)}")
        per_basis = []
        for name, basis in bases.items():
            if isinstance(basis, InteractionBasis):
                missing = [h for h in names if h not in basis.layers]
                if missing:
                    raise ValueError(f"basis {name!r} has no layer at {missing}; fit it at every node "
                                     f"(InteractionBasis.fit(stats, hooks={names}))")
                layers = tuple(basis[h] for h in names)
            else:
                layers = tuple(basis)
                if [l.hook for l in layers] != names:
                    raise ValueError(f"basis {name!r} covers {[l.hook for l in layers]}, the nodes are {names}")
            if not isinstance(name, str) or not name or any(c in name for c in "/:"):
                raise ValueError(f"basis names must be non-empty strings without '/' or ':', got {name!r}")
            for layer in layers:
                require_linear(layer, "the interaction graph's edges")
            per_basis.append((name, layers))
        if exact and n_probes is not None:
            raise ValueError("exact=True takes no n_probes: exact mode loops over every output position")
        probes = 4 if n_probes is None else positive_int(n_probes, "n_probes", "Use exact=True for exact edges.")
        positive_int(batch_size, "batch_size")
        if context is not None:
            positive_int(context, "context")
        positive_int(chunk_budget_bytes, "chunk_budget_bytes")
        if isinstance(positions, Mapping):
            unknown = [h for h in positions if h not in names]
            if unknown:
                raise ValueError(f"positions name hooks {unknown} that are not nodes {names}")
        how = one_of(method, EdgeMethod, "method") if method is not None else (
            EdgeMethod.FORWARD if exact else EdgeMethod.PROBES)
        if (how is EdgeMethod.PROBES) == bool(exact):
            raise ValueError(f"method={how.value!r} is {'an estimate' if exact else 'exact'}: pass exact="
                             f"{not exact} with it, or leave method unset")
        if budget is not None and not isinstance(budget, DirectionBudget):
            raise TypeError(f"budget must be a DirectionBudget, got {type(budget).__name__}")
        if budget is not None and how is not EdgeMethod.FORWARD:
            budget = replace(budget, rest=RestMode.EXACT)  # a backward pass yields every input direction at once
        return cls(tuple(names), tuple(per_basis), bool(exact), how, probes, int(seed), positions, batch_size,
                   context, chunk_budget_bytes, budget)

    def positions_of(self, hook: str) -> PositionSpec:
        if isinstance(self.positions, Mapping):
            return self.positions.get(hook)
        return self.positions

    @property
    def basis_names(self) -> list[str]:
        return [name for name, _ in self.bases]

    def kept_of(self, b: int, l: int) -> list[int]:
        """The kept directions (ascending) of basis ``b`` at node ``l``: all of them without a budget."""
        return list(self.kept[b][l]) if self.budget is not None else list(range(self.bases[b][1][l].k))

    def sides(self, b: int, l: int) -> tuple[list[int], list[int]]:
        """``(kept, rest)`` directions of basis ``b`` at node ``l``."""
        kept = self.kept_of(b, l)
        return kept, rest_of(kept, self.bases[b][1][l].k)

    def rest_by_probes(self, n_rest: int) -> bool:
        """Whether a rest of ``n_rest`` directions is estimated by probes (only where they save passes)."""
        b = self.budget
        return b is not None and b.rest is RestMode.PROBES and self.method is EdgeMethod.FORWARD and \
            n_rest > b.rest_probes

    def to_dict(self) -> dict[str, Any]:
        positions = ({h: describe_positions(p) for h, p in self.positions.items()}
                     if isinstance(self.positions, Mapping) else describe_positions(self.positions))
        out = {
            "pass": "interaction_edges", "nodes": list(self.nodes),
            "bases": {name: {l.hook: {"fingerprint": l.fingerprint(), "k": l.k,
                                      "scaling": getattr(l, "scaling", l.kind)}
                             for l in layers} for name, layers in self.bases},
            "mode": "exact" if self.exact else "probes", "method": self.method.value,
            "n_probes": None if self.exact else self.n_probes,
            "probe": None if self.exact else "rademacher over output positions",
            "seed": self.seed, "positions": positions, "batch_size": self.batch_size, "context": self.context,
        }
        if self.budget is not None:  # absent without one, so unbudgeted checkpoints keep their identity
            out["budget"] = self.budget.to_dict()
        return out

    # -- the stream plan -----------------------------------------------------------------------------
    def gated_hooks(self) -> list[str]:
        return list(self.nodes)

    def run_batch(self, model: HookedModel, batch: TokenBatch,
                  batch_index: int) -> dict[tuple[str, str], AdditiveAccumulator]:
        return edge_batch(model, batch, self, batch_index)


def _chunk_size(config: EdgeConfig, f_in: Tensor, width: int) -> int:
    """Cotangents per vmapped backward pass, from the memory budget (1 to ``width``)."""
    B, T = f_in.shape[:2]
    per = B * T * f_in.shape[-1] * (f_in.element_size() * 3 + 8)  # grads, graph temporaries, their float64 copy
    return int(max(1, min(width, _budget(config, f_in.device) // max(per, 1))))


def _budget(config: EdgeConfig, device: torch.device) -> int:
    budget = config.chunk_budget_bytes
    if device.type == "cuda":
        budget = max(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return budget


def jvp_bytes_per_pass(model: HookedModel, batch: int, positions: int, d_out: int, dtype: torch.dtype) -> int:
    """Memory one forward-mode pass adds to a vmapped call through one block (an estimate, on the high side).

    The tangents of a block's temporaries: attention scores and probabilities with the softmax
    rule's products (about three ``[heads, T, T]`` per sequence), the MLP's hidden layer (four
    ``d_mlp`` per token: pre, gate, activation, product) and a dozen ``d_model`` per token, plus the
    float64 output and its projection (measured on SmolLM2-135M at 512 tokens: ~37 MB a pass, this gives 57).
    """
    cfg = getattr(model, "cfg", None)
    d = int(getattr(cfg, "d_model", d_out) or d_out)
    heads = int(getattr(cfg, "n_heads", 1) or 1)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    elt = torch.empty((), dtype=dtype).element_size()
    return batch * positions * (elt * (3 * heads * positions + 4 * d_mlp + 10 * d) + 2 * 8 * d_out)


# -- the segment between two nodes, as a function for forward mode --------------------------------

Segment = Callable[[Tensor], Tensor]


def pair_block(model: HookedModel, source: str, target: str) -> int | None:
    """The block ``l`` when the pair is exactly block ``l`` (its ``resid_pre`` → the next residual node)."""
    l = layer_of(source)
    blocks = getattr(model, "blocks", None)
    if l is None or blocks is None or l >= len(blocks) or source != act_name("resid_pre", l):
        return None
    if target not in (act_name("resid_post", l), act_name("resid_pre", l + 1)):
        return None
    return l if act_name("resid_post", l) in model.hook_dict else None


def block_segment(model: HookedModel, l: int, source: str, call: tuple[tuple, dict]) -> Segment:
    """``x ↦ resid_post_l`` with ``resid_pre_l`` replaced by ``x``: block ``l`` called alone, with the
    arguments (mask, positions, rotary tables) the model passed it. No cache is read or written."""
    args, kwargs = call
    kwargs = dict(kwargs)
    for key in ("past_key_values", "past_key_value", "cache", "past_kv_cache_entry"):
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    block, post = model.blocks[l], act_name("resid_post", l)

    def run(x: Tensor) -> Tensor:
        got: dict[str, Tensor] = {}

        def replace_input(act: Tensor, hook: Any) -> Tensor:
            return x

        def capture(act: Tensor, hook: Any) -> Tensor:
            got["y"] = act
            return act

        with model.hooks(fwd_hooks=[(source, replace_input), (post, capture)]):
            block(*args, **kwargs)
        if "y" not in got:
            raise RuntimeError(f"{post!r} did not fire when block {l} was called alone")
        return got["y"]

    return run


def model_segment(model: HookedModel, tokens: Tensor, kwargs: dict[str, Any], source: str, target: str) -> Segment:
    """``x ↦ f_target`` with ``f_source`` replaced by ``x``, through the whole model up to ``target``."""
    partner = bridge_resid_mid_partner(model, source)  # the bridge's resid_mid skip path (see basis/splice.py)

    def run(x: Tensor) -> Tensor:
        delta: dict[str, Tensor] = {}

        def replace_input(act: Tensor, hook: Any) -> Tensor:
            delta["x"] = x - act
            return x

        carry = [] if partner is None else [(partner, lambda act, hook: act + delta["x"])]
        return output_at(model, tokens, target, kwargs, before=[(source, replace_input)], untracked=carry)

    return run


# (model, pair, shape) whose block segment has been checked against the model segment off the data point
_CHECKED: weakref.WeakKeyDictionary[Any, set[tuple[str, str, tuple[int, ...]]]] = weakref.WeakKeyDictionary()


def _close(a: Tensor, b: Tensor) -> bool:
    scale = float(b.abs().max()) or 1.0
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e3 * torch.finfo(b.dtype).eps * scale


def pair_segment(model: HookedModel, tokens: Tensor, kwargs: dict[str, Any], source: str, target: str,
                 f_in: Tensor, f_out: Tensor, call: tuple[tuple, dict] | None) -> tuple[Segment, str]:
    """The fastest segment that reproduces the model's, and its kind ("block" or "model").

    The block alone is used when it reproduces ``f_out`` from ``f_in`` (every batch) and, once per
    model, pair and shape, agrees with the whole model on a perturbed input: a replacement that did not
    reach the block's computation would pass the first check but not the second.
    """
    full = model_segment(model, tokens, kwargs, source, target)
    l = pair_block(model, source, target)
    if l is None or call is None:
        return full, "model"
    segment = block_segment(model, l, source, call)
    base = f_in.detach()
    with torch.no_grad():
        if not _close(segment(base), f_out.detach()):
            return full, "model"
        key = (source, target, tuple(base.shape))
        if key not in _CHECKED.setdefault(model, set()):
            gen = torch.Generator(device=base.device).manual_seed(0)
            x = base + 0.1 * base.std() * torch.randn(base.shape, generator=gen, device=base.device, dtype=base.dtype)
            if not _close(segment(x), full(x)):
                return full, "model"
            _CHECKED[model].add(key)
    return segment, "block"


# -- one layer pair ---------------------------------------------------------------------------------

def pair_edges_backward(f_out: Tensor, f_in: Tensor, out_layers: list[Basis], in_layers: list[Basis],
                        out_mask: Tensor, in_mask: Tensor, config: EdgeConfig, batch_index: int,
                        pair_index: int, limit: int | None = None) -> list[EdgeAccumulator]:
    """``Σ_x Σ_t a²`` for one layer pair in every basis, from the live graph between ``f_in`` and ``f_out``.

    The pull-back is linear in the cotangent, so the backward passes are taken once, along the
    output's own coordinates ``e_a`` (``d_out`` per position or probe), and every basis's output
    direction ``C_out[i] = Σ_a C_out[i, a] e_a`` is a combination of them: one set of passes serves
    all bases. Returns the full matrices (``edge_batch`` contracts them to a budget). ``limit``: stop after
    that many passes (the cost estimate's calibration; the sums are then partial).
    """
    f64 = torch.float64
    B, T = out_mask.shape
    d_out = f_out.shape[-1]
    mask_in = in_mask.to(f64)[..., None]
    # per input basis: C_in⁺ and the coordinates f̂_in (padding attributes nothing)
    pulls = [(require_linear(layer, "edges").C_pinv.to(device=f_in.device, dtype=f64),
              layer.encode(f_in.detach().to(f64)) * mask_in) for layer in in_layers]
    C_outs = [require_linear(layer, "edges").C.to(device=f_out.device, dtype=f64) for layer in out_layers]
    E = [torch.zeros(C.shape[0], P.shape[1], dtype=f64, device=f_in.device) for C, (P, _) in zip(C_outs, pulls)]
    # what the cotangent looks like along the positions: one output position (exact) or Rademacher signs
    if config.method is EdgeMethod.BACKWARD:
        outer = [(1.0, t) for t in torch.nonzero(out_mask.any(0)).flatten().tolist()]
        signs = None
    else:
        gen = batch_generator(config.seed * 7919 + pair_index, batch_index, f_out.device)
        signs = torch.randint(0, 2, (config.n_probes, B, T), generator=gen, device=f_out.device,
                              dtype=f_out.dtype).mul_(2).sub_(1) * out_mask.to(f_out.dtype)
        outer = [(1.0 / config.n_probes, p) for p in range(config.n_probes)]
    size = _chunk_size(config, f_in, d_out * len(outer))
    if limit is not None:
        outer = outer[:max(1, math.ceil(limit / d_out))]
    per_group = max(1, size // d_out)  # whole outer items per group, so H stays [group, d_out, B, k_in]
    eye = torch.eye(d_out, dtype=f_out.dtype, device=f_out.device)
    for g0 in range(0, len(outer), per_group):
        group = outer[g0:g0 + per_group]
        if signs is None:
            along = torch.zeros(len(group), B, T, dtype=f_out.dtype, device=f_out.device)
            along[torch.arange(len(group)), :, [t for _, t in group]] = 1.0
            row_weight = out_mask[:, [t for _, t in group]].T.to(f64)  # [g, B]: padded output positions count 0
        else:
            along, row_weight = signs[[p for _, p in group]], None
        items = [(gi, a) for gi in range(len(group)) for a in range(d_out)]
        H = [torch.zeros(len(group), d_out, B, P.shape[1], dtype=f64, device=f_in.device) for P, _ in pulls]
        for start in range(0, len(items) if limit is None else min(len(items), limit), size):
            chunk = items[start:start + size if limit is None else min(start + size, limit)]
            gi = torch.tensor([i for i, _ in chunk], device=f_out.device)
            ai = torch.tensor([a for _, a in chunk], device=f_out.device)
            cotangents = along[gi][..., None] * eye[ai][:, None, None, :]  # [c, B, T, d_out]
            (grads,) = batched_vjp(f_out, [f_in], cotangents)
            if grads is None:
                raise RuntimeError(f"node {out_layers[0].hook!r} does not depend on {in_layers[0].hook!r}: order "
                                   "the nodes forward, each after the one before")
            g = grads.to(f64)
            for h, (P, f_hat) in zip(H, pulls):
                # ∂(e_a·f_out)/∂f̂_in_j(t') · f̂_in_j(t'), summed over the input positions t'
                h[gi, ai] = torch.einsum("cbtd,dk,btk->cbk", g, P, f_hat)
        weights = torch.tensor([w for w, _ in group], dtype=f64, device=f_in.device)
        for acc, C, h in zip(E, C_outs, H):
            sq = torch.einsum("ia,gabk->gibk", C, h).square()  # a_ij per sequence, for every output direction i
            if row_weight is None:
                acc += torch.einsum("gibk,g->ik", sq, weights)
            else:
                acc += torch.einsum("gibk,gb,g->ik", sq, row_weight, weights)
    n = out_mask.sum().to(torch.int64).reshape(())
    return [EdgeAccumulator({"E": e, "n": n.clone()}) for e in E]


@dataclass
class _Job:
    """One forward-mode pass: basis ``b``, a direction ``j`` or a rest probe ``p``, into column ``col``."""

    b: int
    col: int
    weight: float
    direction: int | None = None
    probe: int | None = None


def forward_jobs(config: EdgeConfig, l: int) -> list[_Job]:
    """Every forward-mode pass of pair ``l``, basis by basis: kept directions, then the rest's."""
    jobs = []
    for b in range(len(config.bases)):
        kept, rest = config.sides(b, l)
        jobs += [_Job(b, c, 1.0, direction=j) for c, j in enumerate(kept)]
        if rest and config.rest_by_probes(len(rest)):
            S = config.budget.rest_probes  # type: ignore[union-attr]
            jobs += [_Job(b, len(kept), 1.0 / S, probe=p) for p in range(S)]
        else:
            jobs += [_Job(b, len(kept), 1.0, direction=j) for j in rest]
    return jobs


def forward_chunk(model: HookedModel, config: EdgeConfig, f_in: Tensor, d_out: int, n_jobs: int) -> int:
    """Passes per vmapped call: the memory budget over ``jvp_bytes_per_pass`` (1 to ``n_jobs``)."""
    B, T = f_in.shape[:2]
    per = jvp_bytes_per_pass(model, B, T, d_out, f_in.dtype)
    return int(max(1, min(n_jobs, _budget(config, f_in.device) // max(per, 1))))


@dataclass
class _BasisPlan:
    """One basis's part of a forward-mode pair: its maps, coordinates, sides and running sums."""

    P: Tensor  # C_in⁺, float64 [d_in, k_in]
    f_hat: Tensor  # the input coordinates (padding zeroed), float64 [B, T, k_in]
    C_out: Tensor  # float64 [k_out, d_out]
    kept_out: list[int]
    rest_out: list[int]
    rest_in: list[int]
    E: Tensor  # [kept_out (+ rest row), kept_in (+ rest column)]
    signs: Tensor | None = None  # rest probes' signs [S, B, |R|]
    probe_mass: Tensor | None = None  # each rest probe's total [S]

    def tangent(self, job: _Job) -> Tensor:
        """``δf_in`` of one pass: ``C⁺[:, j] f̂_j`` at every position, or a signed sum over the rest."""
        if job.direction is not None:
            return torch.einsum("d,bt->btd", self.P[:, job.direction], self.f_hat[..., job.direction])
        assert self.signs is not None and job.probe is not None
        signed = self.f_hat[..., self.rest_in] * self.signs[job.probe][:, None, :]  # [B, T, |R|]
        return signed @ self.P[:, self.rest_in].T  # one product: a three-way einsum would expand [B, T, d, |R|]


def pair_edges_forward(model: HookedModel, segment: Segment, f_in: Tensor, out_layers: list[Basis],
                       in_layers: list[Basis], out_mask: Tensor, in_mask: Tensor, config: EdgeConfig,
                       l: int, batch_index: int, limit: int | None = None
                       ) -> tuple[list[EdgeAccumulator], list[RestProbeAccumulator | None]]:
    """Pair ``l`` (node ``l`` → ``l+1``) by forward mode, every basis's passes pooled into vmapped chunks.

    A pass along input direction ``j`` gives ``δf_out`` at every output position; its projection
    ``a = C_out δf_out`` fills column ``j`` for the kept output directions and, summed over the rest
    of the output directions, the rest row. Rest columns are filled as ``forward_jobs`` says (module
    docstring). Returns one edge accumulator per basis, and the rest probes' totals where probes ran.
    ``limit``: only the first that many passes (the cost estimate's calibration; the sums are then partial).
    """
    from torch.func import jvp, vmap

    f64 = torch.float64
    base = f_in.detach()
    dev = base.device
    B = in_mask.shape[0]
    out_w = out_mask.to(f64)
    n = out_mask.sum().to(torch.int64).reshape(())
    jobs = forward_jobs(config, l)
    plans = []
    size = forward_chunk(model, config, base, out_layers[0].d, len(jobs))
    for b, (out_layer, in_layer) in enumerate(zip(out_layers, in_layers)):
        (kept_in, rest_in), (kept_out, rest_out) = config.sides(b, l), config.sides(b, l + 1)
        plan = _BasisPlan(
            P=require_linear(in_layer, "edges").C_pinv.to(device=dev, dtype=f64),
            f_hat=in_layer.encode(base.to(f64)) * in_mask.to(f64)[..., None],  # padding attributes nothing
            C_out=require_linear(out_layer, "edges").C.to(device=dev, dtype=f64),
            kept_out=kept_out, rest_out=rest_out, rest_in=rest_in,
            E=torch.zeros(len(kept_out) + bool(rest_out), len(kept_in) + bool(rest_in), dtype=f64, device=dev))
        if any(job.b == b and job.probe is not None for job in jobs):
            # one sign per (probe, sequence, rest direction), shared by the positions: a_tij sums over them
            S = config.budget.rest_probes  # type: ignore[union-attr]
            gen = batch_generator((config.seed * 7919 + l) * 101 + b + 1, batch_index, dev)
            plan.signs = torch.randint(0, 2, (S, B, len(rest_in)), generator=gen, device=dev,
                                       dtype=f64).mul_(2).sub_(1)
            plan.probe_mass = torch.zeros(S, dtype=f64, device=dev)
        plans.append(plan)

    def tangent_out(t: Tensor) -> Tensor:
        return jvp(segment, (base,), (t,))[1]

    if limit is not None:
        jobs = jobs[:limit]
    for start in range(0, len(jobs), size):
        chunk = jobs[start:start + size]
        tangents = torch.stack([plans[job.b].tangent(job) for job in chunk]).to(base.dtype)
        dy = vmap(tangent_out)(tangents).to(f64)  # [c, B, T, d_out]
        for b, plan in enumerate(plans):
            at = [i for i, job in enumerate(chunk) if job.b == b]
            if not at:
                continue
            group = [chunk[i] for i in at]
            a = torch.einsum("ia,cbta->cbti", plan.C_out, dy[at[0]:at[-1] + 1])  # jobs are basis by basis
            s = torch.einsum("cbti,bt->ci", a.square(), out_w)  # Σ_(x,t) a² for every output direction
            rows = torch.cat([s[:, plan.kept_out]] + ([s[:, plan.rest_out].sum(1, keepdim=True)]
                                                      if plan.rest_out else []), 1)
            cols = torch.tensor([job.col for job in group], device=dev)
            weights = torch.tensor([job.weight for job in group], dtype=f64, device=dev)
            plan.E.index_add_(1, cols, (rows * weights[:, None]).T)
            if plan.probe_mass is not None:
                for job, total in zip(group, s.sum(1)):
                    if job.probe is not None:
                        plan.probe_mass[job.probe] += total
    edges = [EdgeAccumulator({"E": plan.E, "n": n.clone()}) for plan in plans]
    probes = [None if plan.probe_mass is None else RestProbeAccumulator({"mass": plan.probe_mass}) for plan in plans]
    return edges, probes


# -- one batch --------------------------------------------------------------------------------------

def capture_nodes(model: HookedModel, tokens: Tensor, kwargs: dict[str, Any], config: EdgeConfig
                  ) -> tuple[dict[str, Tensor], dict[int, tuple[tuple, dict]]]:
    """The nodes' activations, and for forward mode the arguments of every block that is a whole pair
    (keyed by the pair's index)."""
    captured: dict[str, Tensor] = {}
    calls: dict[int, tuple[tuple, dict]] = {}

    def capture(name: str):
        def hook(act: Tensor, hook: Any) -> Tensor:
            captured[name] = act
            return act  # the same tensor flows on, so gradients reach it (see batch_pass)

        return hook

    handles = []
    if config.method is EdgeMethod.FORWARD:
        for pair, (source, target) in enumerate(zip(config.nodes[:-1], config.nodes[1:])):
            block = pair_block(model, source, target)
            if block is not None:
                def pre(module: Any, args: tuple, kw: dict, pair: int = pair) -> None:
                    calls[pair] = (args, kw)

                handles.append(model.blocks[block].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        forward_until(model, tokens, kwargs, [(n, capture(n)) for n in config.nodes], stop_early=True)
    finally:
        for h in handles:
            h.remove()
    return captured, calls


def edge_batch(model: HookedModel, batch: TokenBatch, config: EdgeConfig,
               batch_index: int) -> dict[tuple[str, str], AdditiveAccumulator]:
    """One batch's contribution to every edge matrix of every basis."""
    device = model_device(model)
    tokens = to_device(batch.tokens, device)
    kwargs: dict[str, Any] = {}
    attention_mask = None
    if batch.attention_mask is not None:
        attention_mask = batch.attention_mask.to(device)
        kwargs["attention_mask"] = attention_mask
    B, T = tokens.shape
    forward = config.method is EdgeMethod.FORWARD
    out: dict[tuple[str, str], AdditiveAccumulator] = {}
    with ExitStack() as stack:
        if forward:  # forward mode re-runs each segment: no graph needed here
            stack.enter_context(torch.no_grad())
        else:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(ParamsRequireGrad(model))
        captured, calls = capture_nodes(model, tokens, kwargs, config)
        masks = {h: position_mask(config.positions_of(h), B, T, attention_mask, device=device) for h in config.nodes}
        in_mask = position_mask(None, B, T, attention_mask, device=device)
        pairs = list(zip(config.nodes[:-1], config.nodes[1:]))
        bar = stack.enter_context(tqdm(total=len(pairs), desc=f"batch {batch_index}: layer pairs", leave=False,
                                       disable=not config.pair_progress, dynamic_ncols=True))
        for l, (source, target) in enumerate(pairs):
            f_in, f_out = captured[source], captured[target]
            if f_in.ndim != 3 or f_out.ndim != 3:
                raise ValueError(f"edge nodes must be [batch, pos, d] activations; {source!r} or {target!r} is not "
                                 "(use residual-stream or MLP hook points)")
            for name, layers in config.bases:
                if layers[l].d != f_in.shape[-1] or layers[l + 1].d != f_out.shape[-1]:
                    raise ValueError(f"basis {name!r} at {source!r}/{target!r} has d={layers[l].d}/{layers[l + 1].d}, "
                                     f"the activations {f_in.shape[-1]}/{f_out.shape[-1]}: fitted on another model?")
            outs, ins = [layers[l + 1] for _, layers in config.bases], [layers[l] for _, layers in config.bases]
            probes: list[RestProbeAccumulator | None] = [None] * len(outs)
            if forward:
                segment, _ = pair_segment(model, tokens, kwargs, source, target, f_in, f_out, calls.get(l))
                accs, probes = pair_edges_forward(model, segment, f_in, outs, ins, masks[target], in_mask, config, l,
                                                  batch_index)
            else:
                accs = pair_edges_backward(f_out, f_in, outs, ins, masks[target], in_mask, config, batch_index, l)
                if config.budget is not None:
                    accs = [EdgeAccumulator({"E": contract(acc.tensors["E"], config.kept_of(b, l + 1),
                                                           config.kept_of(b, l)), "n": acc.tensors["n"]})
                            for b, acc in enumerate(accs)]
            if not all(bool(torch.isfinite(acc.tensors["E"]).all()) for acc in accs):
                raise NonFiniteError(f"non-finite edges in batch {batch_index} between {source!r} and {target!r}: "
                                     "the model produced inf/NaN activations")
            for (name, _), acc, probe in zip(config.bases, accs, probes):
                out[(f"{EDGES}:{name}", pair_name(source, target))] = acc
                if probe is not None:
                    out[(f"{REST_PROBES}:{name}", pair_name(source, target))] = probe
            bar.update(1)
    return out


def graphs_from_stats(stats: Stats, config: EdgeConfig) -> dict[str, InteractionGraph]:
    """The per-basis ``InteractionGraph`` of a finished (or checkpointed) edge pass."""
    graphs = {}
    pairs = [pair_name(a, b) for a, b in zip(config.nodes[:-1], config.nodes[1:])]
    for b, (name, layers) in enumerate(config.bases):
        accs = [stats.accumulators[(f"{EDGES}:{name}", p)] for p in pairs]
        probes = [stats.accumulators.get((f"{REST_PROBES}:{name}", p)) for p in pairs]
        meta: dict[str, Any] = {"run": stats.run.to_dict() if stats.run else None, "n_tokens": stats.n_tokens,
                                "scalings": [getattr(l, "scaling", l.kind) for l in layers]}
        directions, rest = None, None
        if config.budget is not None:
            directions = [config.kept_of(b, l) for l in range(len(config.nodes))]
            rest = [len(config.sides(b, l)[1]) for l in range(len(config.nodes))]
            meta["budget"] = config.budget.to_dict()
            meta["rest_estimate"] = ["none" if not rest[l] else "probes" if p is not None else "exact"
                                     for l, p in enumerate(probes)]
            meta["rest_rel_stderr"] = [p.rel_stderr() if isinstance(p, RestProbeAccumulator) else None
                                       for p in probes]
        graphs[name] = InteractionGraph(
            basis=name, nodes=list(config.nodes), edges=[acc.edges.cpu() for acc in accs],  # type: ignore[attr-defined]
            n_datapoints=[int(acc.tensors["n"]) for acc in accs], meta=meta, directions=directions,
            rest=rest or [])
    return graphs


# -- what a pass will cost --------------------------------------------------------------------------

@dataclass(frozen=True)
class EdgeCost:
    """Passes, FLOPs, memory and projected time of an edge pass (``estimate_edge_cost``).

    ``seconds_per_pass``: measured on a calibration chunk at the first and the last pair (None
    without calibration); pairs between are interpolated (the model prefix a non-block segment
    reruns grows with depth). ``flops_per_pass`` and ``flops_per_chunk``: counted by
    ``torch.utils.flop_counter`` on the same pairs (matrix products only).
    """

    method: str
    n_pairs: int
    bases: tuple[str, ...]
    batch_shape: tuple[int, int]
    n_batches: int
    passes: tuple[int, ...]  # per pair, one batch, all bases
    chunk: int  # passes per vmapped call
    chunk_bytes: int  # estimated memory of one call's pass temporaries
    segments: tuple[str, ...]  # per pair: "block" (the block alone) or "model" (the prefix rerun)
    flops_per_batch: float | None = None
    seconds_per_batch: float | None = None
    calibration: str = ""
    load_average: tuple[float, ...] = ()

    @property
    def total_passes(self) -> int:
        return sum(self.passes) * self.n_batches

    @property
    def total_flops(self) -> float | None:
        return None if self.flops_per_batch is None else self.flops_per_batch * self.n_batches

    @property
    def total_seconds(self) -> float | None:
        return None if self.seconds_per_batch is None else self.seconds_per_batch * self.n_batches

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n_pairs": self.n_pairs, "bases": list(self.bases),
                "batch_shape": list(self.batch_shape), "n_batches": self.n_batches, "passes": list(self.passes),
                "total_passes": self.total_passes, "chunk": self.chunk, "chunk_bytes": self.chunk_bytes,
                "segments": list(self.segments), "flops": self.total_flops, "seconds": self.total_seconds,
                "calibration": self.calibration, "load_average": list(self.load_average)}

    def describe(self) -> str:
        kind = "forward-mode passes (JVPs)" if self.method == "forward" else "backward passes (VJPs)"
        B, T = self.batch_shape
        blocks = sum(s == "block" for s in self.segments)
        text = (f"edge pass: {self.n_pairs} layer pairs x {len(self.bases)} bases ({', '.join(self.bases)}); "
                f"{self.total_passes:,} {kind} = {self.n_batches} batch(es) of {B} x {T} tokens x {sum(self.passes):,} "
                f"({min(self.passes):,}-{max(self.passes):,} per pair), vmapped {self.chunk} at a time "
                f"(~{self.chunk_bytes / 2**30:.2f} GiB each); {blocks} of {self.n_pairs} pairs run their block alone")
        if self.total_flops is not None:
            text += f"; ~{self.total_flops / 1e12:.3g} TFLOP"
        if self.total_seconds is not None:
            text += f"; projected {_duration(self.total_seconds)} ({self.calibration})"
        return text


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def pass_counts(config: EdgeConfig, positions: int, d_outs: Sequence[int]) -> list[int]:
    """Passes per pair for one batch of ``positions`` output positions (``d_outs``: output widths)."""
    if config.method is EdgeMethod.FORWARD:
        return [len(forward_jobs(config, l)) for l in range(len(config.nodes) - 1)]
    outer = positions if config.method is EdgeMethod.BACKWARD else config.n_probes
    return [outer * d for d in d_outs]


def estimate_edge_cost(model: HookedModel, config: EdgeConfig, batch_shape: tuple[int, int], n_batches: int,
                       *, calibrate: bool = True, seed: int = 0) -> EdgeCost:
    """What the edge pass of ``config`` over ``n_batches`` batches of ``batch_shape`` will cost.

    Counts come from the config; with ``calibrate``, one chunk of passes is run and timed at the
    first and the last pair on random token ids of that shape (the cost does not depend on the
    tokens) and the FLOPs of one and two passes counted there, so a run is projected before it starts.
    """
    B, T = (positive_int(v, "batch shape") for v in batch_shape)
    positive_int(n_batches, "n_batches")
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    d_outs = [layers[l + 1].d for l in range(len(config.nodes) - 1) for _, layers in config.bases[:1]]
    passes = pass_counts(config, T, d_outs)
    forward = config.method is EdgeMethod.FORWARD
    probe = torch.empty(B, T, d_outs[0], dtype=dtype, device=device)
    if forward:
        chunk = forward_chunk(model, config, probe, max(d_outs), max(passes))
        per = jvp_bytes_per_pass(model, B, T, max(d_outs), dtype)
    else:
        chunk = _chunk_size(config, probe, max(passes))
        per = B * T * d_outs[0] * (probe.element_size() * 3 + 8)
    segments = tuple("block" if forward and pair_block(model, a, b) is not None else "model"
                     for a, b in zip(config.nodes[:-1], config.nodes[1:]))
    cost = EdgeCost(config.method.value, len(passes), tuple(config.basis_names), (B, T), n_batches, tuple(passes),
                    chunk, chunk * per, segments)
    if not calibrate:
        return cost
    vocab = int(getattr(getattr(model, "cfg", None), "d_vocab", 0) or 0)
    if vocab <= 0:
        return cost
    tokens = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)
    capture, measured = _calibrate(model, config, tokens, chunk, passes)
    first, last = measured[0], measured[len(passes) - 1]
    seconds, flops = capture, 0.0
    for l, n_pass in enumerate(passes):
        w = l / (len(passes) - 1) if len(passes) > 1 else 0.0  # linear in depth between the two measured pairs
        seconds += n_pass * ((1 - w) * first.seconds_per_pass + w * last.seconds_per_pass)
        flops += n_pass * ((1 - w) * first.flops_per_pass + w * last.flops_per_pass)
        flops += math.ceil(n_pass / chunk) * ((1 - w) * first.flops_per_call + w * last.flops_per_call)
    how = (f"timed: {chunk} passes at the first and the last pair, {first.chunk_seconds:.2f} s and "
           f"{last.chunk_seconds:.2f} s, on {torch.get_num_threads()} threads, load average "
           f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return replace(cost, flops_per_batch=flops, seconds_per_batch=seconds, calibration=how,
                   load_average=tuple(round(x, 2) for x in os.getloadavg()))


@dataclass(frozen=True)
class _Measured:
    """One pair's calibration: seconds and FLOPs per pass, FLOPs per call beyond them, the chunk's seconds."""

    seconds_per_pass: float
    flops_per_pass: float
    flops_per_call: float
    chunk_seconds: float


def _calibrate(model: HookedModel, config: EdgeConfig, tokens: Tensor, chunk: int,
               passes: Sequence[int]) -> tuple[float, dict[int, _Measured]]:
    """The capture forward's seconds, and a ``_Measured`` at the first and the last pair: the pass's own
    code (``limit``) on the first one and two passes (FLOPs) and on one full chunk (seconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    forward = config.method is EdgeMethod.FORWARD
    last = len(config.nodes) - 2
    B, T = tokens.shape
    mask = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
    out: dict[int, _Measured] = {}
    with ExitStack() as stack:
        if forward:
            stack.enter_context(torch.no_grad())
        else:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(ParamsRequireGrad(model))
        start = time.perf_counter()
        captured, calls = capture_nodes(model, tokens, {}, config)
        capture = time.perf_counter() - start
        for l in sorted({0, last}):
            source, target = config.nodes[l], config.nodes[l + 1]
            f_in, f_out = captured[source], captured[target]
            outs, ins = [layers[l + 1] for _, layers in config.bases], [layers[l] for _, layers in config.bases]
            run: Callable[[int], Any]
            if forward:
                segment, _ = pair_segment(model, tokens, {}, source, target, f_in, f_out, calls.get(l))
                run = partial(pair_edges_forward, model, segment, f_in, outs, ins, mask, mask, config, l, 0)
            else:
                run = partial(pair_edges_backward, f_out, f_in, outs, ins, mask, mask, config, 0, l)
            counts = []
            for c in (1, 2):
                with FlopCounterMode(display=False) as counter:
                    run(limit=c)
                counts.append(counter.get_total_flops())
            per_pass = max(counts[1] - counts[0], 0)
            c = min(chunk, passes[l])
            start = time.perf_counter()
            run(limit=c)
            if tokens.device.type == "cuda":
                torch.cuda.synchronize(tokens.device)
            elapsed = time.perf_counter() - start
            out[l] = _Measured(elapsed / c, float(per_pass), float(max(counts[0] - per_pass, 0)), elapsed)
    return capture, out


def collect_edges(
    model: HookedModel,
    data: Any,
    bases: Mapping[str, InteractionBasis | Sequence[Basis]],
    nodes: HookSpec = None,
    *,
    exact: bool = False,
    n_probes: int | None = None,
    seed: int = 0,
    positions: PositionSpec | Mapping[str, PositionSpec] = None,
    batch_size: int = 8,
    context: int | None = None,
    method: EdgeMethod | str | None = None,
    budget: DirectionBudget | None = None,
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET,
    config: EdgeConfig | None = None,
    options: StreamOptions | None = None,
    **stream_options: Any,
) -> dict[str, InteractionGraph]:
    """Stream ``data`` and return the interaction graph in every basis of ``bases``.

    ``bases``: e.g. ``{"interaction": ib, "pca": pca, "standard": standard}`` (``node_bases``
    fits all three from one ``Stats``). ``nodes``: hook points in forward order (default the
    residual stream, ``residual_hooks(model)``). ``exact=True`` is exact (forward mode, one pass
    per input direction; ``method="backward"`` loops over output positions instead); otherwise
    ``n_probes`` (default 4) Rademacher probes over positions give an unbiased estimate.
    ``budget``: a ``DirectionBudget`` (top-k / mass per node, the rest in one vertex).
    ``chunk_budget_bytes``: memory for one vmapped call's pass temporaries.
    How the pass runs (``max_tokens``, checkpoints, resume, progress, ranks) is a ``StreamOptions``,
    as in ``collect``: ``options=`` or its fields as keywords.
    """
    if config is None:
        config = EdgeConfig.build(model, bases, nodes, exact=exact, n_probes=n_probes, seed=seed,
                                  positions=positions, batch_size=batch_size, context=context, method=method,
                                  budget=budget, chunk_budget_bytes=chunk_budget_bytes)
    run = StreamOptions.of(options, "collect_edges()", **stream_options)
    stats = stream(model, data, replace(config, pair_progress=run.progress), run, desc="edges")
    return graphs_from_stats(stats, config)


def node_bases(stats: Stats, nodes: Sequence[str], rtol: float | None = None,
               kinds: Sequence[str] = ("interaction", "pca", "standard")) -> dict[str, InteractionBasis]:
    """The bases edges are compared in, fitted at ``nodes`` from one ``Stats``: the interaction
    basis (needs ``M``), PCA of the activations, and the model's own coordinates (centred)."""
    return {k: InteractionBasis.fit_kind(k, stats, list(nodes), rtol=DEFAULT_RTOL if rtol is None else rtol)
            for k in kinds}
