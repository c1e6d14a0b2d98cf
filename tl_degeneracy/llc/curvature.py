"""What a preconditioner is built from: an estimate ``Ĥ`` of the Hessian of ``L_B`` at θ*, measured once.

- ``DiagonalProbes``: the Gauss–Newton diagonal by random output probes. With ``ξ_x`` Rademacher per
  datapoint and output component and ``B_x`` the loss's output-Hessian factor (``B Bᵀ = H_x``;
  ``BehavioralLoss.apply_factor``), ``g = Σ_x J_xᵀ B_x ξ_x`` has ``E[g_i²] = Σ_x (J_xᵀ H_x J_x)_ii``:
  ``n·diag(GN)``, never negative, one backward pass per probe and minibatch.
- ``covered_matrices`` / ``kronecker_blocks``: the weight matrices of the degeneracy account whose
  entries the subset holds whole, with the eigenvectors of their ``G`` (activation Gram at the input,
  ``degeneracy.weights.input_gram``) and ``K`` (Jacobian Gram at the output; at the logits the
  diagonal of the loss's output Hessian, by probes). ``kfac_statistics`` collects those Grams on the
  sampling data when no ``Stats`` is given.

Everything is float64 until the factor is formed (``preconditioner.py``).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..hook_names import LOGITS
from .boundaries import Boundaries
from .config import LLCConfig, Preconditioning
from .targets import Target, TransformerTarget


@dataclass
class KroneckerBlock:
    """One weight matrix's K-FAC block ``G ⊗ K`` on entries ``positions`` of slot ``slot``, held in the
    matrix's row-major ``[d_in, d_out]`` order (TransformerLens's layout: ``y = x W``)."""

    slot: int
    label: str
    positions: Tensor  # [d_in * d_out] positions in the slot's flat entries
    u_in: Tensor  # eigenvectors of G (columns), [d_in, d_in]
    g: Tensor  # eigenvalues of G (float64, ≥ 0)
    u_out: Tensor | None  # eigenvectors of K; None: K is diagonal in the standard basis (the logits)
    k: Tensor  # eigenvalues of K (float64, ≥ 0)
    corrected: Tensor | None = None  # [d_in, d_out]: the Gauss–Newton diagonal in this eigenbasis (EK-FAC)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.g.numel()), int(self.k.numel())




@dataclass
class Curvature:
    """The ε-independent estimate ``Ĥ`` of the Hessian of ``L_B`` at θ* a preconditioner is built from."""

    kind: Preconditioning
    diagonal: list[Tensor] | None = None  # per slot, float64: the Gauss–Newton diagonal
    blocks: list[KroneckerBlock] = field(default_factory=list)
    probes: int = 0  # output probes behind ``diagonal``
    notes: list[str] = field(default_factory=list)

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for j, d in enumerate(self.diagonal or []):
            out[f"diagonal.{j}"] = d
        for b, block in enumerate(self.blocks):
            out[f"block.{b}.positions"] = block.positions
            out[f"block.{b}.u_in"] = block.u_in
            out[f"block.{b}.g"] = block.g
            out[f"block.{b}.k"] = block.k
            if block.u_out is not None:
                out[f"block.{b}.u_out"] = block.u_out
        return out

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "slots": None if self.diagonal is None else len(self.diagonal),
                "blocks": [[b.slot, b.label] for b in self.blocks], "probes": self.probes, "notes": self.notes}

    @classmethod
    def restore(cls, record: dict[str, Any], tensors: dict[str, Tensor], prefix: str = "",
                device: torch.device | None = None) -> Curvature:
        def get(name: str) -> Tensor:
            return tensors[prefix + name].to(device) if device is not None else tensors[prefix + name]

        diagonal = None if record["slots"] is None else [get(f"diagonal.{j}") for j in range(record["slots"])]
        blocks = [KroneckerBlock(slot, label, get(f"block.{b}.positions"), get(f"block.{b}.u_in"), get(f"block.{b}.g"),
                                 get(f"block.{b}.u_out") if prefix + f"block.{b}.u_out" in tensors else None,
                                 get(f"block.{b}.k")) for b, (slot, label) in enumerate(record["blocks"])]
        return cls(Preconditioning(record["kind"]), diagonal, blocks, int(record["probes"]), list(record["notes"]))




def probe_seed(*parts: object) -> int:
    """A 63-bit seed from the probe's coordinates (the same in every process, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, ("tl_degeneracy.llc.probe", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rademacher(shape: torch.Size, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype=dtype, device=device)


def _slot_entries(target: Target, grads: Sequence[Tensor | None]) -> list[Tensor]:
    out = []
    for slot, g in zip(target.slots, grads):
        if g is None:
            out.append(torch.zeros(slot.numel, dtype=torch.float64, device=slot.param.device))
            continue
        flat = g.reshape(-1)
        out.append((flat if slot.index is None else flat[slot.index]).to(torch.float64))
    return out


class DiagonalProbes:
    """The Gauss–Newton diagonal of ``L_B`` at θ*, one probe (over every minibatch) per ``step()``.

    Resumable: ``sums`` and ``done`` are the whole state (probe ``i`` of minibatch ``b`` is seeded by
    ``(seed, i, b)``)."""

    def __init__(self, target: Target, seed: int):
        self.target = target
        self.seed = seed
        self.sums = [torch.zeros(s.numel, dtype=torch.float64, device=s.param.device) for s in target.slots]
        self.blocks: list[KroneckerBlock] = []  # also summed in these blocks' eigenbases (EK-FAC)
        self.rotated: list[Tensor] = []
        self.done = 0

    def rotate_into(self, blocks: list[KroneckerBlock]) -> None:
        """Also sum the squared probe gradients in each block's eigenbasis ``U_G ⊗ U_K`` (from now on)."""
        self.blocks = blocks
        if len(self.rotated) != len(blocks):
            self.rotated = [torch.zeros(b.shape, dtype=torch.float64, device=b.u_in.device) for b in blocks]

    def step(self) -> None:
        target = self.target
        with target.grads_for_slots() as params:
            for b in range(target.n_batches):
                z = target.outputs(b)
                state = target.loss_fn.output_state(target.reference[b])  # softmax(log p*) = p* for KL
                xi = _rademacher(z.shape, z.dtype, z.device, probe_seed(self.seed, self.done, b))
                probe = target.loss_fn.apply_factor(xi, state)
                grads = torch.autograd.grad((z * probe.detach()).sum(), params, allow_unused=True)
                entries = _slot_entries(target, grads)
                for total, g in zip(self.sums, entries):
                    total.add_(g.square())
                for total, block in zip(self.rotated, self.blocks):
                    X = entries[block.slot][block.positions].reshape(block.shape)
                    Y = block.u_in.double().T @ X
                    if block.u_out is not None:
                        Y = Y @ block.u_out.double()
                    total.add_(Y.square())
        self.done += 1

    def result(self) -> list[Tensor]:
        scale = 1.0 / (max(self.done, 1) * self.target.n_datapoints)
        return [s * scale for s in self.sums]

    def rotated_result(self) -> list[Tensor]:
        scale = 1.0 / (max(self.done, 1) * self.target.n_datapoints)
        return [s * scale for s in self.rotated]


def logit_curvature(target: Target, probes: int, seed: int) -> Tensor:
    """Per output component, the mean over datapoints of the loss's output Hessian's diagonal
    ``E[(Bξ)_o²]`` (1 for MSE; ``E[p_o(1 − p_o)]`` for KL): ``K`` of the unembedding, kept diagonal."""
    total: Tensor | None = None
    with torch.no_grad():
        for b in range(target.n_batches):
            ref = target.reference[b]
            state = target.loss_fn.output_state(ref)
            for i in range(probes):
                xi = _rademacher(ref.shape, ref.dtype, ref.device, probe_seed(seed, i, b, "logits"))
                part = target.loss_fn.apply_factor(xi, state).to(torch.float64).square().sum(0)
                total = part if total is None else total + part
    assert total is not None
    return total / (probes * target.n_datapoints)


BIASES = {"W_Q": "b_Q", "W_K": "b_K", "W_V": "b_V", "W_O": "b_O", "W_in": "b_in", "W_out": "b_out", "W_U": "b_U"}


@dataclass
class Covered:
    """A weight matrix of the account (or its bias) whose every entry the subset samples: where they sit."""

    weight: Any  # degeneracy.weights.WeightMatrix
    slot: int
    positions: Tensor  # the matrix's [d_in, d_out] entries (row-major) as positions in the slot
    bias: bool = False  # the matrix's bias: its input is the constant 1, so G = [[1]] and only K is measured

    @property
    def label(self) -> str:
        w = self.weight
        if not self.bias:
            return w.tl_name
        name = w.tl_name.replace(w.name, BIASES[w.name])
        return name if w.name != "W_O" else name.split("[")[0]


def _find(target: Target, base: str, head: int | None, shape: tuple[int, ...]) -> tuple[int, Tensor] | None:
    """(slot, positions) of TL tensor ``base`` (its ``head`` slice) when the subset holds all of it."""
    for j, slot in enumerate(target.slots):
        full = slot.layout.get(base)
        if full is None:
            continue
        entries = full if head is None else (full[head] if head < full.shape[0] else None)
        if entries is None or entries.numel() != math.prod(shape):
            return None
        flat = entries.reshape(-1).to(slot.param.device)
        if slot.index is None:
            return j, flat
        positions = torch.searchsorted(slot.index, flat).clamp_max(slot.index.numel() - 1)
        return (j, positions) if torch.equal(slot.index[positions], flat) else None
    return None


def covered_matrices(target: Target) -> list[Covered]:
    """The account's weight matrices (``degeneracy.weights.weight_matrices``) and their biases held whole
    by the subset."""
    if not isinstance(target, TransformerTarget):
        return []
    from ..degeneracy.weights import weight_matrices

    out = []
    for w in weight_matrices(target.module):
        base = w.tl_name.split("[")[0]
        found = _find(target, base, w.head, (w.d_in, w.d_out))
        if found is not None and found[1].numel() == w.d_in * w.d_out:
            out.append(Covered(w, *found))
        if w.name in BIASES and not (w.name == "W_O" and w.head not in (None, 0)):  # b_O: one, not per head
            head = None if w.name in ("W_O", "W_in", "W_out", "W_U") else w.head
            found = _find(target, base.replace(w.name, BIASES[w.name]), head, (w.d_out,))
            if found is not None:
                out.append(Covered(w, *found, bias=True))
    return out


def kfac_statistics(target: Target, config: LLCConfig, covered: list[Covered], probes: int,
                    options: Any = None, values: bool = False) -> Any:
    """``G`` and ``K`` of the covered matrices, collected on the sampling data (``collection.collect``,
    with the sampler's loss and output; ``options``: its ``StreamOptions``, for a checkpoint). With
    ``values``, also ``K`` at ``hook_z`` of the layers whose value matrices are covered."""
    from ..collection.config import JacobianConfig
    from ..collection.grams import collect
    from ..hook_names import act_name

    assert isinstance(target, TransformerTarget)
    outputs = list(dict.fromkeys([c.weight.output_hook for c in covered if c.weight.output_hook != LOGITS]
                                 + ([act_name("z", c.weight.layer) for c in covered if _is_value(c)] if values
                                    else [])))
    hooks = list(dict.fromkeys([c.weight.input_hook for c in covered if not c.bias] + outputs))
    jacobians = JacobianConfig(n_probes=probes, loss=config.behavioral_loss, output=config.output,
                               output_positions=config.output_positions)
    rows = max(b.tokens.shape[0] for b in target.batches)
    return collect(target.module, target.batches, hooks, jacobians=jacobians if outputs else False,
                   jacobian_hooks=outputs or None, batch_size=min(rows, 8), options=options)


def _is_value(c: Covered) -> bool:
    return c.weight.name == "W_V"


def value_grams(target: Target, covered: list[Covered]) -> dict[tuple[int, int], Tensor]:
    """Per (layer, key/value head): the Gram of the value matrix's true input ``x̄_p = Σ_q A_pq x_q``.

    Head ``h`` writes ``z_p = Σ_q A_pq (x_q W_V + b_V) = x̄_p W_V + b_V``: for a fixed pattern ``A`` the
    value path is a linear layer with input ``x̄`` (the attention-mixed normalised residual) and output
    ``hook_z``. K-FAC at ``x_q``/``hook_v`` drops the coherent sum over the positions a query attends to
    (measured: 40× too soft in layer 0 of the embedded model). Grouped-query heads average the
    Grams of the query heads sharing a key/value head.
    """
    from ..degeneracy.weights import norm_affine
    from ..forward import forward_until
    from ..hook_names import act_name

    assert isinstance(target, TransformerTarget)
    model = target.module
    values = [c for c in covered if _is_value(c) and not c.bias]
    layers = {c.weight.layer: c.weight for c in values}
    if not layers:
        return {}
    n_heads = int(model.cfg.n_heads)
    sums: dict[int, Tensor] = {}
    count = 0
    with torch.no_grad():
        for batch in target.batches:
            got: dict[str, Tensor] = {}

            def keep(act: Tensor, hook: Any, got: dict[str, Tensor] = got) -> Tensor:
                got[hook.name] = act.detach()
                return act

            hooks = [(name, keep) for w in layers.values() for name in (w.input_hook, act_name("pattern", w.layer))]
            tokens = batch.tokens.to(target.device)
            kwargs = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask.to(target.device)}
            forward_until(model, tokens, kwargs, list(dict.fromkeys(hooks)), stop_early=True)
            mask = (torch.ones(tokens.shape, dtype=torch.float64, device=target.device) if batch.attention_mask is None
                    else batch.attention_mask.to(device=target.device, dtype=torch.float64))
            for layer, w in layers.items():
                x = got[w.input_hook].to(torch.float64)
                affine = None if w.input_norm is None else norm_affine(model, w.input_norm)
                if affine is not None:
                    x = x * affine[0].to(x.device) + (0 if affine[1] is None else affine[1].to(x.device))
                pattern = got[act_name("pattern", layer)].to(torch.float64)  # [batch, head, query, key]
                mixed = torch.einsum("bhpq,bqd->bhpd", pattern, x * mask[..., None]) * mask[:, None, :, None]
                gram = torch.einsum("bhpd,bhpe->hde", mixed, mixed)
                sums[layer] = gram if layer not in sums else sums[layer] + gram
            count += int(mask.sum())
    out = {}
    for layer, gram in sums.items():
        n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
        group = n_heads // n_kv
        for g in range(n_kv):
            out[(layer, g)] = gram[g * group:(g + 1) * group].mean(0) / max(count, 1)
    return out


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return values.clamp_min(0), vectors


def _mixed_value(target: Target, stats: Any, c: Covered, values: dict[tuple[int, int], Tensor] | None
                 ) -> tuple[Tensor, Tensor] | None:
    """(G at the attention-mixed input, K at ``hook_z``) of a value matrix or bias, when both are known."""
    from ..hook_names import act_name

    w = c.weight
    if values is None or not _is_value(c) or (w.layer, w.head) not in values:
        return None
    try:
        kz = stats.jacobian_gram(act_name("z", w.layer))
    except KeyError:
        return None
    model = target.module
    n_heads, dh = int(model.cfg.n_heads), int(model.cfg.d_head)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    group = n_heads // n_kv
    k = sum(kz[h * dh:(h + 1) * dh, h * dh:(h + 1) * dh] for h in range(w.head * group, (w.head + 1) * group))
    assert isinstance(k, Tensor)
    return values[(w.layer, w.head)], k


def kronecker_blocks(target: Target, stats: Any, covered: list[Covered], logit_k: Tensor | None,
                     values: dict[tuple[int, int], Tensor] | None = None) -> tuple[list[KroneckerBlock], list[str]]:
    """K-FAC blocks of the covered matrices whose ``G`` and ``K`` are in ``stats``; notes on the others.
    With ``values`` (``value_grams``), ``W_V``/``b_V`` are factored at the attention-mixed input and
    ``hook_z`` instead of ``hook_v`` (where ``stats`` holds K there)."""
    from ..degeneracy.weights import input_gram

    assert isinstance(target, TransformerTarget)
    blocks, missing = [], []
    eig_cache: dict[tuple[str, str, Any], tuple[Tensor, Tensor]] = {}
    one = (torch.ones(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    for c in covered:
        w, dtype = c.weight, target.slots[c.slot].param.dtype
        try:
            mixed = _mixed_value(target, stats, c, values)
            key = ("G", w.input_hook, (w.in_slice, w.input_norm))
            if c.bias:
                g, u_in = one
            elif mixed is not None:
                key = ("V", str(w.layer), w.head)
                if key not in eig_cache:
                    eig_cache[key] = _eigh(mixed[0])
                g, u_in = eig_cache[key]
            else:
                if key not in eig_cache:
                    eig_cache[key] = _eigh(input_gram(target.module, stats, w))
                g, u_in = eig_cache[key]
            if mixed is not None:
                key = ("Kz", str(w.layer), w.head)
                if key not in eig_cache:
                    eig_cache[key] = _eigh(mixed[1])
                k, u_out = eig_cache[key]
            elif w.output_hook == LOGITS:
                if target.output != LOGITS or logit_k is None:
                    missing.append(c.label)
                    continue
                k, u_out = logit_k, None
            else:
                key = ("K", w.output_hook, w.out_slice)
                if key not in eig_cache:
                    m = stats.jacobian_gram(w.output_hook)
                    if w.out_slice is not None:
                        m = m[w.out_slice[0]:w.out_slice[1], w.out_slice[0]:w.out_slice[1]]
                    eig_cache[key] = _eigh(m)
                k, u_out = eig_cache[key]
        except KeyError:
            missing.append(c.label)
            continue
        device = target.slots[c.slot].param.device
        blocks.append(KroneckerBlock(c.slot, c.label, c.positions, u_in.to(device=device, dtype=dtype),
                                     g.to(device), None if u_out is None else u_out.to(device=device, dtype=dtype),
                                     k.to(device)))
    notes = [] if not missing else [f"no G or K for {len(missing)} covered matrices ({', '.join(missing[:4])}"
                                    f"{', ...' if len(missing) > 4 else ''}): the diagonal there"]
    return blocks, notes


def measure_curvature(target: Target, config: LLCConfig, probes: DiagonalProbes, boundaries: Boundaries, *,
                      statistics: Any = None, collect_options: Any = None, progress: bool = True,
                      seconds_before: float = 0.0) -> tuple[Curvature, float]:
    """``Ĥ`` for ``config.preconditioner`` (resumable: ``probes`` may hold probes already done), and the
    seconds spent. The probes are units of work (``boundaries``); the time budget ``pilot_seconds``
    stops them after the first (the probes done are used, and noted)."""
    import time

    from tqdm.auto import tqdm

    kind = config.preconditioning
    if kind in (Preconditioning.NONE, Preconditioning.RMSPROP):
        return Curvature(kind), 0.0
    start = time.monotonic()
    budget = config.pilot_seconds
    wanted = int(config.curvature_probes)  # type: ignore[call-overload]
    notes: list[str] = []
    blocks: list[KroneckerBlock] = []
    if kind in (Preconditioning.KFAC, Preconditioning.EKFAC):
        covered = covered_matrices(target)
        if not covered:
            notes.append("the subset holds no whole weight matrix of the account: the diagonal everywhere")
        else:
            from ..collection.batch_pass import NoGradientError

            refined = kind is Preconditioning.EKFAC
            try:
                stats = statistics if statistics is not None else kfac_statistics(target, config, covered, wanted,
                                                                                   collect_options, values=refined)
            except NoGradientError as exc:  # an output hook before some covered matrix's output
                stats = None
                notes.append(f"no K-FAC statistics ({' '.join(str(exc).split())[:160]}): the diagonal everywhere")
            if stats is not None:
                logits = any(c.weight.output_hook == LOGITS for c in covered)
                logit_k = logit_curvature(target, 4, probes.seed) if logits else None
                values = value_grams(target, covered) if refined else None
                blocks, more = kronecker_blocks(target, stats, covered, logit_k, values)
                notes += more
        if kind is Preconditioning.EKFAC:
            probes.rotate_into(blocks)
    bar = tqdm(total=wanted, initial=probes.done, desc="curvature", disable=not progress, leave=False)
    try:
        while probes.done < wanted:
            spent = seconds_before + time.monotonic() - start
            if probes.done >= 1 and budget is not None and spent >= budget:  # type: ignore[operator]
                notes.append(f"the time budget (pilot_seconds={budget:g}) ran out after {probes.done} of {wanted} "
                             "output probes: the Gauss–Newton diagonal is from those")
                break
            with boundaries.unit():
                probes.step()
            bar.update(1)
            if boundaries.due():
                boundaries.save()
            boundaries.check()
    finally:
        bar.close()
    diagonal = probes.result()
    for block, corrected in zip(blocks, probes.rotated_result()):
        block.corrected = corrected
    return Curvature(kind, diagonal, blocks, probes.done, notes), seconds_before + time.monotonic() - start
