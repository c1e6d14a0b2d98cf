"""The N_eff(ε) estimator as a product: bad input, flagged chains, checkpoint/resume, ranks,
parameter subsets on both TransformerLens generations, result files, plots and the CLI command."""
from __future__ import annotations

import argparse
import json
import math
import os
import socket

import pytest
import torch
from torch import nn

from tl_degeneracy.checkpoint import CheckpointMismatchError
from tl_degeneracy.llc import (
    ChainCallback,
    LLCConfig,
    NeffResult,
    ParamSubset,
    estimate_neff,
    resolve_subset,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops lose to thread synchronisation


class Linear(nn.Module):
    """``z = w ⊙ x``: L_B = ½ Σ_j mean(x_j²) w_j², regular (N_eff → D as ε → 0)."""

    def __init__(self, copies: int = 8):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(copies, dtype=torch.float64))
        self.calls = 0
        self.poison: range = range(0)

    def forward(self, x):
        self.calls += 1
        z = x * self.w
        return z * math.nan if self.calls in self.poison else z


def xs(n: int = 32, d: int = 8) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


QUICK = dict(gamma=1.0, n_chains=3, n_draws=60, burn_in=20, step_size=0.005, preconditioner="none", progress=False)


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, needle", [
    (dict(eps=0.0), "eps"),
    (dict(eps=[1e-2, -1.0]), "eps"),
    (dict(eps=math.nan), "eps"),
    (dict(eps=1e-2, gamma=0.0), "gamma"),
    (dict(eps=1e-2, gamma=-3), "gamma"),
    (dict(eps=1e-2, step_size=0.0), "step_size"),
    (dict(eps=1e-2, step_size=-1e-3), "step_size"),
    (dict(eps=1e-2, n_chains=0), "n_chains"),
    (dict(eps=1e-2, integrator="heun"), "integrator"),
    (dict(eps=1e-2, step_fraction=5.0), "step_fraction"),
    (dict(eps=[]), "eps"),
])
def test_bad_settings_name_what_to_change(options, needle):
    with pytest.raises(ValueError, match=needle):
        LLCConfig(**options)
    with pytest.raises(ValueError, match=needle):  # the same through the entry point
        estimate_neff(Linear(), xs(), progress=False, **options)


def test_subset_matching_nothing_is_refused_with_names():
    with pytest.raises(ValueError, match=r"matches no parameter.*Close names: \['w'\]"):
        estimate_neff(Linear(), xs(), eps=1e-2, params="ww", **QUICK)


@pytest.mark.models
def test_head_and_layer_that_do_not_exist_are_refused(tiny):
    with pytest.raises(ValueError, match="head=7 does not exist"):
        resolve_subset(tiny, ParamSubset("blocks.0.attn.W_Q", head=7))
    with pytest.raises(ValueError, match="no head axis"):
        resolve_subset(tiny, ParamSubset("blocks.0.*", head=0))
    with pytest.raises(ValueError, match="matches no parameter"):
        resolve_subset(tiny, ParamSubset(layer=9))


def test_nan_in_one_chain_is_reported_and_the_others_kept():
    model = Linear()
    n_steps = QUICK["n_draws"] + QUICK["burn_in"]
    model.poison = range(n_steps + 12, n_steps + 13)  # call 1: z*; chain 0: calls 2..n+1; chain 1 step 10
    result = estimate_neff(model, xs(), eps=1e-2, **QUICK)
    s = result.scales[0]
    assert [c.status for c in s.chains] == ["ok", "diverged", "ok"]
    assert "non-finite loss" in s.chains[1].reason and s.chains[1].steps_run == 10
    assert s.kept == 2 and any("chain 1 diverged" in f for f in s.flags)
    assert s.n_eff == pytest.approx((s.chains[0].n_eff + s.chains[2].n_eff) / 2)


def test_every_chain_diverging_is_one_error_naming_step_size_and_gamma():
    with pytest.raises(ValueError, match=r"every chain diverged.*smaller step_size.*larger gamma"):
        estimate_neff(Linear(), xs(), eps=1e-6, gamma=1.0, n_chains=2, n_draws=10, burn_in=0, step_size=1.0,
                      preconditioner="none", progress=False)


def test_nan_at_the_analysed_weights_is_refused():
    model = Linear()
    model.poison = range(1, 2)
    with pytest.raises(ValueError, match="output at θ\\* is not finite"):
        estimate_neff(model, xs(), eps=1e-2, **QUICK)


def test_a_drifting_trace_is_flagged_not_averaged():
    # No burn-in and a step far too small to equilibrate: t·L_B climbs from 0 all chain long.
    result = estimate_neff(Linear(64), xs(32, 64), eps=1e-3, gamma=1.0, n_chains=2, n_draws=200, burn_in=0,
                           step_size=1e-6, progress=False)
    s = result.scales[0]
    assert all(c.status == "drifted" and "burn_in" in c.reason for c in s.chains)
    assert s.kept == 0 and math.isnan(s.n_eff) and "no chain passed" in s.flags[-1]


# -- reproducibility, checkpoints, ranks ---------------------------------------------------------------

def traces(result: NeffResult) -> list[list[float]]:
    return [c.trace for s in result.scales for c in s.chains]


class Interrupt(ChainCallback):
    def __init__(self, chain: int, step: int):
        self.at = (chain, step)

    def on_step(self, chain, step, loss):
        if (chain.index, step) == self.at:
            raise KeyboardInterrupt


def test_seeded_runs_repeat_and_resume_gives_the_uninterrupted_result(tmp_path):
    options = dict(eps=[1e-2, 1e-1], n_chains=2, n_draws=80, burn_in=20, gamma=1.0, progress=False,
                   checkpoint_every=25, seed=5)
    whole = estimate_neff(Linear(), xs(), **options)
    assert traces(estimate_neff(Linear(), xs(), **options)) == traces(whole)
    path = tmp_path / "llc.safetensors"
    with pytest.raises(KeyboardInterrupt):
        estimate_neff(Linear(), xs(), checkpoint=path, callbacks=[Interrupt(chain=1, step=60)], **options)
    assert path.exists()
    resumed = estimate_neff(Linear(), xs(), checkpoint=path, resume=True, **options)
    assert traces(resumed) == traces(whole)
    assert [s.step_size for s in resumed.scales] == [s.step_size for s in whole.scales]
    with pytest.raises(CheckpointMismatchError, match=r"config\.gamma: checkpoint has 1\.0, this run has 2\.0"):
        estimate_neff(Linear(), xs(), checkpoint=path, resume=True, **{**options, "gamma": 2.0})
    with pytest.raises(CheckpointMismatchError, match=r"target\.data_sha256"):
        estimate_neff(Linear(), xs() + 1, checkpoint=path, resume=True, **options)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = estimate_neff(Linear(), xs(), eps=[1e-2, 1e-1], n_chains=3, n_draws=40, burn_in=10, gamma=1.0,
                               progress=False, seed=2)
        if rank == 0:
            with open(out, "w") as fh:
                json.dump(result.to_dict(), fh)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_the_chains_and_give_the_single_process_result(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.json")
    mp.spawn(_rank_main, args=(2, port, out), nprocs=2, join=True)
    two = NeffResult.from_dict(json.loads(open(out).read()))
    one = estimate_neff(Linear(), xs(), eps=[1e-2, 1e-1], n_chains=3, n_draws=40, burn_in=10, gamma=1.0,
                        progress=False, seed=2)
    assert two.world_size == 2
    assert traces(two) == traces(one)
    assert [s.n_eff for s in two.scales] == pytest.approx([s.n_eff for s in one.scales], rel=1e-12)


# -- subsets on TransformerLens models, results, plots, CLI -------------------------------------------

@pytest.mark.models
def test_head_slice_moves_exactly_that_heads_tl_weights(tiny_on):
    """A slot's entries are the TransformerLens tensor's: perturbing them moves W_V[1] and nothing else."""
    tiny = tiny_on
    (slot,) = resolve_subset(tiny, ParamSubset("blocks.1.attn.W_V", head=1))
    assert slot.numel == 16 * 4 and slot.label == "blocks.1.attn.W_V[1]"

    def tl_tensors():
        if hasattr(tiny, "tl_named_parameters"):
            return {k: v.detach().clone() for k, v in tiny.tl_named_parameters()}
        return {k: v.detach().clone() for k, v in tiny.named_parameters()}

    before = tl_tensors()
    center = slot.read().clone()
    try:
        slot.write(center + torch.arange(1, slot.numel + 1, dtype=center.dtype, device=center.device))
        after = tl_tensors()
    finally:
        slot.write(center)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"blocks.1.attn.W_V"}
    delta = after["blocks.1.attn.W_V"] - before["blocks.1.attn.W_V"]
    assert delta[[0, 2, 3]].abs().max() == 0 and bool((delta[1] != 0).all())
    assert torch.equal(tl_tensors()["blocks.1.attn.W_V"], before["blocks.1.attn.W_V"])  # θ* restored


@pytest.mark.models
def test_head_slice_estimate_result_file_and_plots(tiny, tiny_tokens, tmp_path):
    from tl_degeneracy.llc.plots import layer_bars, loss_traces, neff_curve

    weights = {k: v.detach().clone() for k, v in tiny.state_dict().items()}
    result = estimate_neff(tiny, tiny_tokens, eps=[1e-3, 1e-1], params=ParamSubset("blocks.0.attn.W_[QKV]", head=2),
                           gamma=100.0, n_chains=2, n_draws=40, burn_in=10, progress=False, output_positions=[-1])
    assert result.n_params == 3 * 16 * 4
    assert all(torch.equal(weights[k], v) for k, v in tiny.state_dict().items())  # the model is back at θ*
    s_small, s_big = result.scales
    assert 0 < s_big.n_eff < s_small.n_eff < result.n_params  # smaller ε, stiffer cut, more directions count
    path = tmp_path / "llc.json"
    result.save(path)
    again = NeffResult.load(path)
    assert again.to_dict() == result.to_dict()
    assert json.loads(path.read_text())["config"]["output_positions"] == [-1]
    assert "trace" not in result.to_dict(traces=False)["scales"][0]["chains"][0]
    for png in (neff_curve(result, tmp_path / "curve.png", kfac=[100, 20], quadratic=[90.0, 10.0]),
                loss_traces(result, tmp_path / "traces.png"),
                layer_bars({"W_QKV[2]": result}, 1e-3, tmp_path / "bars.png", kfac={"W_QKV[2]": 100})):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.models
def test_kl_and_hook_outputs(tiny, tiny_tokens):
    # burn-in 30: the preconditioned chain overshoots in its first steps (burn-in 5 was flagged as drifting)
    kl = estimate_neff(tiny, tiny_tokens, eps=1e-2, params="unembed.W_U", loss="kl", gamma=100.0, n_chains=1,
                       n_draws=60, burn_in=30, progress=False)
    local = estimate_neff(tiny, tiny_tokens, eps=1e-2, params="blocks.0.attn.W_V", output="blocks.0.attn.hook_v",
                          gamma=100.0, n_chains=1, n_draws=60, burn_in=30, progress=False)
    assert kl.scales[0].kept == 1 and local.scales[0].kept == 1
    with pytest.raises(ValueError, match="needs output='logits'"):
        LLCConfig(eps=1e-2, loss="kl", output="blocks.0.hook_resid_post")


def _cli(argv: list[str]) -> int:
    """What tl_degeneracy.cli.main does with the subcommand: UsageError → one paragraph, exit 2."""
    from tl_degeneracy.cli.common import Parser, UsageError, paragraph
    from tl_degeneracy.cli.llc import add_parser

    parser = Parser(prog="tl-degeneracy")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except UsageError as exc:
        print(f"error: {paragraph(exc)}", file=__import__("sys").stderr)
        return 2


@pytest.mark.models
def test_cli_llc_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(["llc", "--eps", "0"]) == 2
    assert "positive" in capsys.readouterr().err
    assert _cli(["llc", "--eps", "1e-2", "--params", "blocks.9.nothing", "--tokens", "64", "--context", "16",
                 "--out", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the parameter subset") and "Traceback" not in err and not os.path.exists("bad")
    code = _cli(["llc", "--eps", "1e-2", "1e-1", "--params", "blocks.3.attn.W_V", "--head", "0", "--chains", "2",
                 "--draws", "60", "--burn-in", "100", "--pilot-steps", "20", "--tokens", "64", "--context", "16",
                 "--kfac", "--no-progress", "--out", "run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "K-FAC #{g·k > γε}" in out and "N_eff(ε) of 4096 parameters" in out
    saved = NeffResult.load(tmp_path / "run" / "llc.json")
    assert saved.n_params == 128 * 32 and len(saved.scales) == 2
    assert (tmp_path / "run" / "plots" / "llc_curve.png").exists() and (tmp_path / "run" / "plots" /
                                                                       "llc_traces.png").exists()
    assert not (tmp_path / "run" / "llc_checkpoint.safetensors").exists()


def test_cli_parser_help_lists_options():
    from tl_degeneracy.cli.llc import add_parser

    parser = argparse.ArgumentParser(prog="tl-degeneracy")
    add_parser(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["llc"].format_help()  # type: ignore[union-attr]
    for option in ("--eps", "--gamma", "--params", "--layer", "--head", "--chains", "--draws", "--burn-in",
                   "--step-size", "--resume", "--kfac", "--preconditioner", "--pilot-steps", "--pilot-seconds"):
        assert option in text
