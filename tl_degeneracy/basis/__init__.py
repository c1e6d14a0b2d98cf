"""Bases of a hook point's activations: the interaction basis and its comparisons, as registered kinds.

- ``protocol``: the ``Basis`` protocol (``encode``, ``decode``, ``k``, ``d``, ``hook``, ``importance``,
  ``fingerprint``, ``state``/``from_state``), ``LinearMaps`` for affine kinds, and the kind registry.
- ``linear``: ``LinearBasis``, the affine class every built-in kind is.
- ``interaction`` (the interaction basis, docs/theory.md §5), ``coordinates`` (PCA, the model's own
  coordinates, random rotations): the built-in kinds and how each is fitted.
- ``bases``: ``InteractionBasis``, one basis per hook, fitted from ``Stats``, saved as one file.
- ``splice``: a basis in a live model as hook points ``{hook}.hook_ib`` / ``{hook}.hook_ib_error``.
- ``sae_lens_export``: an affine basis as a sae_lens SAE folder, two ReLU latents per direction
  (``tl-degeneracy export --format sae-lens``).
"""
from .bases import InteractionBasis
from .coordinates import PCADirections, RandomDirections, StandardCoordinates, random_basis
from .interaction import InteractionDirections, fit_layer
from .linear import LinearBasis
from .protocol import BASIS_KINDS, Basis, LinearMaps, basis_from_state, register_basis_kind, require_linear
from .splice import BasisSplice, SpliceHandle, splice, splice_into, unsplice

LayerBasis = LinearBasis  # the name of releases before basis kinds

__all__ = [
    "InteractionBasis", "PCADirections", "RandomDirections", "StandardCoordinates", "random_basis",
    "InteractionDirections", "fit_layer", "LinearBasis", "LayerBasis", "BASIS_KINDS", "Basis", "LinearMaps",
    "basis_from_state", "register_basis_kind", "require_linear", "BasisSplice", "SpliceHandle", "splice",
    "splice_into", "unsplice",
]
