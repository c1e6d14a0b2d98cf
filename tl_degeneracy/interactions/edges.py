"""The interaction graph's edges, streamed over data (docs/theory.md §6).

Between consecutive nodes ``l → l+1`` (hook points with bases ``C_l``, ``C_{l+1}``), for input
direction ``j`` and output direction ``i``:

    E_ij = 1/n Σ_x Σ_t ( Σ_t' ∂f̂^{l+1}_i(x,t)/∂f̂^l_j(x,t') · f̂^l_j(x,t') )²

``n`` counts the output node's datapoints; attention moves information across positions, so the
attribution sums over input positions ``t'`` inside the square. Every term is one vector-Jacobian
product: the cotangent ``C_{l+1}[i]`` at output position ``t`` (``f̂ = C (f − μ)`` is linear),
pulled back to ``f^l`` and carried into ``f̂^l`` by ``C_l⁺`` (``f^l = C_l⁺ f̂^l + μ`` on the span).

- **exact**: one cotangent per (output position, output coordinate), batched over the sequences.
- **probes**: one cotangent per (probe, output coordinate) with Rademacher signs ``r_t`` over the
  output positions; ``E[(Σ_t r_t a_t)²] = Σ_t a_t²`` because ``E[r_t r_s] = δ_ts``, so the
  estimate is unbiased and costs ``d_out × n_probes`` passes instead of ``d_out × positions``.
- The passes run along the output's own coordinates once and serve every basis (a pull-back is
  linear in its cotangent: ``C_out[i]`` is a combination of coordinate vectors).

Cotangents are chunked through one vmapped backward pass each (``is_grads_batched``), and autograd
only visits the graph between the two nodes (it prunes what does not lead to ``f^l``); the forward
stops once the last node has fired. Nodes should be cuts of the network (the residual stream):
then ``∂f^{l+1}/∂f^l`` is the whole dependence, not one path of several.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

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
from ..forward import ParamsRequireGrad, batched_vjp, forward_until, model_device, output_at, to_device
from ..generations import HookedModel
from ..hook_names import HookSpec, bridge_resid_mid_partner, residual_hooks, resolve_hooks
from ..linalg import DEFAULT_RTOL
from ..positions import PositionSpec, position_mask
from ..validation import one_of, positive_int
from .graph import InteractionGraph, pair_name

EDGES = "edges"
DEFAULT_CHUNK_BUDGET = 256 * 2**20


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


@dataclass(frozen=True)
class EdgeConfig:
    """One edge pass: nodes (forward order), the bases edges are taken in, and how.

    ``bases`` maps a basis name ("interaction", "pca", "standard", ...) to one affine basis per
    node (``basis.protocol.LinearMaps``: edges are defined through ``C`` and ``C⁺``). ``positions``:
    the datapoints of each *output* node (one spec, or ``{hook: spec}``); inputs always sum over every
    (unpadded) position. ``to_dict()`` is the run identity: resuming with other bases (by fingerprint) or
    options is refused.
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

    @classmethod
    def build(cls, model: HookedModel, bases: Mapping[str, InteractionBasis | Sequence[Basis]],
              nodes: HookSpec = None, *, exact: bool = False, n_probes: int | None = None, seed: int = 0,
              positions: PositionSpec | Mapping[str, PositionSpec] = None, batch_size: int = 8,
              context: int | None = None, chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET,
              method: EdgeMethod | str | None = None) -> EdgeConfig:
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
        return cls(tuple(names), tuple(per_basis), bool(exact), how, probes, int(seed), positions, batch_size,
                   context, chunk_budget_bytes)

    def positions_of(self, hook: str) -> PositionSpec:
        if isinstance(self.positions, Mapping):
            return self.positions.get(hook)
        return self.positions

    @property
    def basis_names(self) -> list[str]:
        return [name for name, _ in self.bases]

    def to_dict(self) -> dict[str, Any]:
        positions = ({h: describe_positions(p) for h, p in self.positions.items()}
                     if isinstance(self.positions, Mapping) else describe_positions(self.positions))
        return {
            "pass": "interaction_edges", "nodes": list(self.nodes),
            "bases": {name: {l.hook: {"fingerprint": l.fingerprint(), "k": l.k,
                                      "scaling": getattr(l, "scaling", l.kind)}
                             for l in layers} for name, layers in self.bases},
            "mode": "exact" if self.exact else "probes", "method": self.method.value,
            "n_probes": None if self.exact else self.n_probes,
            "probe": None if self.exact else "rademacher over output positions",
            "seed": self.seed, "positions": positions, "batch_size": self.batch_size, "context": self.context,
        }

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
    budget = config.chunk_budget_bytes
    if f_in.device.type == "cuda":
        budget = max(budget, torch.cuda.mem_get_info(f_in.device)[0] // 4)
    return int(max(1, min(width, budget // max(per, 1))))


def pair_edges_backward(f_out: Tensor, f_in: Tensor, out_layers: list[Basis], in_layers: list[Basis],
                        out_mask: Tensor, in_mask: Tensor, config: EdgeConfig, batch_index: int,
                        pair_index: int) -> list[EdgeAccumulator]:
    """``Σ_x Σ_t a²`` for one layer pair in every basis, from the live graph between ``f_in`` and ``f_out``.

    The pull-back is linear in the cotangent, so the backward passes are taken once, along the
    output's own coordinates ``e_a`` (``d_out`` per position or probe), and every basis's output
    direction ``C_out[i] = Σ_a C_out[i, a] e_a`` is a combination of them: one set of passes serves
    all bases.
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
        H = [torch.empty(len(group), d_out, B, P.shape[1], dtype=f64, device=f_in.device) for P, _ in pulls]
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
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


def pair_edges_forward(model: HookedModel, tokens: Tensor, kwargs: dict[str, Any], source: str,
                                target: str, f_in: Tensor, out_layers: list[Basis], in_layers: list[Basis],
                                out_mask: Tensor, in_mask: Tensor, config: EdgeConfig) -> list[EdgeAccumulator]:
    """Exact ``Σ_x Σ_t a²`` by forward mode: ``a_tij`` for all ``i, t`` is the change of ``f̂_out(t)`` along
    the tangent ``δf_in(t') = C_in⁺[:, j] f̂_in_j(t')`` (every input position at once)."""
    from torch.func import jvp, vmap

    f64 = torch.float64
    partner = bridge_resid_mid_partner(model, source)  # the bridge's resid_mid skip path (see basis/splice.py)
    base = f_in.detach()

    def segment(x: Tensor) -> Tensor:
        delta: dict[str, Tensor] = {}

        def replace(act: Tensor, hook: Any) -> Tensor:
            delta["x"] = x - act
            return x

        carry = [] if partner is None else [(partner, lambda act, hook: act + delta["x"])]
        return output_at(model, tokens, target, kwargs, before=[(source, replace)], untracked=carry)

    def tangent_out(t: Tensor) -> Tensor:
        return jvp(segment, (base,), (t,))[1]

    out_w = out_mask.to(f64)
    n = out_mask.sum().to(torch.int64).reshape(())
    accs = []
    for out_layer, in_layer in zip(out_layers, in_layers):
        P = require_linear(in_layer, "edges").C_pinv.to(device=base.device, dtype=f64)
        f_hat = in_layer.encode(base.to(f64)) * in_mask.to(f64)[..., None]  # padding attributes nothing
        C_out = require_linear(out_layer, "edges").C.to(device=base.device, dtype=f64)
        E = torch.zeros(C_out.shape[0], P.shape[1], dtype=f64, device=base.device)
        size = _chunk_size(config, base, P.shape[1])
        for start in range(0, P.shape[1], size):
            cols = slice(start, start + size)
            tangents = torch.einsum("dj,btj->jbtd", P[:, cols], f_hat[..., cols]).to(base.dtype)
            dy = vmap(tangent_out)(tangents).to(f64)  # [c, B, T, d_out]
            a = torch.einsum("ia,jbta->jbti", C_out, dy)
            E[:, cols] = torch.einsum("jbti,bt->ij", a.square(), out_w)
        accs.append(EdgeAccumulator({"E": E, "n": n.clone()}))
    return accs


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
    captured: dict[str, Tensor] = {}

    def capture(name: str):
        def hook(act: Tensor, hook: Any) -> Tensor:
            captured[name] = act
            return act  # the same tensor flows on, so gradients reach it (see batch_pass)

        return hook

    out: dict[tuple[str, str], AdditiveAccumulator] = {}
    with ExitStack() as stack:
        if config.method is EdgeMethod.FORWARD:  # forward mode re-runs each segment: no graph needed here
            stack.enter_context(torch.no_grad())
        else:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(ParamsRequireGrad(model))
        forward_until(model, tokens, kwargs, [(n, capture(n)) for n in config.nodes], stop_early=True)
        masks = {h: position_mask(config.positions_of(h), B, T, attention_mask, device=device) for h in config.nodes}
        in_mask = position_mask(None, B, T, attention_mask, device=device)
        for l, (source, target) in enumerate(zip(config.nodes[:-1], config.nodes[1:])):
            f_in, f_out = captured[source], captured[target]
            if f_in.ndim != 3 or f_out.ndim != 3:
                raise ValueError(f"edge nodes must be [batch, pos, d] activations; {source!r} or {target!r} is not "
                                 "(use residual-stream or MLP hook points)")
            for name, layers in config.bases:
                if layers[l].d != f_in.shape[-1] or layers[l + 1].d != f_out.shape[-1]:
                    raise ValueError(f"basis {name!r} at {source!r}/{target!r} has d={layers[l].d}/{layers[l + 1].d}, "
                                     f"the activations {f_in.shape[-1]}/{f_out.shape[-1]}: fitted on another model?")
            outs, ins = [layers[l + 1] for _, layers in config.bases], [layers[l] for _, layers in config.bases]
            if config.method is EdgeMethod.FORWARD:
                accs = pair_edges_forward(model, tokens, kwargs, source, target, f_in, outs, ins,
                                                   masks[target], in_mask, config)
            else:
                accs = pair_edges_backward(f_out, f_in, outs, ins, masks[target], in_mask, config,
                                                    batch_index, l)
            if not all(bool(torch.isfinite(acc.tensors["E"]).all()) for acc in accs):
                raise NonFiniteError(f"non-finite edges in batch {batch_index} between {source!r} and {target!r}: "
                                     "the model produced inf/NaN activations")
            for (name, _), acc in zip(config.bases, accs):
                out[(f"{EDGES}:{name}", pair_name(source, target))] = acc
    return out


def graphs_from_stats(stats: Stats, config: EdgeConfig) -> dict[str, InteractionGraph]:
    """The per-basis ``InteractionGraph`` of a finished (or checkpointed) edge pass."""
    graphs = {}
    for name, layers in config.bases:
        accs = [stats.accumulators[(f"{EDGES}:{name}", pair_name(a, b))]
                for a, b in zip(config.nodes[:-1], config.nodes[1:])]
        graphs[name] = InteractionGraph(
            basis=name, nodes=list(config.nodes), edges=[acc.edges.cpu() for acc in accs],  # type: ignore[attr-defined]
            n_datapoints=[int(acc.tensors["n"]) for acc in accs],
            meta={"run": stats.run.to_dict() if stats.run else None, "n_tokens": stats.n_tokens,
                  "scalings": [getattr(l, "scaling", l.kind) for l in layers]})
    return graphs


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
    How the pass runs (``max_tokens``, checkpoints, resume, progress, ranks) is a ``StreamOptions``,
    as in ``collect``: ``options=`` or its fields as keywords.
    """
    if config is None:
        config = EdgeConfig.build(model, bases, nodes, exact=exact, n_probes=n_probes, seed=seed,
                                  positions=positions, batch_size=batch_size, context=context, method=method)
    run = StreamOptions.of(options, "collect_edges()", **stream_options)
    stats = stream(model, data, config, run, desc="edges")
    return graphs_from_stats(stats, config)


def node_bases(stats: Stats, nodes: Sequence[str], rtol: float | None = None,
               kinds: Sequence[str] = ("interaction", "pca", "standard")) -> dict[str, InteractionBasis]:
    """The bases edges are compared in, fitted at ``nodes`` from one ``Stats``: the interaction
    basis (needs ``M``), PCA of the activations, and the model's own coordinates (centred)."""
    return {k: InteractionBasis.fit_kind(k, stats, list(nodes), rtol=DEFAULT_RTOL if rtol is None else rtol)
            for k in kinds}
