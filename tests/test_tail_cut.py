"""Exact mode cuts the tail after the last attention layer to the output positions (tail_cut.py).

The cut must change nothing but the work: the same ``M`` as the uncut exact mode (itself checked
against dense autograd references elsewhere), also at hook points after the cut and at positions
it drops, on both generations; and a model whose tail mixes positions must be noticed and run
in full.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import tl_degeneracy as tld
import tl_degeneracy.collection.batch_pass as batch_pass
from tl_degeneracy.collection.tail_cut import TailCut, tail_cut
from tl_degeneracy.testing import modadd_dataset, modadd_model, tiny_model

pytestmark = pytest.mark.models

TINY_HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid",
              "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]
MODADD_HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def cuts(monkeypatch, recwarn) -> Iterator[list[TailCut]]:
    """Every cut the run made (to check that the cut really happened, and was not rerun in full)."""
    made: list[TailCut] = []

    def spy(*args, **kwargs):
        cut = tail_cut(*args, **kwargs)
        if cut is not None:
            made.append(cut)
        return cut

    monkeypatch.setattr(batch_pass, "tail_cut", spy)
    yield made
    assert not [w for w in recwarn if "cutting the tail" in str(w.message)], "a batch fell back to the full run"


def _uncut(monkeypatch, *args, **kwargs) -> tld.Stats:
    with monkeypatch.context() as m:
        m.setattr(batch_pass, "tail_cut", lambda *a, **k: None)
        return tld.collect(*args, **kwargs)


@pytest.mark.parametrize("output_positions", [[-1], [4]], ids=["last", "middle"])
@pytest.mark.parametrize("space", ["residual", "vocabulary"])
def test_the_cut_gives_the_uncut_exact_gram_at_every_hook_and_position(output_positions, space, cuts, monkeypatch,
                                                                       device):
    model = tiny_model(seed=2, device=device)
    tokens = torch.randint(0, 23, (6, 9), generator=torch.Generator().manual_seed(3))
    jac = tld.JacobianConfig(exact=True, output_positions=output_positions, probe_space=space)
    kw = dict(jacobians=jac, batch_size=4, progress=False)
    got = tld.collect(model, tokens, TINY_HOOKS, **kw)
    assert cuts and all(cut.fired for cut in cuts), "no cut was made: the test would compare a run with itself"
    want = _uncut(monkeypatch, model, tokens, TINY_HOOKS, **kw)
    for hook in TINY_HOOKS:
        torch.testing.assert_close(got.gram(hook), want.gram(hook), rtol=1e-12, atol=1e-12)
        assert _rel(got.jacobian_gram(hook), want.jacobian_gram(hook)) < 1e-12, hook
    # position 0 is not read: after the last attention layer it has no Jacobian, cut or not
    early = tld.collect(model, tokens, TINY_HOOKS[-2:], positions={TINY_HOOKS[-1]: [0], TINY_HOOKS[-2]: [0]}, **kw)
    for hook in TINY_HOOKS[-2:]:
        assert float(early.jacobian_gram(hook).abs().max()) == 0.0


def test_the_cut_on_the_modadd_model_with_positions_per_hook(cuts, monkeypatch):
    """RIB's task (benchmarks/modadd_bases.py) on a slice of its data; a model without LayerNorm."""
    model = modadd_model(dtype=torch.float64)
    data = modadd_dataset("train")[:60]
    kw = dict(positions={MODADD_HOOKS[1]: [-1], MODADD_HOOKS[2]: [-1]},
              jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]), batch_size=25, progress=False)
    got = tld.collect(model, data, MODADD_HOOKS, **kw)
    assert cuts and all(cut.fired for cut in cuts)
    want = _uncut(monkeypatch, model, data, MODADD_HOOKS, **kw)
    for hook in MODADD_HOOKS:
        assert got.n_datapoints(hook) == want.n_datapoints(hook)
        assert _rel(got.jacobian_gram(hook), want.jacobian_gram(hook)) < 1e-12, hook


def test_the_cut_with_padding(cuts, monkeypatch):
    """Left-padded rows: the output position is real in every row, the padding is masked."""
    model = tiny_model(seed=2)
    tokens = torch.randint(0, 23, (4, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[:2, :3] = False
    data = [{"tokens": tokens, "attention_mask": mask}]
    kw = dict(jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]), progress=False)
    got = tld.collect(model, data, TINY_HOOKS[:3], **kw)
    assert cuts and all(cut.fired for cut in cuts)
    want = _uncut(monkeypatch, model, data, TINY_HOOKS[:3], **kw)
    for hook in TINY_HOOKS[:3]:
        assert _rel(got.jacobian_gram(hook), want.jacobian_gram(hook)) < 1e-12, hook


def test_a_tail_that_mixes_positions_is_noticed_and_run_in_full(monkeypatch):
    """A hook after the cut mixes positions (adds the mean over them): the cut output differs,
    so the batch is rerun without the cut, with a warning, and M is the uncut one."""
    model = tiny_model(seed=2)
    tokens = torch.randint(0, 23, (5, 7), generator=torch.Generator().manual_seed(5))

    def mix(act: torch.Tensor, hook) -> torch.Tensor:
        return act + act.mean(dim=1, keepdim=True)

    kw = dict(jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]), progress=False)
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", mix)]):
        with pytest.warns(RuntimeWarning, match="does not allow cutting the tail"):
            got = tld.collect(model, tokens, TINY_HOOKS[:3], **kw)
        want = _uncut(monkeypatch, model, tokens, TINY_HOOKS[:3], **kw)
    for hook in TINY_HOOKS[:3]:
        assert _rel(got.jacobian_gram(hook), want.jacobian_gram(hook)) < 1e-12, hook


def test_no_cut_where_it_cannot_pay_or_apply():
    model = tiny_model(seed=2)
    assert tail_cut(model, tld.JacobianConfig(exact=True, output_positions=[-1]), 9) is not None
    assert tail_cut(model, tld.JacobianConfig(n_probes=4, output_positions=[-1]), 9) is None  # probes
    assert tail_cut(model, tld.JacobianConfig(exact=True), 9) is None  # every position is read
    assert tail_cut(model, tld.JacobianConfig(exact=True, output_positions=[0, -1]), 9) is None
    local = tld.JacobianConfig(exact=True, output="blocks.0.hook_resid_post", output_positions=[-1])
    assert tail_cut(model, local, 9) is None  # an output hook may sit before the last block
