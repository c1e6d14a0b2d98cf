"""Bad input gets a clear error and loses nothing."""
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models


def test_unknown_hook_lists_close_names(tiny, tiny_tokens):
    with pytest.raises(tld.UnknownHookError) as info:
        tld.collect(tiny, tiny_tokens, "blocks.0.hook_resid_pr", progress=False)
    assert "blocks.0.hook_resid_pre" in str(info.value)
    with pytest.raises(tld.UnknownHookError, match="blocks.0.hook_resid_pre"):
        tld.collect(tiny, tiny_tokens, "hook_resid_pre", progress=False)  # bare suffix: points at the real names
    with pytest.raises(tld.UnknownHookError, match="blocks.7"):
        tld.collect(tiny, tiny_tokens, "blocks.7.*", progress=False)


def test_pattern_hook_is_refused_with_advice(tiny, tiny_tokens):
    with pytest.raises(ValueError, match="head_sync"):
        tld.collect(tiny, tiny_tokens, "blocks.0.attn.hook_pattern", progress=False)


@pytest.mark.parametrize("empty", [torch.zeros(0, 12, dtype=torch.long), [], iter(())])
def test_empty_data(tiny, empty):
    with pytest.raises(tld.EmptyDataError):
        tld.collect(tiny, empty, progress=False)


def test_float_tokens_are_refused(tiny):
    with pytest.raises(TypeError, match="integers"):
        tld.collect(tiny, torch.randn(2, 5), progress=False)


def test_nan_names_hook_and_batch_and_keeps_checkpoint(tmp_path, tiny_tokens):
    model = tiny_model(seed=0)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
    ckpt = tmp_path / "c.safetensors"
    good = [tiny_tokens[:3], tiny_tokens[3:6]]
    bad = tiny_tokens[6:9].clone()
    bad[0, 0] = 22

    def poison(act, hook):  # NaN only where token 22 sits at position 0 of the batch
        if bad.shape == act.shape[:2] and act.shape[0] == 3 and poison.armed:
            act = act.clone()
            act[0, 0, 0] = float("nan")
            return act
        return None

    poison.armed = False

    def data():
        yield from good
        poison.armed = True
        yield bad

    model.add_hook("blocks.1.mlp.hook_post", poison)
    try:
        with pytest.raises(tld.NonFiniteError) as info:
            tld.collect(model, data(), hooks, checkpoint=ckpt, checkpoint_every=1, progress=False)
    finally:
        model.reset_hooks()
    message = str(info.value)
    assert "blocks.1.mlp.hook_post" in message and "batch 2" in message
    kept = tld.Stats.load(ckpt)
    assert kept.progress.batches_seen == 2
    clean = tld.collect(tiny_model(seed=0), good, hooks, progress=False)
    for key, acc in clean.accumulators.items():
        assert kept.accumulators[key] == acc


def test_checkpoint_from_other_model_or_hooks_is_refused(tmp_path, tiny_tokens):
    ckpt = tmp_path / "c.safetensors"
    tld.collect(tiny_model(seed=0), tiny_tokens, "blocks.0.hook_resid_pre", checkpoint=ckpt, progress=False)
    with pytest.raises(tld.CheckpointMismatchError, match="weights"):
        tld.collect(tiny_model(seed=1), tiny_tokens, "blocks.0.hook_resid_pre", checkpoint=ckpt, resume=True,
                    progress=False)
    with pytest.raises(tld.CheckpointMismatchError, match=r"hooks: checkpoint has \[.blocks.0.hook_resid_pre.\]"):
        tld.collect(tiny_model(seed=0), tiny_tokens, "blocks.1.hook_resid_pre", checkpoint=ckpt, resume=True,
                    progress=False)
    with pytest.raises(tld.CheckpointMismatchError, match="d_model"):
        tld.collect(tiny_model(seed=0, d_model=8, d_head=2), tiny_tokens, "blocks.0.hook_resid_pre",
                    checkpoint=ckpt, resume=True, progress=False)


def test_jacobian_of_hook_after_output_is_an_error(tiny, tiny_tokens):
    with pytest.raises(RuntimeError, match="does not depend"):
        tld.collect(tiny, tiny_tokens, "blocks.1.hook_resid_post",
                    jacobians=tld.JacobianConfig(output="blocks.0.hook_resid_post"), progress=False)
