"""One batch through the model under hooks → the batch's contribution to every accumulator.

Given the running totals (``into``), a batch adds its Grams to them in place (one GEMM per hook,
no second ``d × d`` copy: what lets a GB-sized state fit in memory) and returns new accumulators
only for keys not there yet; without them, everything is returned and nothing is touched. Either
way a batch is checked whole before the driver saves anything: a non-finite batch raises, and the
driver then saves nothing (the last checkpoint stands). A batch whose tail cut may be retried is
always buffered, so a retry never counts anything twice.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..data import TokenBatch
from ..forward import ParamsRequireGrad, batched_vjp, forward_until, model_device, to_device
from ..generations import HookedModel
from ..positions import position_mask
from .accumulators import AdditiveAccumulator, GramAccumulator
from .config import JacobianConfig, ProbeSpace, RunConfig
from .observers import BatchView
from .probes import ProbeMap, batch_generator, exact_probes, random_probes
from .stats import ACTIVATIONS, JACOBIANS
from .tail_cut import TailCut, TailCutMismatch, outputs_agree, tail_cut


class NonFiniteError(FloatingPointError):
    """NaN or Inf in an activation or gradient; names the hook point and the batch."""


class NoGradientError(RuntimeError):
    """The output does not depend on a Jacobian hook point: nothing would reach its ``M``."""


class _FiniteChecks:
    """Finiteness of every Gram input of a batch (and the tail cut's agreement with the full
    forward, when there is one), checked with one device sync per batch."""

    def __init__(self) -> None:
        self.items: list[tuple[Tensor, str, str]] = []
        self.cut_agrees: Tensor | None = None

    def add(self, f: Tensor, what: str, hook: str) -> None:
        self.items.append((torch.isfinite(f).all(), what, hook))

    def check(self, batch_index: int) -> None:
        flags = [flag for flag, _, _ in self.items] + ([] if self.cut_agrees is None else [self.cut_agrees])
        if not flags or bool(torch.stack(flags).all()):
            return
        if self.cut_agrees is not None and not bool(self.cut_agrees):
            raise TailCutMismatch(f"the output with the tail cut to the output positions differs from the full "
                                  f"forward's in batch {batch_index}")
        what, hook = next((w, h) for flag, w, h in self.items if not bool(flag))
        raise NonFiniteError(
            f"non-finite {what} (NaN or Inf) at hook point {hook!r} in batch {batch_index}; "
            "nothing from this batch is kept (the last checkpoint stands). Check the model's dtype (float16 "
            "overflows) and the input tokens."
        )


class _Sums:
    """Where one batch's sums go: into the running accumulators (``running``) in place, or into new
    ones (keys not there yet, or no ``running``), which ``run_batch`` returns."""

    def __init__(self, running: dict[tuple[str, str], AdditiveAccumulator] | None, checks: _FiniteChecks):
        self.running = running if running is not None else {}
        self.new: dict[tuple[str, str], AdditiveAccumulator] = {}
        self.checks = checks

    def gram(self, key: tuple[str, str], f: Tensor, weight: float = 1.0, count: int | None = None,
             what: str = "activations") -> None:
        """Add ``w fᵀf``, ``w Σf`` and ``count`` datapoints (default: the rows of ``f``) under ``key``."""
        self.checks.add(f, what, key[1])
        acc = self.running.get(key, self.new.get(key))
        if acc is None:
            self.new[key] = GramAccumulator.from_batch(f, weight, count)
        else:
            assert isinstance(acc, GramAccumulator)
            acc.add_batch_(f, weight, count)

    def add(self, key: tuple[str, str], contribution: AdditiveAccumulator) -> None:
        acc = self.running.get(key, self.new.get(key))
        if acc is None:
            self.new[key] = contribution
        else:
            acc.add_(contribution)


def _flat(act: Tensor) -> Tensor:
    """[batch, pos, ...] → [batch, pos, d] (heads flattened, e.g. hook_z)."""
    return act.reshape(act.shape[0], act.shape[1], -1)


def _datapoints(act: Tensor, select: Tensor | None) -> Tensor:
    """The selected datapoints ``[n, d]``; ``select=None`` (every position) gives a view, not a copy.

    ``select`` holds flat ``batch·pos`` indices: ``index_select`` needs no host–device sync,
    where a boolean mask would (its count decides the output's shape).
    """
    flat = _flat(act)
    flat = flat.reshape(-1, flat.shape[-1])
    return flat if select is None else flat.index_select(0, select)


class _Masks:
    """The ``[batch, pos]`` datapoint mask of each hook (one per distinct position selection).

    Masks are built on the host, where the data's attention mask is, and sent to the device
    without waiting: deciding "every position?" or a selection's size on the device would
    stall the host once per hook and batch.
    """

    def __init__(self, plan: RunConfig, batch: int, seq: int, attention_mask: Tensor | None, device: torch.device):
        self.plan, self.args = plan, (batch, seq, None if attention_mask is None else attention_mask.cpu(), device)
        self._by_spec: dict[int, tuple[Tensor, Tensor | None, Tensor]] = {}

    def _get(self, spec: Any) -> tuple[Tensor, Tensor | None, Tensor]:
        key = id(spec)
        if key not in self._by_spec:
            B, T, attention_mask, device = self.args
            host = position_mask(spec, B, T, attention_mask, device="cpu")
            # select=None (every position) lets _datapoints take a view; decided once per spec and batch
            select = None if bool(host.all()) else to_device(host.reshape(-1).nonzero().squeeze(1), device)
            self._by_spec[key] = (to_device(host, device), select, host)
        return self._by_spec[key]

    def mask(self, hook: str) -> Tensor:
        return self._get(self.plan.positions_of(hook))[0]

    def select(self, hook: str) -> Tensor | None:
        """Flat ``batch·pos`` indices of the hook's datapoints on the device (None: every position)."""
        return self._get(self.plan.positions_of(hook))[1]

    @property
    def observers(self) -> Tensor:
        """The observers' mask, on the host (an observer moves what it needs, e.g. indices)."""
        return self._get(self.plan.observer_positions)[2]


def run_batch(
    model: HookedModel,
    batch: TokenBatch,
    plan: RunConfig,
    batch_index: int,
    into: dict[tuple[str, str], AdditiveAccumulator] | None = None,
) -> dict[tuple[str, str], AdditiveAccumulator]:
    """One batch's sums: added in place to the accumulators of ``into`` where they exist, the rest
    returned as new accumulators (all of them without ``into``; see the module docstring)."""
    device = model_device(model)
    tokens = to_device(batch.tokens, device)
    B, T = tokens.shape
    attention_mask = None if batch.attention_mask is None else to_device(batch.attention_mask, device)
    masks = _Masks(plan, B, T, batch.attention_mask, device)
    checks = _FiniteChecks()
    sums = _Sums(into, checks)
    observer_hooks = [h for obs in plan.observers for h in obs.hooks()]
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}

    if plan.jacobians is None:
        cache: dict[str, Tensor] = {}
        fired: set[str] = set()

        def gram_hook(name: str):
            def hook(act: Tensor, hook: Any) -> None:
                # once per forward: TL 3.x's block calls ln1 three times (query, key and value inputs, the
                # same tensor unless split), so ln1.hook_normalized fires thrice; its first firing is counted
                if name in fired:
                    return
                fired.add(name)
                sums.gram((ACTIVATIONS, name), _datapoints(act, masks.select(name)))

            return hook

        def cache_hook(name: str):
            def hook(act: Tensor, hook: Any) -> None:
                cache[name] = act.detach()

            return hook

        fwd = [(n, gram_hook(n)) for n in plan.hooks] + [(n, cache_hook(n)) for n in dict.fromkeys(observer_hooks)]
        with torch.no_grad():
            forward_until(model, tokens, kwargs, fwd, stop_early=True)
        _observe(plan, cache, masks, sums, BatchView(batch.tokens, batch_index))
        checks.check(batch_index)
        return sums.new

    assert plan.jacobians is not None
    cut = tail_cut(model, plan.jacobians, T)
    if cut is not None:
        cut = replace(cut, kept=to_device(cut.kept, device))
        buffered = _Sums(None, checks)  # a failed cut reruns the batch: nothing may be added twice
        try:
            _run_batch_with_jacobians(model, tokens, masks, plan, batch_index, kwargs, buffered, checks, cut)
            checks.check(batch_index)
            for key, acc in buffered.new.items():
                sums.add(key, acc)
            return sums.new
        except NoGradientError:
            raise  # the user's hook choice, not the cut: the full run would raise it too
        except RuntimeError as err:  # a shape error inside the cut forward, or TailCutMismatch
            warnings.warn(f"exact Jacobians: this model does not allow cutting the tail to the output positions "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the batch "
                          "is run in full instead (correct, slower)", RuntimeWarning, stacklevel=2)
            checks = _FiniteChecks()
            sums.checks = checks
    _run_batch_with_jacobians(model, tokens, masks, plan, batch_index, kwargs, sums, checks)
    checks.check(batch_index)
    return sums.new


def _observe(plan: RunConfig, cache: dict[str, Tensor], masks: _Masks, sums: _Sums, view: BatchView) -> None:
    """Every observer's contribution, added as each arrives (an observer may yield them layer by layer)."""
    for obs in plan.observers:
        contributions = obs.compute(cache, masks.observers, batch=view) if obs.wants_batch else \
            obs.compute(cache, masks.observers)
        pairs = contributions.items() if isinstance(contributions, Mapping) else contributions
        for key, acc in pairs:
            sums.add(key, acc)


def chunked(probes: Iterable[Tensor], size: int) -> Iterator[list[Tensor]]:
    chunk: list[Tensor] = []
    for v in probes:
        chunk.append(v)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _output_of(logits: Tensor | None, captured: dict[str, Tensor], settings: JacobianConfig,
               readout_hook: str | None, attention_mask: Tensor | None = None, cut: TailCut | None = None) -> Tensor:
    """The output ``z`` whose Jacobians are taken: logits, a callable of them, a hook (optionally
    transformed), or the unembedding's input ``r`` when probes live in the residual basis.
    With a tail ``cut`` the positions are the cut's (already the output positions)."""
    if readout_hook is not None:
        z = captured[readout_hook]
    elif settings.output_hook is None:
        assert logits is not None, "the forward was stopped before the logits"
        z = settings.output(logits) if callable(settings.output) else logits
    else:
        z = captured[settings.output_hook]
        if settings.output_transform is not None:
            z = settings.output_transform(_flat(z))
    if cut is not None:
        z = cut.output(z)
        if attention_mask is not None:
            attention_mask = attention_mask.index_select(1, cut.kept)
    if attention_mask is not None and not callable(settings.output):
        # Padded output rows carry no behavioral loss: without this, probes on them leak
        # gradient into the real positions they attend to.
        z = z * attention_mask.to(z.dtype).reshape(*attention_mask.shape, *([1] * (z.ndim - 2)))
    if settings.output_positions is not None and cut is None:  # a callable output cannot have them
        pos_mask = position_mask(settings.output_positions, z.shape[0], z.shape[1], device=z.device)
        z = z[:, pos_mask[0]]
    return z


# On the CPU a chunk's largest temporary is kept under glibc's 32 MiB mmap threshold, past which
# every allocation is fresh pages from the OS and page-faults on first touch. Mod-add exact Grams
# (batch 250): chunk 50 took 23 s with 7 M minor faults, chunk 6 took 12 s.
_CPU_TEMPORARY_BYTES = 16 * 2**20


def probe_chunk_size(settings: JacobianConfig, z: Tensor, inputs: list[Tensor]) -> int:
    """Probes per vmapped backward pass: as many as the memory budget holds (1 to 64); on the CPU
    also few enough that the largest temporary (≈ 4× the largest activation: an MLP's hidden
    layer) stays small."""
    if settings.probe_chunk is not None:
        return settings.probe_chunk
    per_probe = (z.numel() + sum(x.numel() for x in inputs)) * z.element_size() * 2  # grads + their float64 view
    budget = settings.chunk_budget_bytes
    chunk = 64
    if z.device.type == "cuda":
        budget = max(budget, torch.cuda.mem_get_info(z.device)[0] // 2)
    else:
        largest = 4 * max(x.numel() for x in [z, *inputs]) * z.element_size()
        chunk = min(chunk, _CPU_TEMPORARY_BYTES // max(largest, 1))
    return int(max(1, min(chunk, budget // max(per_probe, 1))))


def _run_batch_with_jacobians(model, tokens: Tensor, masks: _Masks, plan: RunConfig, batch_index: int,
                              kwargs: dict, sums: _Sums, checks: _FiniteChecks, cut: TailCut | None = None) -> None:
    """Activation Grams, observers and probe gradients of one batch. With a tail ``cut`` the
    activations come from a full forward without a graph, and the graph's forward is cut."""
    settings = plan.jacobians
    assert settings is not None
    readout = plan.readout if settings.probe_space is ProbeSpace.RESIDUAL else None
    captured: dict[str, Tensor] = {}

    def capture(name: str):
        def hook(act: Tensor, hook: Any) -> Tensor:
            captured[name] = act
            # Returning the tensor (unchanged) matters on the bridge: a hook point with a
            # shape conversion (hook_z, hook_q, ...) then feeds *this* tensor, reverted,
            # downstream, so gradients reach it. Without a conversion it is the same object.
            return act

        return hook

    observer_hooks = [h for obs in plan.observers for h in obs.hooks()]
    output_hook = readout.hook if readout is not None else settings.output_hook
    extra = [output_hook] if output_hook is not None else []
    names = list(dict.fromkeys([*plan.hooks, *plan.jacobian_hooks, *observer_hooks, *extra]))
    readout_hook = None if readout is None else readout.hook
    attention_mask = kwargs.get("attention_mask")

    def activations() -> None:
        for name in plan.hooks:
            sums.gram((ACTIVATIONS, name), _datapoints(captured[name].detach(), masks.select(name)))
        _observe(plan, {k: v.detach() for k, v in captured.items()}, masks, sums, BatchView(tokens.cpu(), batch_index))

    z_full = None
    if cut is not None:
        with torch.no_grad():
            logits = forward_until(model, tokens, kwargs, [(n, capture(n)) for n in names], stop_early=bool(extra))
            z_full = _output_of(logits, captured, settings, readout_hook, attention_mask)
        activations()
        captured.clear()
        names = list(dict.fromkeys([*plan.jacobian_hooks, *extra]))
    with torch.enable_grad(), ParamsRequireGrad(model):
        # Output at a hook (local analysis, or the unembedding's input): nothing after it is run.
        logits = forward_until(model, tokens, kwargs, [(n, capture(n)) for n in names], stop_early=bool(extra),
                               untracked=() if cut is None else cut.fwd_hooks())
        z = _output_of(logits, captured, settings, readout_hook, attention_mask, cut)
        if cut is None:
            activations()
        else:
            assert z_full is not None
            if z.shape != z_full.shape:
                raise TailCutMismatch(f"the cut output has shape {tuple(z.shape)}, the full one {tuple(z_full.shape)}")
            checks.cut_agrees = outputs_agree(z, z_full)

        loss = settings.behavioral_loss
        if readout is not None:
            space = ProbeMap(readout.k, readout.apply, columns=readout.factor.T)
        else:
            state = loss.output_state(z)
            space = ProbeMap(z.shape[-1], lambda xi: loss.apply_factor(xi, state))
        probes: Iterable[Tensor]
        if settings.exact:
            probes, weight = exact_probes(z, space), 1.0
        else:
            assert settings.n_probes is not None
            gen = batch_generator(settings.seed, batch_index, z.device)
            probes = random_probes(z, settings.n_probes, settings.probe, gen, space)
            weight = 1.0 / settings.n_probes
        inputs = [captured[n] for n in plan.jacobian_hooks]
        for chunk in chunked(probes, probe_chunk_size(settings, z, inputs)):
            for name, g in zip(plan.jacobian_hooks, batched_vjp(z, inputs, chunk)):
                if g is None:
                    raise NoGradientError(
                        f"the output does not depend on hook point {name!r} (no gradient reaches it): choose hooks "
                        "before the output, or a later output. A hook read beside the computation (a bridge "
                        "normalisation's hook_normalized) has no Jacobian either: ask for M only where it is "
                        "needed with jacobian_hooks= (the degeneracy account: tl_degeneracy.output_hooks(model))"
                    )
                # g: [probes, batch, pos, ...] → the selected datapoints of every probe
                g = g if cut is None else cut.restore(g)
                g = g.flatten(3).flatten(1, 2)  # [probes, batch·pos, d]
                select = masks.select(name)
                g = (g if select is None else g.index_select(1, select)).reshape(-1, g.shape[-1])
                sums.gram((JACOBIANS, name), g, weight=weight, count=0, what="Jacobian probes")
    for name in plan.jacobian_hooks:  # datapoints, not probes × datapoints
        acc = sums.running.get((JACOBIANS, name), sums.new.get((JACOBIANS, name)))
        assert acc is not None
        acc.tensors["n"] += masks.mask(name).sum().to(torch.int64)
