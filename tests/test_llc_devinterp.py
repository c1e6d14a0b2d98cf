"""Against the field's tool: devinterp's SGLD (``SGMCMC.sgld`` driven by its own
``sample_single_chain``) estimating the LLC of the same behavioural loss on the same model,
with the same step size, inverse temperature, localisation, burn-in and draws, agrees with
``estimate_neff`` (Euler integrator: devinterp's update) within their standard errors.

devinterp is a test-only dependency (``pip install --no-deps devinterp``: its samplers need
only torch, numpy, pydantic and transformers); without it this test is skipped.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from tl_degeneracy.llc import estimate_neff, resolve_subset
from tl_degeneracy.llc.config import ParamSubset
from tl_degeneracy.llc.estimate import mean_and_se
from tl_degeneracy.testing import tiny_model

ETA, T, GAMMA, BURN_IN, DRAWS, CHAINS = 0.01, 10.0, 1.0, 50, 300, 3


def devinterp_llc(model, tokens, param_name: str) -> tuple[float, float]:
    """devinterp's estimate ``nβ·(mean draw loss − init loss)`` (init loss 0) and its standard error."""
    pytest.importorskip("devinterp", reason="devinterp is not installed (test-only: pip install --no-deps devinterp)")
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    with torch.no_grad():
        z_star = model(tokens).detach()

    def evaluate(m, data):  # the behavioural loss L_B = 1/n Σ ½‖z − z*‖² over the full data
        z = m(data["input_ids"])
        return 0.5 * (z - z_star).square().sum(-1).mean(), {}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return tokens.shape[0]

        def __getitem__(self, i):
            return {"input_ids": tokens[i]}

    draws: dict[int, list[float]] = {}

    def record(loss, draw, chain, model, optimizer):
        draws.setdefault(chain, []).append(float(loss))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(CHAINS):
            sample_single_chain(model, Rows(), evaluate, {param_name: None}, num_draws=DRAWS,
                                num_burnin_steps=BURN_IN, sampling_method=SGMCMC.sgld,
                                sampling_method_kwargs=dict(lr=ETA, nbeta=T, localization=GAMMA), chain=c,
                                seed=100 + c, batch_size=tokens.shape[0], shuffle=False, callbacks=[record])
    per_chain = [mean_and_se(np.array(d)) for d in draws.values()]
    assert all(len(d) == DRAWS for d in draws.values())
    lam = [T * m for m, _ in per_chain]
    se_within = T * math.sqrt(sum(s ** 2 for _, s in per_chain)) / len(per_chain)
    se_between = float(np.std(lam, ddof=1)) / math.sqrt(len(lam))
    return float(np.mean(lam)), max(se_within, se_between)


@pytest.mark.models
def test_devinterp_sgld_agrees_within_standard_errors():
    pytest.importorskip("devinterp", reason="devinterp is not installed (test-only: pip install --no-deps devinterp)")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model(seed=0)
        tokens = torch.randint(0, 23, (8, 12), generator=torch.Generator().manual_seed(0))
        subset = ParamSubset("unembed.W_U")
        (slot,) = resolve_subset(model, subset)
        ours = estimate_neff(model, tokens, eps=1 / T, params=subset, gamma=GAMMA, step_size=ETA,
                             integrator="euler", preconditioner="none", n_chains=CHAINS, n_draws=DRAWS,
                             burn_in=BURN_IN, seed=7, progress=False).scales[0]
        theirs, theirs_se = devinterp_llc(model, tokens, slot.name)
    finally:
        torch.set_num_threads(before)
    assert ours.kept == CHAINS
    gap = abs(ours.lambda_hat - theirs)
    combined = math.hypot(ours.standard_error / 2, theirs_se)
    assert gap <= 3 * combined, (ours.lambda_hat, theirs, ours.standard_error / 2, theirs_se)
    assert combined < 0.02 * theirs  # the agreement is not a wide-error-bar accident
