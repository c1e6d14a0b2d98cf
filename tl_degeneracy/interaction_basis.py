"""The interaction basis (docs/theory.md §5), fitted from the Grams in a ``Stats``.

Per hook point, with ``G = Uᵀ D U`` and the Jacobian Gram ``M``:
1. whiten:      ``f' = D₊^{-1/2} U₊ f``                      (``E[f' f'ᵀ] = I``)
2. carry M:     ``M' = D₊^{1/2} U₊ M U₊ᵀ D₊^{1/2}``          (Jacobians transform inversely)
3. rotate:      ``M' = Vᵀ Λ V``
4. scale:       ``f̂ = Λ₊^{1/2} V₊ f'``, so ``C = Λ₊^{1/2} V₊ D₊^{-1/2} U₊``
``₊`` keeps eigenvalues above ``rtol`` × the largest (the package convention, ``linalg``). With this ("lib") scaling
``E[f̂ f̂ᵀ] = Λ`` and the Jacobian w.r.t. ``f̂`` is whitened: ``Λ_i`` is the behavioral-loss
importance of direction ``i``. Fitted state is plain tensors: inspectable and saveable.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from .config import JacobianConfig
from .generations import HookedModel
from .linalg import DEFAULT_RTOL, Threshold, symmetric_eigh, threshold
from .losses import MSE
from .stats import Stats, atomic_save_safetensors, read_safetensors_metadata

Scaling = Literal["lib", "paper", "pca", "identity"]
FORMAT_VERSION = 1


def _eigh_descending(matrix: Tensor) -> tuple[Tensor, Tensor]:
    return symmetric_eigh(matrix)


def _keep(values: Tensor, rtol: float, atol: float | None) -> tuple[Tensor, float]:
    """Mask of eigenvalues above the threshold, and the absolute threshold used."""
    cut = Threshold(rtol, float(atol)) if atol is not None else threshold(values, rtol)
    return cut.keep(values), cut.absolute


@dataclass
class LayerBasis:
    """An interaction basis at one hook point: ``f̂ = C (f − μ)``, ``f ≈ C⁺ f̂ + μ``."""

    hook: str
    C: Float[Tensor, "k d"]
    C_pinv: Float[Tensor, "d k"]
    eigenvalues: Float[Tensor, " k"]  # Λ (descending) of the kept directions ("pca": D)
    activation_eigenvalues: Float[Tensor, " d"]  # all of D, descending
    interaction_eigenvalues: Float[Tensor, " m"]  # all of Λ, descending (empty for pca/identity)
    mean: Float[Tensor, " d"]  # μ; zeros when not centered
    scaling: str = "lib"
    center: bool = True
    thresholds: dict[str, float] = field(default_factory=dict)  # absolute values actually used
    n_datapoints: int = 0

    @property
    def k(self) -> int:
        return self.C.shape[0]

    @property
    def d(self) -> int:
        return self.C.shape[1]

    def transform(self, f: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch k"]:
        """Coordinates ``f̂ = C (f − μ)`` (in ``f``'s dtype)."""
        C, mu = self.C.to(f), self.mean.to(f)
        return (f - mu) @ C.T

    def inverse(self, f_hat: Float[Tensor, "*batch k"]) -> Float[Tensor, "*batch d"]:
        """Back to activations: ``C⁺ f̂ + μ`` (the projection of ``f`` onto the kept span)."""
        return f_hat @ self.C_pinv.to(f_hat).T + self.mean.to(f_hat)

    def n_directions_for(self, fraction: float = 0.99) -> int:
        """Fewest leading directions carrying ``fraction`` of ``Σ Λ``."""
        cumulative = torch.cumsum(self.eigenvalues, 0) / self.eigenvalues.sum()
        target = torch.full((), fraction, dtype=cumulative.dtype, device=cumulative.device)
        return int(torch.searchsorted(cumulative, target)) + 1

    def fingerprint(self) -> str:
        """A short hash of ``C`` and ``μ`` (names this basis in a run identity)."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.C, self.mean):
            h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def tensors(self) -> dict[str, Tensor]:
        return {"C": self.C, "C_pinv": self.C_pinv, "eigenvalues": self.eigenvalues,
                "activation_eigenvalues": self.activation_eigenvalues,
                "interaction_eigenvalues": self.interaction_eigenvalues, "mean": self.mean}

    def meta(self) -> dict[str, Any]:
        return {"scaling": self.scaling, "center": self.center, "thresholds": self.thresholds,
                "n_datapoints": self.n_datapoints, "k": self.k, "d": self.d}


def fit_layer(
    hook: str,
    G: Float[Tensor, "d d"],
    M: Float[Tensor, "d d"] | None,
    mean: Float[Tensor, " d"],
    *,
    center: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    interaction_rtol: float | None = None,
    scaling: Scaling = "lib",
    n_datapoints: int = 0,
) -> LayerBasis:
    """docs/theory.md §5 at one hook. ``G`` is the centered covariance when ``center`` else ``S/n``."""
    G, mean = G.to(torch.float64), mean.to(torch.float64)
    d = G.shape[0]
    mu = mean if center else torch.zeros_like(mean)
    D_all, U_all = _eigh_descending(G)
    if scaling == "identity":
        eye = torch.eye(d, dtype=torch.float64, device=G.device)
        return LayerBasis(hook, eye, eye, G.diagonal().clone(), D_all, G.new_zeros(0), mu,
                          scaling, center, {}, n_datapoints)
    keep_D, d_threshold = _keep(D_all, rtol, atol)
    D, U = D_all[keep_D], U_all[keep_D]
    thresholds = {"activation": d_threshold, "rtol": rtol}
    if scaling == "pca":
        return LayerBasis(hook, U, U.T.clone(), D, D_all, G.new_zeros(0), mu,
                          scaling, center, thresholds, n_datapoints)
    if M is None:
        raise ValueError(f"scaling={scaling!r} needs the Jacobian Gram at {hook}: collect with jacobians=True")
    M = M.to(torch.float64)
    sqrt_D = D.sqrt()
    M_white = (sqrt_D[:, None] * (U @ M @ U.T)) * sqrt_D[None, :]  # D^{1/2} U M Uᵀ D^{1/2}
    L_all, V_all = _eigh_descending(M_white)
    keep_L, l_threshold = _keep(L_all, interaction_rtol if interaction_rtol is not None else rtol, None)
    L, V = L_all[keep_L], V_all[keep_L]
    thresholds["interaction"] = l_threshold
    whiten = U / sqrt_D[:, None]  # D^{-1/2} U
    unwhiten = U.T * sqrt_D[None, :]  # Uᵀ D^{1/2}
    if scaling == "lib":
        C = L.sqrt()[:, None] * (V @ whiten)  # Λ^{1/2} V D^{-1/2} U
        C_pinv = (unwhiten @ V.T) / L.sqrt()[None, :]  # Uᵀ D^{1/2} Vᵀ Λ^{-1/2}
    elif scaling == "paper":
        C = (V @ whiten) / L.sqrt()[:, None]  # (Λ^{1/2})⁺ V D^{-1/2} U
        C_pinv = (unwhiten @ V.T) * L.sqrt()[None, :]
    else:
        raise ValueError(f"scaling must be 'lib', 'paper', 'pca' or 'identity', got {scaling!r}")
    return LayerBasis(hook, C, C_pinv, L, D_all, L_all, mu, scaling, center, thresholds, n_datapoints)


class InteractionBasis:
    """Per-hook ``LayerBasis`` objects, fitted from ``Stats`` (scikit-learn style: fit, then transform)."""

    def __init__(self, layers: dict[str, LayerBasis], meta: dict[str, Any] | None = None):
        self.layers = layers
        self.meta = dict(meta or {})

    def __getitem__(self, hook: str) -> LayerBasis:
        try:
            return self.layers[hook]
        except KeyError:
            raise KeyError(f"no basis for {hook!r}; this basis covers {list(self.layers)}") from None

    def __iter__(self):
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
        layers = {}
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
        from .collect import collect

        hooks = list(hooks)
        final = jacobians or JacobianConfig()
        collect_kwargs.setdefault("progress", False)
        layers: dict[str, LayerBasis] = {}
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
            jac = replace(final, loss=MSE(), output=hook, output_transform=layer.transform,
                          output_transform_id=f"basis:{layer.fingerprint()}",
                          output_positions=None if positions is None else positions)
        assert stats is not None
        meta = {"model": stats.run.model if stats.run else None, "n_tokens": stats.n_tokens,
                "jacobians": final.to_dict(), "positions": collect_kwargs.get("positions"), "scaling": scaling,
                "center": center, "rtol": rtol, "atol": None, "local": True}
        return cls({h: layers[h] for h in hooks}, meta)

    def transform(self, hook: str, f: Tensor) -> Tensor:
        return self[hook].transform(f)

    def inverse(self, hook: str, f_hat: Tensor) -> Tensor:
        return self[hook].inverse(f_hat)

    # -- disk --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"{hook}/{name}": t for hook, layer in self.layers.items() for name, t in layer.tensors().items()}
        meta = {"format_version": FORMAT_VERSION, **self.meta,
                "layers": {hook: layer.meta() for hook, layer in self.layers.items()}}
        atomic_save_safetensors(tensors, {"tl_degeneracy_basis": json.dumps(meta)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InteractionBasis:
        meta = read_safetensors_metadata(path, key="tl_degeneracy_basis")
        tensors = load_file(str(path))
        layers = {}
        for hook, info in meta.pop("layers").items():
            t = {name: tensors[f"{hook}/{name}"] for name in
                 ("C", "C_pinv", "eigenvalues", "activation_eigenvalues", "interaction_eigenvalues", "mean")}
            layers[hook] = LayerBasis(hook, t["C"], t["C_pinv"], t["eigenvalues"], t["activation_eigenvalues"],
                                      t["interaction_eigenvalues"], t["mean"], info["scaling"], info["center"],
                                      info["thresholds"], info["n_datapoints"])
        meta.pop("format_version", None)
        return cls(layers, meta)

    def __repr__(self) -> str:
        inner = ", ".join(f"{h}: {l.k}/{l.d}" for h, l in self.layers.items())
        return f"InteractionBasis({self.meta.get('scaling', '?')}; {inner})"
