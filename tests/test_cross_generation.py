"""TL 3.x HookedTransformer and TL 4.x TransformerBridge give the same statistics on the same weights.

One process can import only one TransformerLens, so the suite runs once per generation
(``scripts/test.sh``): each run saves its Stats to ``$TL_DEGENERACY_XGEN_DIR`` and compares
with the other generation's file when it is there. With ``TL_DEGENERACY_REQUIRE_XGEN=1`` (set
by the script for the second run) a missing counterpart is a failure, not a skip.
"""
import os
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.generations import installed_generation
from tl_degeneracy.testing import modadd_dataset, modadd_model, tiny_model

pytestmark = pytest.mark.models

HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_pre", "blocks.1.hook_resid_mid",
         "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]


def _compare_or_skip(name: str, stats: tld.Stats) -> None:
    folder = os.environ.get("TL_DEGENERACY_XGEN_DIR")
    if not folder:
        pytest.skip("set TL_DEGENERACY_XGEN_DIR (scripts/test.sh does) to compare TL generations")
    mine, other = installed_generation(), 7 - installed_generation()
    Path(folder).mkdir(parents=True, exist_ok=True)
    stats.save(Path(folder) / f"{name}_tl{mine}.safetensors")
    theirs_path = Path(folder) / f"{name}_tl{other}.safetensors"
    if not theirs_path.exists():
        if os.environ.get("TL_DEGENERACY_REQUIRE_XGEN"):
            pytest.fail(f"no TL {other} statistics at {theirs_path} to compare with")
        pytest.skip(f"TL {other} statistics not there yet (saved TL {mine}'s)")
    theirs = tld.Stats.load(theirs_path)
    assert set(theirs.accumulators) == set(stats.accumulators)
    assert theirs.run.model["class"] != stats.run.model["class"]
    assert theirs.run.config == stats.run.config and theirs.n_tokens == stats.n_tokens
    for key, acc in stats.accumulators.items():
        for field in ("S_triu", "s"):
            a, b = acc.tensors[field], theirs.accumulators[key].tensors[field]
            assert float((a - b).norm() / b.norm()) < 1e-10, (key, field)
        assert int(acc.tensors["n"]) == int(theirs.accumulators[key].tensors["n"])


def test_tiny_model_statistics_agree_across_generations(tiny_tokens):
    stats = tld.collect(tiny_model(seed=0), tiny_tokens, HOOKS,
                        jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]), batch_size=4, progress=False)
    _compare_or_skip("tiny", stats)


def test_modadd_statistics_agree_across_generations(modadd_dir):
    model = modadd_model(modadd_dir, dtype=torch.float64)
    stats = tld.collect(model, modadd_dataset("train")[:256], ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z",
                        "blocks.0.mlp.hook_post"], jacobians=tld.JacobianConfig(n_probes=3, output_positions=[-1]),
                        batch_size=64, progress=False)
    _compare_or_skip("modadd", stats)


def test_edits_at_resid_mid_reach_the_skip_path_on_both_generations():
    """On the bridge hook_resid_mid is ln2.hook_in; the splice carries edits to the skip path too,
    so an edit there changes the logits exactly as on a HookedTransformer."""
    from tl_degeneracy.basis import InteractionBasis
    from tl_degeneracy.basis.splice import splice

    model = tiny_model(seed=0)
    tokens = torch.randint(0, 23, (16, 12), generator=torch.Generator().manual_seed(2))
    hook = "blocks.1.hook_resid_mid"
    stats = tld.collect(model, tokens, hook, jacobians=tld.JacobianConfig(n_probes=2), progress=False)
    basis = InteractionBasis.fit(stats)

    def zero_top(f_hat, hook):
        f_hat[..., :2] = 0.0
        return f_hat

    with splice(model, basis):
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.hook_ib", zero_top)]).detach()
    from tl_degeneracy.collection.accumulators import GramAccumulator

    assert stats.run is not None
    as_stats = tld.Stats({("activations", "edited_logits"): GramAccumulator.from_batch(edited.reshape(-1, 23))},
                         tld.RunRecord(model=stats.run.model, config={"hooks": ["edited_logits"]}))
    _compare_or_skip("edited_resid_mid", as_stats)
