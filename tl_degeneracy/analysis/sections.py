"""The follow-up sections of ``report.json``, typed: the interaction graph and the SGLD effective count.

Each section is what one follow-up analysis (``analysis.interactions``, ``analysis.llc``) adds to a
finished analysis folder, with its options (``InteractionsConfig``, ``LLCAnalysisConfig``). The
report, the HTML page and the command line read these attributes; ``to_dict`` writes exactly the
JSON earlier releases wrote (a report.json of 0.2.0 loads and writes back unchanged, tested).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..collection.stats import RunRecord
from ..interactions.ablation import AblationCurve
from ..interactions.modules import DEFAULT_BALANCE
from ..llc.config import LLCConfig
from ..llc.estimate import NeffResult
from ..validation import fraction, optional_positive_int, positive_float, positive_int

# -- the interaction graph ------------------------------------------------------------------------


@dataclass(frozen=True)
class InteractionsConfig:
    """Options of the interaction-graph analysis (recorded in report.json; the edge pass's own
    identity, ``EdgeConfig.to_dict()``, is what its checkpoint must match).

    ``eps_rtol_grid``: module-search scales ε relative to the largest edge (the package convention);
    the plots use ``DEFAULT_EPS_RTOL`` (or the grid's nearest point).
    """

    nodes: tuple[str, ...] | None = None  # default: the residual stream nodes the analysis fitted bases at
    n_probes: int | None = None  # None: exact edges (forward mode); else Rademacher probes over positions
    max_tokens: int = 1024
    batch_size: int = 8
    eps_rtol_grid: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
    n_modules: int = 2
    balance: float = DEFAULT_BALANCE
    ablation_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        optional_positive_int(self.n_probes, "n_probes")
        for name in ("max_tokens", "batch_size", "n_modules", "ablation_tokens"):
            positive_int(getattr(self, name), name)
        if not self.eps_rtol_grid:
            raise ValueError("eps_rtol_grid must hold positive values (ε relative to the largest edge), got ()")
        for e in self.eps_rtol_grid:
            positive_float(e, "eps_rtol_grid (each ε relative to the largest edge)")
        fraction(self.balance, "balance", open_right=True)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["nodes"] = None if self.nodes is None else list(self.nodes)
        out["eps_rtol_grid"] = list(self.eps_rtol_grid)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InteractionsConfig:
        data = dict(data)
        data["nodes"] = None if data.get("nodes") is None else tuple(data["nodes"])
        data["eps_rtol_grid"] = tuple(data["eps_rtol_grid"])
        return cls(**data)


@dataclass
class SparsityRow:
    """One layer pair in one basis (``interactions.sparsity.sparsity_table``)."""

    basis: str
    pair: int
    source: str
    target: str
    k_in: int
    k_out: int
    n_edges: int
    total: float
    fractions: dict[str, float]  # {"0.5": …, "0.9": …, "0.99": …}: fraction of edges carrying that share
    gini: float

    def fraction(self, q: float) -> float:
        return self.fractions[str(q)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityRow:
        return cls(**data)


@dataclass
class RandomCutsSummary:
    """Cut costs of random partitions with the found module sizes (``modules.RandomCuts.to_dict``)."""

    n: int
    module_sizes: list[int]
    eps: float
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    found: float | None
    quantile_of_found: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_MODULE_FIELDS = ("basis", "eps", "eps_rtol", "max_edge", "eps_meaning", "n_modules", "balance", "seed", "restarts",
                  "module_sizes", "cut_cost", "n_cut_edges", "n_positive_edges", "optimal", "cut_edges", "bisections")


@dataclass
class ModuleRow:
    """Modules found at one ε in one basis (``modules.module_sweep``), with the random baseline."""

    basis: str
    eps: float
    eps_rtol: float | None
    max_edge: float
    eps_meaning: str
    n_modules: int
    balance: float
    seed: int
    restarts: int
    module_sizes: list[int]
    cut_cost: float
    n_cut_edges: int
    n_positive_edges: int
    optimal: bool
    cut_edges: list[dict[str, Any]]  # the most expensive positive-cost edges cut
    bisections: list[dict[str, Any]]  # how each split was found (method, certified)
    random: RandomCutsSummary
    modules: dict[str, list[int]] | None = None  # module label per direction, per node

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _MODULE_FIELDS}
        if self.modules is not None:
            out["modules"] = self.modules
        return {**out, "random": self.random.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleRow:
        return cls(**{name: data[name] for name in _MODULE_FIELDS}, random=RandomCutsSummary(**data["random"]),
                   modules=data.get("modules"))


@dataclass
class AblationSection:
    tokens: int
    text: str  # whether the tokens were held out
    curves: list[AblationCurve]

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "text": self.text, "curves": [c.to_dict() for c in self.curves]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationSection:
        return cls(data["tokens"], data["text"], [AblationCurve.from_dict(c) for c in data["curves"]])


@dataclass
class InteractionsSection:
    """What ``interactions_analysis`` adds to a report: edges' sparsity, modules, ablation curves."""

    config: InteractionsConfig
    nodes: list[str]
    edge_run: RunRecord | None  # the edge pass's identity
    edge_tokens: int | None
    edge_seconds: float
    seconds: float
    edge_units: str
    sparsity: list[SparsityRow]
    modules: dict[str, list[ModuleRow]]
    ablation: AblationSection

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "nodes": self.nodes,
                "edge_run": None if self.edge_run is None else self.edge_run.to_dict(),
                "edge_tokens": self.edge_tokens, "edge_seconds": self.edge_seconds, "seconds": self.seconds,
                "edge_units": self.edge_units, "sparsity": [r.to_dict() for r in self.sparsity],
                "modules": {name: [r.to_dict() for r in rows] for name, rows in self.modules.items()},
                "ablation": self.ablation.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InteractionsSection:
        return cls(InteractionsConfig.from_dict(data["config"]), data["nodes"],
                   None if data.get("edge_run") is None else RunRecord.from_dict(data["edge_run"]),
                   data.get("edge_tokens"), data["edge_seconds"], data["seconds"], data["edge_units"],
                   [SparsityRow.from_dict(r) for r in data["sparsity"]],
                   {name: [ModuleRow.from_dict(r) for r in rows] for name, rows in data["modules"].items()},
                   AblationSection.from_dict(data["ablation"]))


# -- the effective parameter count by SGLD ---------------------------------------------------------


@dataclass(frozen=True)
class LLCAnalysisConfig:
    """Options of ``analyze --llc`` (recorded in report.json's ``llc.config``).

    The defaults are chosen for speed, not for mixing: 2 chains × 60 draws after 40 burn-in
    steps on 128 tokens, for the whole model and each layer (five parts for the embedded model:
    about 1.5–3 minutes on a 2-core CPU, most of it the automatic step size's pilot chain and
    curvature estimates). That relaxes the stiff directions only; the soft ones near the cut-off
    γε need about ``1/(ηγ)`` steps (reported; ~10⁵–10⁶ for a whole transformer at ε = 1e-3),
    so expect drifted chains and '≥' lower bounds — raise ``n_draws`` (or ε, γ) for a mixed estimate.
    """

    eps: tuple[float, ...]
    gamma: float = 100.0
    n_chains: int = 2
    n_draws: int = 60
    burn_in: int = 40
    max_tokens: int = 128
    layers: bool = True  # also every layer (ParamSubset(layer=l)) at the middle ε
    seed: int = 0
    step_size: float | None = None  # None: chosen per part and ε (pilot chain + curvature, docs/llc.md §2)

    def __post_init__(self) -> None:
        eps = (self.eps,) if isinstance(self.eps, (int, float)) else tuple(self.eps)
        object.__setattr__(self, "eps", tuple(sorted(float(e) for e in eps)))
        positive_int(self.max_tokens, "max_tokens")
        self.llc_config()  # every other check (eps, gamma, chains, draws, burn-in) is LLCConfig's

    def llc_config(self, eps: Sequence[float] | None = None) -> LLCConfig:
        return LLCConfig(eps=list(self.eps if eps is None else eps), gamma=self.gamma, n_chains=self.n_chains,
                         n_draws=self.n_draws, burn_in=self.burn_in, seed=self.seed,
                         step_size=self.step_size)

    @property
    def layer_eps(self) -> float:
        return self.eps[len(self.eps) // 2]

    def to_dict(self) -> dict[str, Any]:
        return {"eps": list(self.eps), "gamma": self.gamma, "n_chains": self.n_chains, "n_draws": self.n_draws,
                "burn_in": self.burn_in, "max_tokens": self.max_tokens, "layers": self.layers, "seed": self.seed,
                "step_size": self.step_size, "layer_eps": self.layer_eps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLCAnalysisConfig:
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
