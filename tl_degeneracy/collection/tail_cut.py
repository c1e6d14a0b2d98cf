"""Exact mode's backward passes cut to the output position after the last attention layer.

After the last attention layer mixes positions (its ``hook_z``), a transformer is position-wise:
the output at position ``t`` reads the other positions only through that mixing. When only one
output position is read (``output_positions=[-1]``), the rest of the tail — the last output
projection, the last MLP, ``ln_final``, the unembedding — computes positions that reach no output,
and exact mode pays that once per output component in every backward pass. The cut slices the
position axis to the kept position at ``attn.hook_z`` and at the last MLP's input, so the
backward never runs there.

The slice is applied where it is first possible: on TL 3 ``hook_resid_mid`` is the residual
stream itself, so the stream is cut too (later hooks hold only the kept positions); on a
``TransformerBridge`` it is ``ln2.hook_in`` and the cut MLP branch is broadcast back onto the full
stream (later hooks hold wrong values at the positions not kept). Either way the kept positions
are exact, and no position that was not kept can carry gradient to the output, so Jacobians at
later hook points are zero there, as they are without the cut. ``restore`` puts gradients back on
the full position axis.

That the model allows this is checked, not assumed: the caller compares the cut output with a
full forward's at every batch and reruns the batch without the cut if they differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..generations import HookedModel
from ..hook_names import act_name
from ..positions import position_mask
from .config import JacobianConfig


class TailCutMismatch(RuntimeError):
    """The output with the tail cut differs from the full forward's: this model mixes positions later."""


def _cut_points(model: HookedModel) -> list[str]:
    """Where the last block's positions can be cut: its attention's mixed output, then the MLP's input
    under each name it has on either generation (the first that fires cuts, the rest see the cut)."""
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if not n_layers:
        return []
    last = int(n_layers) - 1
    # (hook_mlp_in is left out: it fires only when enabled, and the bridge refuses a hook on it otherwise)
    candidates = [f"blocks.{last}.attn.hook_z", act_name("resid_mid", last), f"blocks.{last}.mlp.hook_in",
                  f"blocks.{last}.ln2.hook_normalized"]
    hook_dict = getattr(model, "hook_dict", {})
    return [name for name in candidates if name in hook_dict]


@dataclass
class TailCut:
    """Slices ``[batch, pos, ...]`` activations to the ``kept`` positions at ``points``."""

    points: tuple[str, ...]
    kept: Int[Tensor, " k"]  # kept positions, on the model's device
    seq_len: int
    fired: list[str] = field(default_factory=list)

    def hook(self, act: Tensor, hook: Any) -> Tensor:
        if act.ndim >= 3 and act.shape[1] == self.seq_len:
            self.fired.append(getattr(hook, "name", "?"))
            return act.index_select(1, self.kept)
        return act  # cut already (a later name for the same input), or not positional

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        return [(name, self.hook) for name in self.points]

    def restore(self, grads: Float[Tensor, "probes batch k *d"]) -> Float[Tensor, "probes batch pos *d"]:
        """Gradients at a hook point the cut shortened, back on the full position axis (zero elsewhere)."""
        if grads.shape[2] == self.seq_len:
            return grads
        full = grads.new_zeros(grads.shape[0], grads.shape[1], self.seq_len, *grads.shape[3:])
        return full.index_copy_(2, self.kept, grads)

    def output(self, z: Tensor) -> Tensor:
        """The cut forward's output at the kept positions: broadcast back to full length, or cut."""
        return z.index_select(1, self.kept) if z.shape[1] == self.seq_len else z


def tail_cut(model: HookedModel, settings: JacobianConfig, seq_len: int) -> TailCut | None:
    """The cut for one batch, or None where it does not apply: not exact mode (a few probes do not
    pay for the reference forward), an output other than the logits (a hook output may sit before
    the last block), more than one output position (a cut branch of length k > 1 cannot be added
    back onto the full-length residual stream), or no cut point on this model."""
    if not settings.exact or settings.output_positions is None or settings.output_hook is not None:
        return None
    kept = position_mask(settings.output_positions, 1, seq_len)[0]
    points = _cut_points(model)
    if int(kept.sum()) != 1 or seq_len == 1 or not points:
        return None
    return TailCut(tuple(points), kept.nonzero().squeeze(1), seq_len)  # on the host: the caller moves it


def outputs_agree(cut: Tensor, full: Tensor) -> Tensor:
    """A device flag: the cut forward's output equals the full one's, to a few units of rounding
    (matrix products over fewer rows may round differently; a position-mixing tail differs at O(1))."""
    tol = max(1e-10, min(64 * torch.finfo(full.dtype).eps, 0.05))  # float64 1e-10, float32 8e-6, half 5 %
    scale = full.detach().abs().amax()
    return (cut.detach() - full.detach()).abs().amax() <= tol * (scale + 1)
