"""The sampler's checkpoint: one safetensors file holding everything a run has done so far.

Chains (trace, position, pending noise, generator states, status), the pilots (their stage, power
iteration vector, pilot chain and stiffness so far), the curvature the preconditioner is built
from (or the output probes summed so far) and the run's JSON identity
(``LLCConfig.to_dict()``, the subset, the model's weight checksum, a SHA-256 of the data). Written
atomically (``checkpoint.atomic_save_safetensors``); a checkpoint of another run is refused,
naming the field (``checkpoint.check_resumable``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import (
    CheckpointMismatchError,
    atomic_save_safetensors,
    check_resumable,
    read_safetensors_metadata,
)
from .curvature import Curvature, DiagonalProbes
from .pilot import PilotState
from .sampler import Chain, ChainStatus

FORMAT = "tl_degeneracy.llc.checkpoint/2"
META_KEY = "tl_degeneracy.llc"


@dataclass
class RunState:
    """What a run has done: the chains this process runs, one pilot per ε, the curvature (or its probes)."""

    chains: dict[tuple[int, int], Chain]
    pilots: dict[int, PilotState] = field(default_factory=dict)
    curvature: Curvature | None = None
    probes: DiagonalProbes | None = None
    curvature_seconds: float = 0.0


def chain_tensors(prefix: str, ch: Chain) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A chain's tensors (keys under ``prefix``) and its JSON record."""
    tensors = {f"{prefix}trace": ch.trace}
    record: dict[str, Any] = {"step": ch.step, "status": ch.status.value, "reason": ch.reason,
                              "step_size": ch.step_size}
    if not ch.done and ch.step > 0:
        assert ch.position is not None and ch.noise_gen is not None and ch.batch_gen is not None
        for j, x in enumerate(ch.position):
            tensors[f"{prefix}position.{j}"] = x
        for j, x in enumerate(ch.noise or []):
            tensors[f"{prefix}noise.{j}"] = x
        tensors[f"{prefix}noise_gen"] = ch.noise_gen.get_state()
        tensors[f"{prefix}batch_gen"] = ch.batch_gen.get_state()
        record["slots"] = len(ch.position)
        record["has_noise"] = ch.noise is not None
    for j, x in enumerate(ch.squared_gradients or []):
        tensors[f"{prefix}squared_gradients.{j}"] = x
    record["squared_gradients"] = None if ch.squared_gradients is None else len(ch.squared_gradients)
    return tensors, record


def restore_chain(ch: Chain, prefix: str, record: dict[str, Any], tensors: dict[str, Tensor],
                  device: torch.device | None = None) -> None:
    """Fill ``ch`` from a checkpoint's record and tensors (positions and noise onto ``device``)."""
    ch.trace = tensors[f"{prefix}trace"].to(torch.float64).clone()
    ch.step = int(record["step"])
    ch.status = ChainStatus(record["status"])
    ch.reason = record["reason"]
    ch.step_size = float(record.get("step_size", ch.step_size))
    if "slots" in record:
        ch.position = [tensors[f"{prefix}position.{j}"].to(device).clone() for j in range(record["slots"])]
        ch.noise = ([tensors[f"{prefix}noise.{j}"].to(device).clone() for j in range(record["slots"])]
                    if record["has_noise"] else None)
        ch.noise_gen = torch.Generator(device=ch.position[0].device if ch.position else "cpu")
        ch.noise_gen.set_state(tensors[f"{prefix}noise_gen"])
        ch.batch_gen = torch.Generator()
        ch.batch_gen.set_state(tensors[f"{prefix}batch_gen"])
    if record.get("squared_gradients") is not None:
        ch.squared_gradients = [tensors[f"{prefix}squared_gradients.{j}"].to(device).clone()
                                for j in range(record["squared_gradients"])]


def save(path: Path, identity: dict[str, Any], state: RunState, mine: list[tuple[int, int]]) -> None:
    tensors: dict[str, Tensor] = {}
    chains = []
    for (i, c) in mine:
        part, record = chain_tensors(f"chain.{i}.{c}.", state.chains[(i, c)])
        tensors.update(part)
        chains.append({"scale": i, "chain": c, **record})
    pilots = []
    for i, pilot in state.pilots.items():
        record = pilot.record()
        tensors.update({f"pilot.{i}.{k}": v for k, v in pilot.tensors().items()})
        if pilot.chain is not None:
            part, record["chain"] = chain_tensors(f"pilot.{i}.chain.", pilot.chain)
            record["chain"].update(index=pilot.chain.index, seed=pilot.chain.seed, n_steps=pilot.chain.n_steps)
            tensors.update(part)
        pilots.append(record)
    curvature = None
    if state.curvature is not None:
        curvature = state.curvature.record()
        tensors.update({f"curvature.{k}": v for k, v in state.curvature.tensors().items()})
    probes = None
    if state.probes is not None and state.curvature is None:
        probes = {"done": state.probes.done, "slots": len(state.probes.sums), "rotated": len(state.probes.rotated)}
        tensors.update({f"probes.{j}": s for j, s in enumerate(state.probes.sums)})
        tensors.update({f"probes.rotated.{b}": s for b, s in enumerate(state.probes.rotated)})
    meta = {"format": FORMAT, "identity": identity, "chains": chains, "pilots": pilots, "curvature": curvature,
            "probes": probes, "curvature_seconds": state.curvature_seconds}
    atomic_save_safetensors(tensors, {META_KEY: json.dumps(meta)}, path)


def load(path: Path, identity: dict[str, Any], state: RunState, new_pilot_chain: Any, device: torch.device) -> None:
    """Fill ``state`` from ``path`` (refused, naming the field, if another run wrote it), tensors onto
    ``device``. ``new_pilot_chain(scale, record)``: an empty pilot chain to restore into."""
    from safetensors.torch import load_file

    meta = read_safetensors_metadata(path, META_KEY)
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"cannot resume from {path}: it was written by another version of the sampler "
                                      f"(format {meta.get('format')!r}, this one writes {FORMAT!r}). Delete it to "
                                      "start afresh.")
    check_resumable(meta["identity"], identity, path)
    tensors = load_file(str(path))
    for record in meta["chains"]:
        key = (record["scale"], record["chain"])
        if key in state.chains:
            restore_chain(state.chains[key], f"chain.{key[0]}.{key[1]}.", record, tensors, device)
    for record in meta["pilots"]:
        i = int(record["scale"])
        prefix = f"pilot.{i}."
        pilot = PilotState.restore(record, {k[len(prefix):]: v.to(device) for k, v in tensors.items()
                                            if k.startswith(prefix)})
        if record.get("chain") is not None:
            pilot.chain = new_pilot_chain(i, record["chain"])
            restore_chain(pilot.chain, f"pilot.{i}.chain.", record["chain"], tensors, device)
        state.pilots[i] = pilot
    if meta["curvature"] is not None:
        state.curvature = Curvature.restore(meta["curvature"], tensors, prefix="curvature.", device=device)
    elif meta["probes"] is not None and state.probes is not None:
        state.probes.sums = [tensors[f"probes.{j}"].to(device) for j in range(meta["probes"]["slots"])]
        state.probes.rotated = [tensors[f"probes.rotated.{b}"].to(device) for b in range(meta["probes"]["rotated"])]
        state.probes.done = int(meta["probes"]["done"])
    state.curvature_seconds = float(meta.get("curvature_seconds", 0.0))
