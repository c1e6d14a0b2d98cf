"""What a basis is to the rest of the package, and the registry of basis kinds.

A *basis* re-describes the activations of one hook point as ``k`` coordinates: ``encode`` maps an
activation ``f`` (``[..., d]``) to ``f̂`` (``[..., k]``) and ``decode`` maps coordinates back, so that
``decode(encode(f))`` is what the basis keeps of ``f``. Splicing (``{hook}.hook_ib``), the edges of
the interaction graph, ablation curves, dashboards and exports use bases only through this protocol,
so a new kind — an SAE-like dictionary, a sparse basis — is one class:

    @register_basis_kind
    @dataclass
    class MyBasis:
        kind: ClassVar[str] = "mine"
        ...  # the members of ``Basis``

``importance`` orders the directions (Λ for the interaction basis, variance for PCA and the model's
coordinates): "the top k directions" always means the ``k`` largest. ``state``/``from_state``
round-trip a basis through a safetensors file; the file names the kind, and the registry finds
the class to rebuild it (as sae_lens's registry maps an architecture name to its SAE class).

Bases whose two maps are affine (``f̂ = C (f − μ)``, ``decode(f̂) = C⁺ f̂ + μ``) also expose ``C``,
``C_pinv`` and ``mean`` (``LinearMaps``): the interaction graph's edges and the sae_lens export need
those matrices, and refuse a basis without them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor


@runtime_checkable
class Basis(Protocol):
    """A basis of one hook point's activations (see the module docstring)."""

    hook: str

    @property
    def kind(self) -> str:
        """The registry name of this basis's class ("interaction", "pca", "standard", ...)."""
        ...

    @property
    def k(self) -> int:
        """Number of coordinates (directions)."""
        ...

    @property
    def d(self) -> int:
        """Dimension of the activations it reads."""
        ...

    @property
    def importance(self) -> Tensor:
        """``[k]`` float64: what orders the directions (larger first)."""
        ...

    def encode(self, f: Tensor) -> Tensor:
        """``[..., d]`` activations → ``[..., k]`` coordinates (in ``f``'s dtype)."""
        ...

    def decode(self, f_hat: Tensor) -> Tensor:
        """``[..., k]`` coordinates → ``[..., d]`` activations."""
        ...

    def fingerprint(self) -> str:
        """A short hash of everything ``encode`` and ``decode`` depend on (names it in a run identity)."""
        ...

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The tensors and JSON-able metadata ``from_state`` rebuilds it from."""
        ...

    @classmethod
    def from_state(cls, hook: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Basis:
        ...


@runtime_checkable
class LinearMaps(Protocol):
    """An affine basis: ``encode(f) = C (f − μ)``, ``decode(f̂) = C⁺ f̂ + μ``."""

    C: Tensor  # [k, d]
    C_pinv: Tensor  # [d, k]
    mean: Tensor  # [d]


B = TypeVar("B")
BASIS_KINDS: dict[str, type] = {}


def register_basis_kind(cls: type[B]) -> type[B]:
    """Class decorator: make ``cls`` (with a ``kind`` class attribute) loadable by name."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a class attribute kind = '<name>' to be registered")
    if kind in BASIS_KINDS and BASIS_KINDS[kind] is not cls:
        raise ValueError(f"basis kind {kind!r} is registered already (by {BASIS_KINDS[kind].__name__})")
    BASIS_KINDS[kind] = cls
    return cls


def basis_class(kind: str) -> type:
    try:
        return BASIS_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown basis kind {kind!r}; registered kinds: {sorted(BASIS_KINDS)} "
                         "(register a new one with tl_degeneracy.basis.register_basis_kind)") from None


def basis_from_state(hook: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Basis:
    """Rebuild a saved basis of any registered kind (``meta["kind"]`` names it)."""
    return basis_class(meta["kind"]).from_state(hook, tensors, meta)  # type: ignore[attr-defined, no-any-return]


def map_tensors(basis: Basis, fn: Callable[[Tensor], Tensor]) -> Basis:
    """The same basis with ``fn`` applied to each of its tensors (device or dtype moves)."""
    tensors, meta = basis.state()
    return type(basis).from_state(basis.hook, {k: fn(v) for k, v in tensors.items()}, meta)


def require_linear(basis: Basis, what: str) -> LinearMaps:
    """``basis`` as ``LinearMaps``, or a ValueError saying ``what`` needs an affine basis."""
    if not isinstance(basis, LinearMaps):
        raise ValueError(f"{what} needs an affine basis (encode f ↦ C (f − μ)); the {basis.kind!r} basis at "
                         f"{basis.hook!r} has no C, C_pinv and mean")
    return basis
