"""``InteractionBasis``: one basis per hook point, fitted from a ``Stats``, saved as one file.

The container holds bases of any registered kind (``protocol.BASIS_KINDS``); ``fit`` makes the
interaction basis (``scaling="lib"`` or ``"paper"``), PCA (``"pca"``) or the model's coordinates
(``"identity"``) at every hook, ``fit_local`` the local interaction basis. On disk each hook's
tensors sit under ``{hook}/{name}`` and the metadata names each basis's kind, so ``load`` rebuilds
any kind, a user's own included.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from ..checkpoint import atomic_save_safetensors, read_safetensors_metadata
from ..collection.config import JacobianConfig
from ..collection.grams import collect
from ..collection.stats import Stats
from ..generations import HookedModel
from ..linalg import DEFAULT_RTOL
from ..losses import MSE
from .interaction import Scaling, fit_layer
from .protocol import Basis, basis_from_state

FORMAT_VERSION = 1
META_KEY = "tl_degeneracy_basis"
# what a basis file written before kinds were named holds: the kind follows from the scaling
_KIND_OF_SCALING = {"lib": "interaction", "paper": "interaction", "pca": "pca", "identity": "standard",
                    "random": "random"}
SCALINGS = {"interaction": "lib", "pca": "pca", "standard": "identity"}  # the kinds ``fit`` makes


class InteractionBasis:
    """Per-hook bases, fitted from ``Stats`` (scikit-learn style: fit, then transform)."""

    def __init__(self, layers: dict[str, Basis], meta: dict[str, Any] | None = None):
        self.layers = layers
        self.meta = dict(meta or {})

    def __getitem__(self, hook: str) -> Any:  # the kind's own class (LinearBasis for the built-in kinds)
        try:
            return self.layers[hook]
        except KeyError:
            raise KeyError(f"no basis for {hook!r}; this basis covers {list(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def hooks(self) -> list[str]:
        return list(self.layers)

    @classmethod
    def fit(
        cls,
        stats: Stats,
        hooks: Iterable[str] | None = None,
        center: bool = True,
        rtol: float = DEFAULT_RTOL,
        atol: float | None = None,
        interaction_rtol: float | None = None,
        scaling: Scaling = "lib",
    ) -> InteractionBasis:
        """Fit at ``hooks`` (default: every hook with activation stats, and Jacobians unless pca/identity).

        ``rtol`` (relative to the largest eigenvalue) or ``atol`` drops near-zero directions of
        ``G``; ``interaction_rtol`` (default ``rtol``) those of ``M'``.
        """
        needs_m = scaling in ("lib", "paper")
        if hooks is None:
            hooks = [h for h in stats.hooks if not needs_m or h in stats.jacobian_hooks]
            if not hooks:
                raise ValueError("no hook has both activation and Jacobian statistics: collect with jacobians=True")
        layers: dict[str, Basis] = {}
        for hook in hooks:
            if needs_m and hook not in stats.jacobian_hooks:
                raise ValueError(f"scaling={scaling!r} needs the Jacobian Gram at {hook!r}: collect with "
                                 "jacobians=True, or use scaling='pca'")
            G = stats.covariance(hook) if center else stats.gram(hook)
            M = stats.jacobian_gram(hook) if needs_m else None
            layers[hook] = fit_layer(hook, G, M, stats.mean(hook), center=center, rtol=rtol, atol=atol,
                                     interaction_rtol=interaction_rtol, scaling=scaling,
                                     n_datapoints=stats.n_datapoints(hook))
        run = stats.run
        meta = {"model": run.model if run else None, "n_tokens": stats.n_tokens,
                "jacobians": run.jacobians if run else None, "positions": run.config.get("positions") if run else None,
                "scaling": scaling, "center": center, "rtol": rtol, "atol": atol}
        return cls(layers, meta)

    @classmethod
    def fit_kind(cls, kind: str, stats: Stats, hooks: Iterable[str] | None = None, *, rtol: float = DEFAULT_RTOL,
                 center: bool = True) -> InteractionBasis:
        """``fit`` by kind name: ``"interaction"``, ``"pca"`` or ``"standard"`` (the model's coordinates)."""
        if kind not in SCALINGS:
            raise ValueError(f"unknown basis kind {kind!r}; fit makes {list(SCALINGS)}")
        return cls.fit(stats, hooks=hooks, rtol=rtol, center=center, scaling=SCALINGS[kind])  # type: ignore[arg-type]

    @classmethod
    def fit_local(
        cls,
        model: HookedModel,
        data: Any,
        hooks: Iterable[str],
        center: bool = True,
        rtol: float = DEFAULT_RTOL,
        scaling: Scaling = "lib",
        jacobians: JacobianConfig | None = None,
        **collect_kwargs: Any,
    ) -> InteractionBasis:
        """The local variant (LIB paper, arXiv 2405.10928): the basis at each hook is fitted
        from Jacobians to the *next* hook's interaction-basis coordinates, the last hook's
        from Jacobians to ``jacobians.output`` (default the logits), working from the last
        hook backwards. ``hooks`` are in forward order; one pass over ``data`` per hook.
        ``jacobians`` sets probes/exact mode and the final output; ``collect_kwargs`` go to
        ``collect`` (``positions``, ``batch_size``, ...).
        """
        hooks = list(hooks)
        final = jacobians or JacobianConfig()
        collect_kwargs.setdefault("progress", False)
        layers: dict[str, Basis] = {}
        jac = final
        stats = None
        for hook in reversed(hooks):
            stats = collect(model, data, hook, jacobians=jac, **collect_kwargs)
            G = stats.covariance(hook) if center else stats.gram(hook)
            layer = fit_layer(hook, G, stats.jacobian_gram(hook), stats.mean(hook), center=center, rtol=rtol,
                              scaling=scaling, n_datapoints=stats.n_datapoints(hook))
            layers[hook] = layer
            positions = collect_kwargs.get("positions")
            # Inner hooks: MSE on the next basis's coordinates (a softmax loss needs logits).
            jac = replace(final, loss=MSE(), output=hook, output_transform=layer.encode,
                          output_transform_id=f"basis:{layer.fingerprint()}",
                          output_positions=None if positions is None else positions)
        assert stats is not None
        meta = {"model": stats.run.model if stats.run else None, "n_tokens": stats.n_tokens,
                "jacobians": final.to_dict(), "positions": collect_kwargs.get("positions"), "scaling": scaling,
                "center": center, "rtol": rtol, "atol": None, "local": True}
        return cls({h: layers[h] for h in hooks}, meta)

    def transform(self, hook: str, f: Tensor) -> Tensor:
        return self[hook].encode(f)

    def inverse(self, hook: str, f_hat: Tensor) -> Tensor:
        return self[hook].decode(f_hat)

    # -- disk --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, Tensor] = {}
        layers: dict[str, Any] = {}
        for hook, layer in self.layers.items():
            layer_tensors, layers[hook] = layer.state()
            tensors.update({f"{hook}/{name}": t for name, t in layer_tensors.items()})
        meta = {"format_version": FORMAT_VERSION, **self.meta, "layers": layers}
        atomic_save_safetensors(tensors, {META_KEY: json.dumps(meta)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InteractionBasis:
        meta = read_safetensors_metadata(path, key=META_KEY)
        tensors = load_file(str(path))
        layers: dict[str, Basis] = {}
        for hook, info in meta.pop("layers").items():
            info = {"kind": _KIND_OF_SCALING.get(info.get("scaling", ""), "linear"), **info}
            prefix = f"{hook}/"
            mine = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)
                    and "/" not in key[len(prefix):]}
            layers[hook] = basis_from_state(hook, mine, info)
        meta.pop("format_version", None)
        return cls(layers, meta)

    def __repr__(self) -> str:
        inner = ", ".join(f"{h}: {l.k}/{l.d}" for h, l in self.layers.items())
        return f"InteractionBasis({self.meta.get('scaling', '?')}; {inner})"
