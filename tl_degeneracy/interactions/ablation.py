"""Ablation curves: how much of a node's computation do its top-k directions carry, per basis?

At one node, splice a basis in without its error term (``f ↦ decode(f̂)``), keep the ``k`` most
important coordinates of ``f̂`` (``Basis.importance``: the interaction basis by ``Λ``, PCA and the
model's coordinates by variance, a random basis of the PCA span in its random order as a floor) and
set the rest to their mean, which is 0 because ``f̂ = C (f − μ)`` is centred. Measured on
held-out tokens: the behavioural loss ``1/n Σ_{x,t} ||z − z*||²`` (MSE on logits, summed over the
vocabulary, the units of ``M`` and of the edges) and the increase in next-token cross-entropy.

Memory: the clean float64 logits are needed beside every ablated forward, and a whole held-out set's
of them can be gigabytes (8 × 1024 tokens of a 50k vocabulary: 3.3 GB). The tokens are therefore
taken in chunks of rows whose float64 logits fit ``logit_budget`` elements; each chunk's clean logits
are computed once, every (hook, basis) ablation runs on it, and the chunk is dropped. The sums are
the same as over whole batches.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from ..basis.bases import InteractionBasis
from ..basis.coordinates import random_basis
from ..basis.protocol import Basis
from ..basis.splice import splice
from ..forward import model_device
from ..generations import HookedModel
from ..validation import positive_int


@dataclass
class AblationCurve:
    """One node, one basis: the loss when only the top ``k[i]`` directions are kept."""

    hook: str
    basis: str
    k: list[int]
    behavioral_loss: list[float]
    ce_increase: list[float]
    n_directions: int  # directions the basis has at this node
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "basis": self.basis, "k": self.k, "behavioral_loss": self.behavioral_loss,
                "ce_increase": self.ce_increase, "n_directions": self.n_directions, **self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationCurve:
        own = ("hook", "basis", "k", "behavioral_loss", "ce_increase", "n_directions")
        return cls(**{k: data[k] for k in own}, meta={k: v for k, v in data.items() if k not in own})


LOGIT_BUDGET = 2**26  # float64 logit elements held per ablation forward (512 MB)


def default_grid(d: int) -> list[int]:
    """0, 1, 4, 16, ... and ``d``: the ks an ablation curve is measured at (one forward pass each)."""
    ks, k = [0], 1
    while k < d:
        ks.append(k)
        k *= 4
    return ks + [d]


def _logits_and_ce(model: HookedModel, tokens: Tensor, labels: Tensor | None = None,
                   positions: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """Logits (float64, at ``positions`` if given) and the cross-entropy per prediction: of the next
    token, or of ``labels`` at the last position (a task whose answer is not in the sequence)."""
    logits = model(tokens).to(torch.float64)
    if labels is not None:
        logp = torch.log_softmax(logits[:, -1], dim=-1)
        ce = -logp.gather(-1, labels.repeat(tokens.shape[0] // labels.shape[0])[:, None].to(logits.device))
    else:
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        ce = -logp.gather(-1, tokens[:, 1:, None].to(logits.device)).squeeze(-1)
    if positions is not None:
        logits = logits[:, positions]
    return logits, ce


def _vocab(model: HookedModel) -> int:
    cfg = getattr(model, "cfg", None)
    out = int(getattr(cfg, "d_vocab_out", 0) or 0)
    return out if out > 0 else int(getattr(cfg, "d_vocab", 0) or 1)


@torch.no_grad()
def ablation_curves(
    model: HookedModel,
    tokens: Int[Tensor, "n_seq pos"],
    bases: Mapping[str, InteractionBasis],
    hooks: Sequence[str] | None = None,
    *,
    ks: Iterable[int] | None = None,
    batch_size: int = 8,
    random_floor: bool = True,
    seed: int = 0,
    labels: Int[Tensor, " n_seq"] | None = None,
    positions: list[int] | None = None,
    progress: bool = True,
    logit_budget: int = LOGIT_BUDGET,
) -> list[AblationCurve]:
    """Ablation curves at every hook of ``hooks`` (default: every hook of the first basis), per basis.

    ``bases``: e.g. ``{"interaction": ib, "pca": pca, "standard": standard}``; each keeps its
    directions by ``importance`` (the model's coordinates by variance). With ``random_floor``, a random basis of
    the PCA span (or the first basis's, without PCA) is added as ``"random"``. ``labels`` (one per
    sequence): cross-entropy of the last position's prediction against them instead of the next
    token's; ``positions``: the behavioural loss only at these positions (e.g. ``[-1]``).
    ``batch_size`` rows at most per forward, fewer when their float64 logits would pass ``logit_budget``
    elements (module docstring).
    """
    if labels is not None and labels.shape != tokens.shape[:1]:
        raise ValueError(f"labels must hold one answer per sequence, shape {tuple(tokens.shape[:1])}, got "
                         f"{tuple(labels.shape)}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"ablation needs held-out token ids [n_seq, pos ≥ 2], got shape {tuple(tokens.shape)}")
    positive_int(batch_size, "batch_size")
    positive_int(logit_budget, "logit_budget")
    if not bases:
        raise ValueError("pass at least one basis")
    first = next(iter(bases.values()))
    hooks = list(hooks) if hooks is not None else first.hooks
    device = model_device(model)
    # the model's float32 logits come before their float64 copy: 1.5 x the budget at most per forward
    rows = max(1, min(batch_size, logit_budget // max(tokens.shape[1] * _vocab(model), 1)))

    jobs: list[tuple[str, str, Basis]] = []
    for hook in hooks:
        for name, basis in bases.items():
            jobs.append((hook, name, basis[hook]))
        if random_floor:
            span = bases["pca"][hook] if "pca" in bases else first[hook]
            jobs.append((hook, "random", random_basis(span, seed)))
    # per job: the ks, and which directions each k keeps (a stable order: ties keep the basis's own order)
    plans = []
    for _, _, layer in jobs:
        grid = sorted({min(k, layer.k) for k in (ks if ks is not None else default_grid(layer.k))})
        rank = torch.empty(layer.k, dtype=torch.long)
        rank[torch.argsort(layer.importance.cpu(), descending=True, stable=True)] = torch.arange(layer.k)
        keep = rank.to(device)[None, :] < torch.tensor(grid, device=device)[:, None]
        plans.append((grid, keep, [0.0] * len(grid), [0.0] * len(grid)))
    n_points = ce_n = 0
    clean_ce = 0.0
    chunks = range(0, tokens.shape[0], rows)
    bar = tqdm(total=len(chunks) * len(jobs), desc="ablation", disable=not progress, dynamic_ncols=True)
    for start in chunks:
        b = tokens[start:start + rows].to(device)
        y = None if labels is None else labels[start:start + rows]
        z_star, ce_star = _logits_and_ce(model, b, y, positions)
        n_points += z_star.shape[0] * z_star.shape[1]
        clean_ce += float(ce_star.sum())
        ce_n += ce_star.numel()
        per = max(1, logit_budget // max(z_star.numel(), 1))  # ks per forward: copies of the chunk, one per k
        for (hook, _, layer), (grid, keep, losses, ce_sums) in zip(jobs, plans):
            with splice(model, layer, error_term=False):
                for g0 in range(0, len(grid), per):
                    group = range(g0, min(g0 + per, len(grid)))
                    mask = keep[g0:group.stop].repeat_interleave(b.shape[0], 0)  # [n_k · rows, k]

                    def keep_top(f_hat: Tensor, hook: Any, mask: Tensor = mask) -> Tensor:
                        return f_hat * mask[:, None, :].to(f_hat.dtype)  # the mean of every f̂ coordinate is 0

                    with model.hooks(fwd_hooks=[(f"{hook}.hook_ib", keep_top)]):
                        z, ce = _logits_and_ce(model, b.repeat(len(group), 1), y, positions)
                    z = z.reshape(len(group), *z_star.shape)
                    ce = ce.reshape(len(group), -1)
                    for j, i in enumerate(group):
                        losses[i] += float((z[j] - z_star).square().sum())
                        ce_sums[i] += float(ce[j].sum())
                    del z, ce
            bar.update(1)
        del z_star, ce_star
    bar.close()
    base_ce = clean_ce / ce_n
    return [AblationCurve(hook, name, grid, [v / n_points for v in losses], [v / ce_n - base_ce for v in ce_sums],
                          layer.k, {"n_tokens": int(tokens.numel()), "n_datapoints": n_points, "clean_ce": base_ce})
            for (hook, name, layer), (grid, _, losses, ce_sums) in zip(jobs, plans)]
