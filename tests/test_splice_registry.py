"""The splice registers its hook points through TransformerLens's own module scan; nothing is
stored on the model; handles undo it exactly. Also: gated hooks (``hook_result``) and the
probe-loop fallback of the batched backward pass."""
from __future__ import annotations

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy import JacobianConfig, collect
from tl_degeneracy.basis import InteractionBasis
from tl_degeneracy.basis.splice import SpliceHandle, splice_into, unsplice
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models

TOKENS = torch.randint(0, 23, (6, 12), generator=torch.Generator().manual_seed(3))
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def basis() -> InteractionBasis:
    model = tiny_model(seed=0)
    stats = collect(model, TOKENS, HOOKS, jacobians=JacobianConfig(n_probes=4), progress=False)
    return InteractionBasis.fit(stats)


def _ib_names(model) -> list[str]:
    return [n for n in model.hook_dict if n.endswith((".hook_ib", ".hook_ib_error"))]


def _tl_degeneracy_attributes(model) -> list[str]:
    return [k for k in vars(model) if "tl_degeneracy" in k]


def _needs_tl4(generation: int) -> None:
    if generation != 4:
        pytest.skip("TransformerBridge (TL 4.x) only: enable_compatibility_mode and hook aliases "
                    "do not exist in TL 3.x")


# -- TL 4.x: the bridge's registry -------------------------------------------------------------------

def test_splice_survives_enable_compatibility_mode(generation, basis):
    _needs_tl4(generation)
    model = tiny_model(seed=0)
    reference = tiny_model(seed=0)
    reference.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    plain = reference(TOKENS).detach()

    handles = splice_into(model, basis, hooks=["blocks.0.hook_resid_pre"])
    model.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    assert "blocks.0.hook_resid_pre.hook_ib" in model.hook_dict
    assert "blocks.0.hook_resid_pre.hook_ib_error" in model.hook_dict

    calls = []
    spliced = model.run_with_hooks(
        TOKENS, fwd_hooks=[("blocks.0.hook_resid_pre.hook_ib", lambda act, hook: calls.append(act.shape))])
    assert calls == [torch.Size([*TOKENS.shape, basis["blocks.0.hook_resid_pre"].k])]
    torch.testing.assert_close(spliced.detach(), plain, rtol=0, atol=1e-10)  # unedited: logits unchanged

    unsplice(model)
    assert _ib_names(model) == []
    assert not any("hook_ib" in n for n, _ in model.named_modules())
    assert torch.equal(model(TOKENS).detach(), plain)
    assert all(h._handles == [] for h in handles)
    assert _tl_degeneracy_attributes(model) == []


@pytest.mark.parametrize("compat", ["never", "before splice", "after splice"])
def test_resid_mid_splice_is_named_by_the_user_hook(generation, basis, compat):
    """On the bridge hook_resid_mid is an alias of ln2.hook_in; the new points must still be
    reachable as ``blocks.1.hook_resid_mid.hook_ib``, as for resid_pre."""
    _needs_tl4(generation)
    model = tiny_model(seed=0)
    if compat == "before splice":
        model.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    splice_into(model, basis, hooks=["blocks.1.hook_resid_mid"])
    if compat == "after splice":
        model.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    try:
        assert "blocks.1.hook_resid_mid.hook_ib" in model.hook_dict, _ib_names(model)
        assert "blocks.1.hook_resid_mid.hook_ib_error" in model.hook_dict, _ib_names(model)
    finally:
        unsplice(model)
    assert _ib_names(model) == []


def _point_name(model, hook: str) -> str:
    """A hook_dict name of the splice's hook_ib point at ``hook`` (whatever the registry called it)."""
    target = model.hook_dict[hook]
    point = target._modules["hook_ib"]
    names = [n for n, hp in model.hook_dict.items() if hp is point]
    assert names, "the spliced hook_ib point is not in hook_dict"
    return f"{hook}.hook_ib" if f"{hook}.hook_ib" in names else names[0]


@pytest.mark.parametrize("compat", ["never", "before splice", "after splice"])
def test_resid_mid_edit_reaches_the_skip_path(generation, basis, compat):
    """An edit of hook_ib at resid_mid must change the residual stream (skip path and MLP input),
    as on a HookedTransformer: the reference adds the same change at resid_mid and (on the bridge,
    where resid_mid is only the MLP's input) at mlp_out."""
    hook = "blocks.1.hook_resid_mid"
    model = tiny_model(seed=0)
    if compat != "never":
        if generation != 4:
            pytest.skip("compatibility mode is TL 4.x only")
        if compat == "before splice":
            model.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    layer = basis[hook]
    shift = torch.zeros(layer.k, dtype=torch.float64)
    shift[0] = 1.0
    delta = layer.C_pinv @ shift  # the residual change an edit of +shift in hook_ib makes

    def add(act, hook):
        return act + delta

    ref_hooks = [(hook, add)] + ([("blocks.1.hook_mlp_out", add)] if generation == 4 else [])
    splice_into(model, layer)
    if compat == "after splice":
        model.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    try:
        edited = model.run_with_hooks(TOKENS, fwd_hooks=[(_point_name(model, hook), lambda a, hook: a + shift)])
    finally:
        unsplice(model)
    reference = model.run_with_hooks(TOKENS, fwd_hooks=ref_hooks)
    plain = model(TOKENS)
    assert float((reference - plain).detach().abs().max()) > 1e-2  # the edit matters
    torch.testing.assert_close(edited.detach(), reference.detach(), rtol=0, atol=1e-10)


# -- both generations --------------------------------------------------------------------------------

def test_nothing_is_stored_on_the_model(basis):
    model = tiny_model(seed=0)
    before = set(vars(model))
    handles = splice_into(model, basis)
    assert _tl_degeneracy_attributes(model) == []
    assert all(isinstance(h, SpliceHandle) for h in handles) and [h.hook for h in handles] == basis.hooks
    unsplice(model)
    assert _tl_degeneracy_attributes(model) == []
    assert set(vars(model)) == before


def test_spliced_points_are_found_by_the_module_scan(generation, basis):
    model = tiny_model(seed=0)
    handles = splice_into(model, basis)
    try:
        modules = dict(model.named_modules())
        for hook in basis.hooks:
            for point in ("hook_ib", "hook_ib_error"):
                name = f"{hook}.{point}"
                if generation == 3:
                    assert name in model.hook_dict
                    assert name in model.mod_dict
                    assert name in modules
                    assert modules[name] is model.hook_dict[name]
                    assert model.hook_dict[name].name == name
                else:  # the scan names them under the canonical path; hook_dict also by the user's name
                    hp = model.hook_dict[hook]._modules[point]
                    assert any(m is hp for m in modules.values())
                    assert any(v is hp for v in model.hook_dict.values())
        # run_with_cache sees every one of them (hooks registered by the scan)
        _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith(".hook_ib"))
        for hook in basis.hooks:
            point = model.hook_dict[hook]._modules["hook_ib"]
            names = {n for n, hp in model.hook_dict.items() if hp is point}
            assert names & set(cache.keys()), (hook, sorted(cache.keys()))
        if generation == 3:
            assert sorted(cache.keys()) == sorted(f"{h}.hook_ib" for h in basis.hooks)
    finally:
        for h in handles:
            h.remove()


def test_handles_remove_their_own_splice(generation, basis):
    model = tiny_model(seed=0)
    plain = model(TOKENS).detach()
    handles = splice_into(model, basis)
    assert len(handles) == len(basis.hooks)
    first, rest = handles[0], handles[1:]
    first.remove()
    first.remove()  # idempotent
    remaining = _ib_names(model)
    assert not any(n.startswith(first.hook + ".") for n in remaining)
    assert "hook_ib" not in model.hook_dict[first.hook]._modules
    if generation == 3:
        assert remaining == [f"{h.hook}.{p}" for h in rest for p in ("hook_ib", "hook_ib_error")]
    for h in rest:
        assert "hook_ib" in model.hook_dict[h.hook]._modules
    # the splice at the first hook may be made again: it really was removed
    again = splice_into(model, basis, hooks=[first.hook])
    with pytest.raises(ValueError, match="already"):
        splice_into(model, basis, hooks=[first.hook])
    for h in [*rest, *again]:
        h.remove()
    assert _ib_names(model) == []
    assert torch.equal(model(TOKENS).detach(), plain)
    assert _tl_degeneracy_attributes(model) == []


def test_unsplice_finds_every_splice_by_scanning(generation, basis):
    model = tiny_model(seed=0)
    plain = model(TOKENS).detach()
    splice_into(model, basis, hooks=basis.hooks[:1])
    splice_into(model, basis, hooks=basis.hooks[1:])  # two calls, no list kept anywhere
    assert len([n for n in _ib_names(model) if n.endswith("hook_ib")]) >= len(basis.hooks) - (generation == 4)
    unsplice(model)
    unsplice(model)  # nothing left: a no-op
    assert _ib_names(model) == []
    assert torch.equal(model(TOKENS).detach(), plain)


def test_context_manager_restores_the_model(basis):
    model = tiny_model(seed=0)
    plain = model(TOKENS).detach()
    with tld.splice(model, basis) as handles:
        assert len(handles) == len(basis.hooks)
        torch.testing.assert_close(model(TOKENS).detach(), plain, rtol=0, atol=1e-10)
    assert _ib_names(model) == []
    assert torch.equal(model(TOKENS).detach(), plain)


# -- gated hooks: hook_result ---------------------------------------------------------------------

@pytest.mark.parametrize("jacobians", [False, True], ids=["activations", "jacobians"])
def test_hook_result_collects_and_the_flag_is_restored(jacobians, generation):
    """hook_result fires only under use_attn_result; collect turns it on and back off.

    TL 3.x: it works. TL 4.x refuses set_use_attn_result for the plain AttentionBridge these
    models use: collect must then say so in one clear ValueError and leave the flag off."""
    model = tiny_model(seed=0)
    assert not model.cfg.use_attn_result
    hooks = ["blocks.0.attn.hook_result", "blocks.0.hook_attn_out"]
    try:
        try:
            model.set_use_attn_result(True)
            model.set_use_attn_result(False)
        except NotImplementedError:
            with pytest.raises(ValueError, match="hook_result cannot be collected.*hook_z"):
                collect(model, TOKENS, hooks, jacobians=jacobians, progress=False)
            return
        stats = collect(model, TOKENS, hooks, jacobians=jacobians, progress=False)
    finally:
        assert not model.cfg.use_attn_result, "the flag must be restored, even on failure"
    H, d = model.cfg.n_heads, model.cfg.d_model
    assert stats.gram(hooks[0]).shape == (H * d, H * d)
    assert stats.n_datapoints(hooks[0]) == TOKENS.numel()
    # Σ_heads result + b_O = attn_out: the per-head outputs really are the heads'
    per_head_mean = stats.mean(hooks[0]).reshape(H, d).sum(0)
    b_O = model.blocks[0].attn.b_O.detach().to(torch.float64)
    torch.testing.assert_close(per_head_mean + b_O, stats.mean(hooks[1]), rtol=0, atol=1e-10)
    if jacobians:
        assert float(stats.jacobian_gram(hooks[0]).trace()) > 0  # gradients reach the gated hook
    # and the hook is silent again afterwards
    fired = []
    model.run_with_hooks(TOKENS, fwd_hooks=[(hooks[0], lambda a, hook: fired.append(1))])
    assert fired == []


def test_an_already_enabled_flag_stays_enabled(generation):
    model = tiny_model(seed=0)
    try:
        model.set_use_attn_result(True)
    except NotImplementedError as exc:
        pytest.skip(f"this TransformerLens cannot enable use_attn_result on this model: {exc}")
    collect(model, TOKENS, "blocks.0.attn.hook_result", progress=False)
    assert model.cfg.use_attn_result


def test_hook_mlp_in_collects_and_the_flag_is_restored():
    """A gated hook the bridge supports for every model: the mechanism itself works on both generations."""
    model = tiny_model(seed=0)
    assert not model.cfg.use_hook_mlp_in
    stats = collect(model, TOKENS, ["blocks.1.hook_mlp_in", "blocks.1.ln2.hook_normalized"], progress=False)
    assert not model.cfg.use_hook_mlp_in
    assert stats.gram("blocks.1.hook_mlp_in").shape == (16, 16)


# -- the probe-loop fallback -------------------------------------------------------------------------

def test_probe_loop_fallback_equals_the_batched_backward(monkeypatch):
    import tl_degeneracy.collection.batch_pass as batch_pass

    model = tiny_model(seed=0)
    options = dict(hooks=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid"],
                   jacobians=JacobianConfig(n_probes=6, probe_chunk=4), batch_size=3, progress=False)
    batched = collect(model, TOKENS, **options)

    real_grad = torch.autograd.grad
    calls = {"batched": 0, "single": 0}

    def no_batching_rule(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls["batched"] += 1
            raise RuntimeError("Batching rule not implemented for aten::some_op (simulated)")
        calls["single"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    looped = collect(model, TOKENS, **options)
    monkeypatch.undo()

    # 2 batches × 2 chunks (4 + 2 probes), each tried batched first, then one pass per probe
    assert calls["batched"] == 4
    assert calls["single"] == 2 * 6
    for hook in options["hooks"]:
        torch.testing.assert_close(looped.jacobian_gram(hook), batched.jacobian_gram(hook), rtol=1e-12, atol=1e-12)
        assert torch.equal(looped.gram(hook), batched.gram(hook))
    assert batch_pass.batched_vjp is not None


def test_probe_grads_directly(monkeypatch):
    """``batched_vjp`` returns the same stacked ``Jᵀ v`` with and without the batched pass."""
    from tl_degeneracy.forward import batched_vjp

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    z = torch.tanh(x @ torch.randn(5, 4, dtype=torch.float64)) + y.sum(-1, keepdim=True)
    chunk = [torch.randn_like(z) for _ in range(3)]
    batched = batched_vjp(z, [x, y], chunk)
    real_grad = torch.autograd.grad

    def refuse(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule (simulated)")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    looped = batched_vjp(z, [x, y], chunk)
    for a, b in zip(batched, looped):
        assert a is not None and b is not None and a.shape == b.shape == (3, *a.shape[1:])
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
