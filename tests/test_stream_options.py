"""``StreamOptions``: one definition of how a pass runs, taken by the Gram pass, the edge pass and the sampler."""
from __future__ import annotations

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy import StreamOptions
from tl_degeneracy.interactions import collect_edges, node_bases
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models
NODES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def test_options_object_equals_keywords(tiny_tokens):
    model = tiny_model(seed=0)
    a = tld.collect(model, tiny_tokens, NODES, jacobians=True, options=StreamOptions(max_tokens=48, progress=False))
    b = tld.collect(model, tiny_tokens, NODES, jacobians=True, max_tokens=48, progress=False)
    assert a.n_tokens == b.n_tokens == 48
    for hook in NODES:
        assert torch.equal(a.gram(hook), b.gram(hook)) and torch.equal(a.jacobian_gram(hook), b.jacobian_gram(hook))
    # keywords override the object's fields
    c = tld.collect(model, tiny_tokens, NODES, options=StreamOptions(max_tokens=48), max_tokens=24, progress=False)
    assert c.n_tokens == 24


@pytest.mark.parametrize("call", ["collect", "collect_edges", "estimate_neff"])
def test_every_pass_names_the_streaming_options_on_a_typo(call, tiny_tokens):
    model = tiny_model(seed=0)
    with pytest.raises(TypeError, match="max_tokens"):
        if call == "collect":
            tld.collect(model, tiny_tokens, NODES, max_token=48)
        elif call == "collect_edges":
            stats = tld.collect(model, tiny_tokens, NODES, jacobians=True, progress=False)
            collect_edges(model, tiny_tokens, node_bases(stats, NODES), NODES, max_token=48)
        else:
            tld.estimate_neff(model, tiny_tokens, eps=1e-3, options=StreamOptions(), max_token=48)


def test_edges_and_sampler_honour_max_tokens(tiny_tokens):
    model = tiny_model(seed=0)
    stats = tld.collect(model, tiny_tokens, NODES, jacobians=True, progress=False)
    graphs = collect_edges(model, tiny_tokens, node_bases(stats, NODES), NODES, n_probes=1,
                           options=StreamOptions(max_tokens=24, progress=False))
    assert graphs["pca"].meta["n_tokens"] == 24
    result = tld.estimate_neff(model, tiny_tokens, eps=1e-2, params="blocks.1.attn.W_V", n_chains=1, n_draws=4,
                               burn_in=0, step_size=1e-6, max_tokens=24, progress=False)
    assert result.target["n_datapoints"] == 24


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("checkpoint_every", 0), ("checkpoint_seconds", -1.0),
                                          ("max_tokens", 2.5)])
def test_bad_options_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        StreamOptions(**{field: value})
