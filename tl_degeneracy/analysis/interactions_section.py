"""The interaction graph's section of ``report.json`` and its options (see ``sections``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..collection.stats import RunRecord
from ..interactions.ablation import AblationCurve
from ..interactions.graph import DirectionBudget, RestMode
from ..interactions.modules import DEFAULT_BALANCE
from ..validation import fraction, one_of, optional_positive_int, positive_float, positive_int

EDGE_BASES = ("interaction", "pca", "standard")

# -- the interaction graph ------------------------------------------------------------------------


@dataclass(frozen=True)
class InteractionsConfig:
    """Options of the interaction-graph analysis (recorded in report.json; the edge pass's own
    identity, ``EdgeConfig.to_dict()``, is what its checkpoint must match).

    ``eps_rtol_grid``: module-search scales ε relative to the largest edge (the package convention);
    the plots use ``DEFAULT_EPS_RTOL`` (or the grid's nearest point). ``bases``: which of
    ``EDGE_BASES`` the edges and ablation curves are taken in. ``top_k``/``mass``/``rest``/``rest_probes``:
    the direction budget (``interactions.graph.DirectionBudget``; neither ``top_k`` nor ``mass``: every
    direction). ``memory_gib``: memory for one vmapped call's pass temporaries (how, not what).
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
    bases: tuple[str, ...] = EDGE_BASES
    top_k: int | None = None
    mass: float | None = None
    rest: str = RestMode.PROBES.value
    rest_probes: int = 8
    memory_gib: float = 1.0

    def __post_init__(self) -> None:
        optional_positive_int(self.n_probes, "n_probes")
        for name in ("max_tokens", "batch_size", "n_modules", "ablation_tokens"):
            positive_int(getattr(self, name), name)
        if not self.eps_rtol_grid:
            raise ValueError("eps_rtol_grid must hold positive values (ε relative to the largest edge), got ()")
        for e in self.eps_rtol_grid:
            positive_float(e, "eps_rtol_grid (each ε relative to the largest edge)")
        fraction(self.balance, "balance", open_right=True)
        if not self.bases or any(b not in EDGE_BASES for b in self.bases) or len(set(self.bases)) != len(self.bases):
            raise ValueError(f"bases must be distinct names from {list(EDGE_BASES)}, got {list(self.bases)}")
        object.__setattr__(self, "rest", one_of(self.rest, RestMode, "rest").value)
        self.budget()  # validates top_k, mass, rest_probes
        positive_float(self.memory_gib, "memory_gib (GiB for one vmapped call)")

    def budget(self) -> DirectionBudget | None:
        """The direction budget these options ask for (None: every direction, no rest vertex)."""
        budget = DirectionBudget(self.top_k, self.mass, RestMode(self.rest), self.rest_probes)
        return None if budget.keeps_all else budget

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["nodes"] = None if self.nodes is None else list(self.nodes)
        out["eps_rtol_grid"] = list(self.eps_rtol_grid)
        out["bases"] = list(self.bases)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InteractionsConfig:
        data = dict(data)
        data["nodes"] = None if data.get("nodes") is None else tuple(data["nodes"])
        data["eps_rtol_grid"] = tuple(data["eps_rtol_grid"])
        if "bases" in data:  # reports from before budgets hold none of the budget's fields: the defaults
            data["bases"] = tuple(data["bases"])
        return cls(**data)


@dataclass
class SparsityRow:
    """One layer pair in one basis (``interactions.sparsity.sparsity_table``): ``k_in``, ``k_out``, ``n_edges``,
    ``fractions`` and ``gini`` over the kept directions, ``total`` the pair's whole ``ΣE``."""

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
    rest_share: float = 0.0  # part of ``total`` on edges touching a rest vertex (fractions and Gini leave them out)
    rest_in: int = 0  # directions in the input node's rest vertex (0: none)
    rest_out: int = 0

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
    search: str = "unrecorded"  # which search found the split (METIS, or the Kernighan–Lin fallback)
    search_meaning: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _MODULE_FIELDS}
        out |= {"search": self.search, "search_meaning": self.search_meaning}
        if self.modules is not None:
            out["modules"] = self.modules
        return {**out, "random": self.random.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleRow:
        return cls(**{name: data[name] for name in _MODULE_FIELDS}, random=RandomCutsSummary(**data["random"]),
                   modules=data.get("modules"), search=data.get("search", "unrecorded"),
                   search_meaning=data.get("search_meaning", ""))


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
