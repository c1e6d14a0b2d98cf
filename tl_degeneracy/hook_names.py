"""Choosing hook points by TransformerLens name, glob pattern or ``names_filter`` callable.

Results are always keyed by the name the user asked for. On a ``TransformerBridge`` the
legacy names (``blocks.0.hook_resid_pre``) are aliases of canonical hook points
(``blocks.0.hook_in``) and a hook function is told the canonical name, so we never key by
``hook.name``.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

from .generations import HookedModel

HookSpec = Union[str, Sequence[str], Callable[[str], bool], None]

DEFAULT_HOOK_PATTERN = "blocks.*.hook_resid_pre"
# The model's output as a pseudo hook name: Jacobians, the sampler and the account read "logits".
LOGITS = "logits"

# Hook points that only fire after the model's ``set_use_*`` switch is on.
GATED_HOOKS: dict[str, str] = {
    "hook_result": "set_use_attn_result",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "hook_attn_in": "set_use_attn_in",
    "hook_mlp_in": "set_use_hook_mlp_in",
    "hook_tokens": "set_use_hook_tokens",
}

# Hook points whose activations are not [batch, pos, ...] and so have no per-token Gram.
NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")


class UnknownHookError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def available_hooks(model: HookedModel) -> list[str]:
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise TypeError(
            f"{type(model).__name__} has no hook_dict; pass a TransformerLens model "
            "(HookedTransformer, TransformerBridge or another HookedRootModule)."
        )
    return list(hook_dict.keys())


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def _unknown(name: str, valid: list[str]) -> UnknownHookError:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    # Close by suffix too: "hook_resid_pre" alone should point at the per-block names.
    tail = leaf(name)
    close += [v for v in valid if v.endswith("." + tail) and v not in close][:5]
    hint = f" Close valid names: {', '.join(close)}." if close else ""
    return UnknownHookError(
        f"unknown hook point {name!r}.{hint} "
        f"(the model has {len(valid)} hook points; list them with model.hook_dict.keys() or "
        "`tl-degeneracy hooks [MODEL]`)"
    )


def _block_sort_key(name: str) -> tuple:
    # Natural order: blocks.2 before blocks.10.
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def resolve_hooks(model: HookedModel, hooks: HookSpec = None) -> list[str]:
    """Turn a hook spec into a list of valid hook names, in the user's words.

    ``hooks`` is an exact name, a glob (``"blocks.*.hook_resid_pre"``), a list of either,
    a ``names_filter``-style callable, or None (every ``hook_resid_pre``).
    """
    valid = available_hooks(model)
    if hooks is None:
        hooks = DEFAULT_HOOK_PATTERN
    if callable(hooks):
        chosen = [name for name in valid if hooks(name)]
        if not chosen:
            raise UnknownHookError("the hooks callable selected no hook point")
    else:
        specs: Iterable[str] = [hooks] if isinstance(hooks, str) else list(hooks)
        chosen = []
        for spec in specs:
            if not isinstance(spec, str):
                raise TypeError(f"hook names must be strings, got {type(spec).__name__}")
            if _is_glob(spec):
                matched = sorted((v for v in valid if fnmatch.fnmatchcase(v, spec)), key=_block_sort_key)
                if not matched:
                    raise _unknown(spec, valid)
                chosen += matched
            elif spec in valid:
                chosen.append(spec)
            else:
                raise _unknown(spec, valid)
        if not chosen:
            raise UnknownHookError("no hook points were given")
    chosen = list(dict.fromkeys(chosen))  # de-duplicate, keep order
    for name in chosen:
        if name.endswith(NOT_PER_TOKEN):
            raise ValueError(
                f"{name} is [batch, head, query, key], not a per-token activation, so it has no "
                "Gram matrix. Use collect(..., head_sync=True) for attention patterns."
            )
    return chosen


def enable_gated_hooks(model: HookedModel, names: Iterable[str]) -> list[Callable[[], None]]:
    """Switch on the ``set_use_*`` flags the chosen hooks need; return undo callbacks."""
    undo: list[Callable[[], None]] = []
    cfg = getattr(model, "cfg", None)
    for setter in dict.fromkeys(GATED_HOOKS[leaf(n)] for n in names if leaf(n) in GATED_HOOKS):
        method = getattr(model, setter, None)
        flag = setter.replace("set_", "", 1)
        if method is None or cfg is None:
            continue
        before = bool(getattr(cfg, flag, False))
        if not before:
            try:
                method(True)
            except NotImplementedError as exc:  # TL 4.x: not every attention bridge can split heads/inputs
                for fn in reversed(undo):
                    fn()
                gated = sorted({n for n in names if GATED_HOOKS.get(leaf(n)) == setter})
                raise ValueError(
                    f"{', '.join(gated)} cannot be collected on this {type(model).__name__}: TransformerLens "
                    f"refuses {setter}(True) for it ({exc}). Collect hook_z (per head, then W_O) or "
                    "hook_attn_out instead."
                ) from None
            undo.append(functools.partial(method, False))
    return undo


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's own hook naming (``get_act_name``): ``act_name("resid_pre", 3)`` →
    ``blocks.3.hook_resid_pre``, ``act_name("normalized", 0, "ln1")``, ``act_name("normalized")``
    → ``ln_final.hook_normalized``. Every hook name the package builds goes through here."""
    from transformer_lens.utilities import get_act_name

    return get_act_name(name, layer, layer_type)


def residual_hooks(model: HookedModel) -> list[str]:
    """``hook_resid_pre`` of every block and the final ``hook_resid_post``: the residual stream."""
    n_layers = int(model.cfg.n_layers)
    return [act_name("resid_pre", l) for l in range(n_layers)] + [act_name("resid_post", n_layers - 1)]


def leaf(name: str) -> str:
    """The hook point's own name: ``blocks.0.attn.hook_z`` → ``hook_z``."""
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> int | None:
    """The block index in ``blocks.{l}.…``, or None for hooks outside the blocks."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def module_path(model: HookedModel, module: Any) -> str | None:
    """Where ``module`` sits in the module tree. On a bridge a legacy hook name is an alias and
    the path is the canonical one (``blocks.1.hook_resid_mid`` → ``blocks.1.ln2.hook_in``);
    found by identity, because the bridge renames ``HookPoint.name`` in compatibility mode."""
    return next((name for name, m in model.named_modules() if m is module), None)


def bridge_resid_mid_partner(model: HookedModel, hook: str) -> str | None:
    """For a bridge's resid_mid (really ln2.hook_in) the hook whose output must carry the edit too."""
    layer = layer_of(hook)
    if layer is None or hook != act_name("resid_mid", layer):
        return None
    canonical = module_path(model, model.hook_dict[hook])
    if canonical == hook:
        return None  # HookedTransformer: resid_mid really is the residual stream
    return act_name("mlp_out", layer)
