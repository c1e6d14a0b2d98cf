"""The SGLD effective count's section of ``report.json`` and its options (see ``sections``)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..llc.config import LLCConfig, Preconditioning
from ..llc.estimate import NeffResult
from ..validation import one_of, positive_int

# -- the effective parameter count by SGLD ---------------------------------------------------------


@dataclass(frozen=True)
class LLCAnalysisConfig:
    """Options of ``analyze --llc`` (recorded in report.json's ``llc.config``).

    The defaults (2 chains × 200 draws after 200 burn-in steps on 128 tokens, the EK-FAC
    preconditioner, for the whole model and each layer) take about 2–4 minutes for the embedded
    model on a 2-core CPU. Chains start at θ* and rise; a part whose chains drifted, or whose
    burn-in is shorter than the relaxation time a direction of zero curvature needs under the
    preconditioner (``ScaleEstimate.relax_steps``), is reported as a '≥' lower bound (docs/llc.md §3
    says which parts relax in this budget). ``preconditioner``, ``pilot_steps``, ``pilot_seconds``:
    as ``LLCConfig``'s.
    """

    eps: tuple[float, ...]
    gamma: float = 100.0
    n_chains: int = 2
    n_draws: int = 200
    burn_in: int = 200
    max_tokens: int = 128
    layers: bool = True  # also every layer (ParamSubset(layer=l)) at the middle ε
    seed: int = 0
    step_size: float | None = None  # None: chosen per part and ε (pilot chain + curvature, docs/llc.md §2)
    preconditioner: str = "ekfac"
    pilot_steps: int = 60
    pilot_seconds: float | None = 300.0

    def __post_init__(self) -> None:
        eps = (self.eps,) if isinstance(self.eps, (int, float)) else tuple(self.eps)
        object.__setattr__(self, "eps", tuple(sorted(float(e) for e in eps)))
        positive_int(self.max_tokens, "max_tokens")
        object.__setattr__(self, "preconditioner", Preconditioning(one_of(self.preconditioner, Preconditioning,
                                                                          "preconditioner")).value)
        self.llc_config()  # every other check (eps, gamma, chains, draws, burn-in) is LLCConfig's

    def llc_config(self, eps: Sequence[float] | None = None) -> LLCConfig:
        return LLCConfig(eps=list(self.eps if eps is None else eps), gamma=self.gamma, n_chains=self.n_chains,
                         n_draws=self.n_draws, burn_in=self.burn_in, seed=self.seed, step_size=self.step_size,
                         preconditioner=self.preconditioner, pilot_steps=self.pilot_steps,
                         pilot_seconds=self.pilot_seconds)

    @property
    def layer_eps(self) -> float:
        return self.eps[len(self.eps) // 2]

    def to_dict(self) -> dict[str, Any]:
        return {"eps": list(self.eps), "gamma": self.gamma, "n_chains": self.n_chains, "n_draws": self.n_draws,
                "burn_in": self.burn_in, "max_tokens": self.max_tokens, "layers": self.layers, "seed": self.seed,
                "step_size": self.step_size, "preconditioner": self.preconditioner, "pilot_steps": self.pilot_steps,
                "pilot_seconds": self.pilot_seconds, "layer_eps": self.layer_eps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLCAnalysisConfig:
        # a report written before the preconditioner existed sampled plainly
        data = {"preconditioner": "none", **data}
        return cls(**{k: v for k, v in data.items() if k != "layer_eps"})


@dataclass
class LLCPart:
    """One sampled part (the whole model, or one layer): its result and the K-FAC count at each ``γε``."""

    result: NeffResult  # without traces (those are in llc.json)
    nominal: int
    kfac: list[int | None]
    kfac_nominal: int

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result.to_dict(traces=False), "nominal": self.nominal, "kfac": self.kfac,
                "kfac_nominal": self.kfac_nominal}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLCPart:
        return cls(NeffResult.from_dict(data["result"]), data["nominal"], list(data["kfac"]), data["kfac_nominal"])


@dataclass
class LLCSection:
    """What ``llc_analysis`` adds to a report: ``N_eff(ε)`` per part beside the K-FAC count at ``γε``."""

    config: LLCAnalysisConfig
    kfac_loss: str
    tokens: int
    context: int | None
    seconds: float
    traces_file: str
    parts: dict[str, LLCPart]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "kfac_loss": self.kfac_loss, "tokens": self.tokens,
                "context": self.context, "seconds": self.seconds, "traces_file": self.traces_file,
                "parts": {name: part.to_dict() for name, part in self.parts.items()}, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLCSection:
        return cls(LLCAnalysisConfig.from_dict(data["config"]), data["kfac_loss"], data["tokens"], data["context"],
                   data["seconds"], data.get("traces_file", "llc.json"),
                   {name: LLCPart.from_dict(p) for name, p in data["parts"].items()}, list(data.get("notes", [])))
