"""The typed configuration API: validated frozen configs, the run record, Stats algebra,
observers as objects, one place for synchronisation results, and one rank convention."""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy import (
    AdditiveAccumulator,
    GramAccumulator,
    HeadSync,
    JacobianConfig,
    NeuronSync,
    Observer,
    RunConfig,
    Stats,
    collect,
)
from tl_degeneracy.linalg import gram_rank, matrix_rank

REPO = Path(__file__).resolve().parents[1]
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


# -- JacobianConfig validation (no model) --------------------------------------------------------

@pytest.mark.parametrize("n_probes", [0, -1, True, 2.0, "4"])
def test_bad_n_probes_are_refused_pointing_at_exact(n_probes):
    with pytest.raises(ValueError, match=r"exact=True"):
        JacobianConfig(n_probes=n_probes)


def test_exact_with_n_probes_is_refused():
    with pytest.raises(ValueError, match=r"exact=True"):
        JacobianConfig(exact=True, n_probes=4)


def test_defaults_and_exact_mode():
    assert JacobianConfig().n_probes == 4
    assert JacobianConfig(exact=True).n_probes is None
    assert JacobianConfig(n_probes=1).n_probes == 1


def test_callable_output_with_output_positions_is_refused():
    with pytest.raises(ValueError, match="output_positions"):
        JacobianConfig(output=lambda z: z, output_positions=[-1])


@pytest.mark.models
def test_callable_output_with_output_positions_is_refused_by_collect(tiny, tiny_tokens):
    with pytest.raises(ValueError, match="output_positions"):
        collect(tiny, tiny_tokens, HOOKS, jacobians=JacobianConfig(output=lambda z: z, output_positions=[-1]),
                progress=False)


def test_kl_with_a_hook_output_is_refused():
    with pytest.raises(ValueError, match="kl"):
        JacobianConfig(loss="kl", output="blocks.1.hook_resid_post")
    assert JacobianConfig(loss="kl").behavioral_loss.name == "kl"  # on the logits it is fine


@pytest.mark.parametrize("options, word", [
    (dict(loss="cross_entropy"), "loss"),
    (dict(loss=None), "loss"),
    (dict(probe="uniform"), "probe"),
    (dict(probe_chunk=0), "probe_chunk"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(output_positions=[]), "output_positions"),
    (dict(output_positions=[0.5]), "output_positions"),
    (dict(probe_space="logits"), "probe_space"),
    (dict(chunk_budget_bytes=0), "chunk_budget_bytes"),
    (dict(output="blocks.0.hook_resid_post", probe_space="residual"), "probe_space='residual' needs"),
])
def test_unknown_names_and_bad_values_are_refused(options, word):
    with pytest.raises(ValueError, match=word):
        JacobianConfig(**options)


def test_output_transform_needs_a_hook_output():
    with pytest.raises(ValueError, match="output_transform"):
        JacobianConfig(output_transform=lambda f: f)
    cfg = JacobianConfig(output="blocks.1.hook_resid_post", output_transform=lambda f: f)
    assert cfg.to_dict()["output_transform"] is not None  # named in the identity


def test_jacobian_config_is_frozen_and_round_trips():
    cfg = JacobianConfig(n_probes=3, loss="kl", probe="gaussian", seed=5, output_positions=[-1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_probes = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.exact = True  # type: ignore[misc]
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert JacobianConfig.from_dict(d).to_dict() == d
    assert d == {"exact": False, "n_probes": 3, "output": "logits", "output_positions": [-1], "loss": "kl",
                 "probe": "gaussian", "seed": 5, "output_transform": None, "probe_space": "auto"}
    assert "probe_chunk" not in d  # memory, not results


# -- RunConfig -----------------------------------------------------------------------------------

@pytest.mark.models
def test_run_config_is_frozen_and_its_dict_is_the_run_record(tiny, tiny_tokens, tmp_path):
    config = RunConfig.build(tiny, "blocks.*.hook_resid_pre", jacobians=JacobianConfig(n_probes=2),
                             jacobian_hooks=["blocks.1.hook_resid_pre"], positions=[-1, 0], batch_size=4,
                             observers=[HeadSync(layers=[1])])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hooks = ()  # type: ignore[misc]
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["hooks"] == HOOKS and d["jacobian_hooks"] == ["blocks.1.hook_resid_pre"]
    assert d["positions"] == [-1, 0] and d["batch_size"] == 4
    assert d["observers"] == [{"kind": "head_sync", "layers": [1]}]

    stats = collect(tiny, tiny_tokens, config=config, progress=False)
    assert stats.run is not None
    assert stats.run.config == d
    stats.save(tmp_path / "s.safetensors")
    loaded = Stats.load(tmp_path / "s.safetensors")
    assert loaded.run == stats.run
    assert loaded.run.identity() == stats.run.identity()
    # the same options as keywords give the same record
    again = collect(tiny, tiny_tokens, "blocks.*.hook_resid_pre", jacobians=JacobianConfig(n_probes=2),
                    jacobian_hooks=["blocks.1.hook_resid_pre"], positions=[-1, 0], batch_size=4,
                    observers=[HeadSync(layers=[1])], progress=False)
    assert again.run == stats.run


@pytest.mark.models
def test_run_config_validates(tiny):
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig.build(tiny, HOOKS, batch_size=0)
    with pytest.raises(ValueError, match="context"):
        RunConfig.build(tiny, HOOKS, context=13)  # n_ctx is 12
    with pytest.raises(ValueError, match="jacobian_hooks"):
        RunConfig.build(tiny, HOOKS, jacobian_hooks=HOOKS[:1])  # without jacobians
    m_only = RunConfig.build(tiny, HOOKS[:1], jacobians=True, jacobian_hooks=HOOKS[1:])  # M without G there
    assert m_only.hooks == tuple(HOOKS[:1]) and m_only.jacobian_hooks == tuple(HOOKS[1:])
    with pytest.raises(TypeError):
        RunConfig.build(tiny, HOOKS, jacobians="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="once"):
        RunConfig.build(tiny, HOOKS, observers=[HeadSync(layers=[0]), HeadSync(layers=[1])])
    with pytest.raises(ValueError, match="layers"):
        RunConfig.build(tiny, HOOKS, observers=[HeadSync(layers=[2])])


@pytest.mark.models
def test_the_readme_simple_call_still_works(tiny, tiny_tokens):
    stats = collect(tiny, tiny_tokens, "blocks.*.hook_resid_pre", jacobians=True, progress=False)
    assert stats.hooks == HOOKS and stats.jacobian_hooks == HOOKS
    assert stats.jacobian_gram(HOOKS[1]).shape == (16, 16)
    # the defaults, with probe_space="auto" resolved against the model (MSE on logits: residual basis)
    assert stats.run is not None and stats.run.jacobians == JacobianConfig(probe_space="residual").to_dict()
    assert stats.run.jacobians["n_probes"] == 4


@pytest.mark.models
def test_config_and_its_options_together_are_refused(tiny, tiny_tokens):
    config = RunConfig.build(tiny, HOOKS)
    for extra in (dict(hooks=HOOKS), dict(batch_size=2), dict(jacobians=True), dict(positions=[-1]),
                  dict(observers=[HeadSync()]), dict(context=4), dict(jacobian_hooks=HOOKS)):
        with pytest.raises(TypeError, match="config"):
            collect(tiny, tiny_tokens, config=config, progress=False, **extra)


@pytest.mark.models
@pytest.mark.parametrize("keyword", ["head_sync", "neuron_sync", "n_probes", "exact", "behavioral_loss"])
def test_old_keywords_are_unknown(tiny, tiny_tokens, keyword):
    """Observers are objects (observers=[HeadSync()]), Jacobian options a JacobianConfig."""
    with pytest.raises(TypeError, match=keyword):
        collect(tiny, tiny_tokens, HOOKS, progress=False, **{keyword: True})


@pytest.mark.models
def test_observers_must_be_observer_objects(tiny, tiny_tokens):
    with pytest.raises(TypeError, match="Observer"):
        collect(tiny, tiny_tokens, HOOKS, observers=["head_sync"], progress=False)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Observer"):
        collect(tiny, tiny_tokens, HOOKS, observers=[HeadSync], progress=False)  # type: ignore[list-item]


# -- a custom observer, with no registry ---------------------------------------------------------

class TokenCount(AdditiveAccumulator):
    """How many datapoints an observer saw (a custom accumulator)."""

    fields = ("n",)
    kind = "test_config_api_token_count"


@dataclass(frozen=True)
class CountAndGram(Observer):
    """Counts the datapoints and takes the Gram at one hook, as a user-written observer would."""

    kind: ClassVar[str] = "test_count_and_gram"
    hook: str = "blocks.0.hook_resid_post"

    def hooks(self) -> list[str]:
        return [self.hook]

    def compute(self, cache, mask):
        act = cache[self.hook]
        return {
            (self.kind, "count"): TokenCount({"n": mask.sum().to(torch.int64)}),
            (self.kind, self.hook): GramAccumulator.from_batch(act[mask]),
        }


@pytest.mark.models
@pytest.mark.parametrize("jacobians", [False, True], ids=["no-jacobians", "jacobians"])
def test_custom_observer_works_through_collect(tiny, tiny_tokens, tmp_path, jacobians):
    hook = "blocks.0.hook_resid_post"
    observer = CountAndGram()
    stats = collect(tiny, tiny_tokens, [hook], jacobians=jacobians, observers=[observer], positions=[-1, -2],
                    batch_size=3, progress=False)
    assert stats.groups() >= {"activations", CountAndGram.kind}
    count = stats.accumulator(CountAndGram.kind, "count")
    assert isinstance(count, TokenCount) and int(count.tensors["n"]) == 2 * tiny_tokens.shape[0]
    mine = stats.accumulator(CountAndGram.kind, hook)
    theirs = stats.accumulator("activations", hook)
    for field in GramAccumulator.fields:
        torch.testing.assert_close(mine.tensors[field], theirs.tensors[field], rtol=0, atol=1e-12)
    assert stats.run is not None
    assert stats.run.config["observers"] == [{"kind": CountAndGram.kind, "hook": hook}]
    # its accumulators survive save/load (found by kind, no registration call)
    stats.save(tmp_path / "s.safetensors")
    loaded = Stats.load(tmp_path / "s.safetensors")
    assert isinstance(loaded.accumulator(CountAndGram.kind, "count"), TokenCount)
    assert loaded.accumulator(CountAndGram.kind, "count") == count


@pytest.mark.models
@pytest.mark.parametrize("jacobians", [False, True], ids=["no-jacobians", "jacobians"])
def test_observer_hook_that_is_also_a_gram_hook(tiny, tiny_tokens, jacobians):
    """NeuronSync reads mlp.hook_post; asking for the Gram there too must not starve the observer
    (the forward may stop early only once *every* function on the last hook has run)."""
    observers = [NeuronSync(layers=[1])]
    alone = collect(tiny, tiny_tokens, ["blocks.0.hook_resid_pre"], jacobians=jacobians, observers=observers,
                    progress=False)
    both = collect(tiny, tiny_tokens, ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"], jacobians=jacobians,
                   observers=observers, progress=False)
    key = ("neuron_sync", "blocks.1.mlp.hook_pre")
    assert both.accumulators[key] == alone.accumulators[key]


@pytest.mark.models
def test_custom_observer_is_part_of_the_identity(tiny, tiny_tokens, tmp_path):
    path = tmp_path / "c.safetensors"
    collect(tiny, tiny_tokens, HOOKS, observers=[CountAndGram()], batch_size=5, max_tokens=60, checkpoint=path,
            progress=False)
    with pytest.raises(tld.CheckpointMismatchError, match="observers"):
        collect(tiny, tiny_tokens, HOOKS, observers=[CountAndGram(hook="blocks.1.hook_resid_post")], batch_size=5,
                checkpoint=path, resume=True, progress=False)


# -- Stats algebra ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def halves():
    from tl_degeneracy.testing import tiny_model

    model = tiny_model(seed=0)
    tokens = torch.randint(0, 23, (10, 12), generator=torch.Generator().manual_seed(0))
    opts = dict(hooks=HOOKS, jacobians=JacobianConfig(n_probes=2), observers=[HeadSync()], progress=False)
    return model, collect(model, tokens[:5], **opts), collect(model, tokens[5:], **opts), opts, tokens


def _snapshot(stats: Stats) -> dict:
    return {k: {f: t.clone() for f, t in acc.tensors.items()} for k, acc in stats.accumulators.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][f], b[k][f]) for k in a for f in a[k])


@pytest.mark.models
def test_plus_leaves_both_unchanged_and_equals_in_place_merge(halves):
    _, a, b, _, _ = halves
    before_a, before_b = _snapshot(a), _snapshot(b)
    n_a, n_b = a.n_tokens, b.n_tokens
    total = a + b
    assert total is not a and total is not b
    assert _same(_snapshot(a), before_a) and _same(_snapshot(b), before_b)
    assert (a.n_tokens, b.n_tokens) == (n_a, n_b)
    assert total.n_tokens == n_a + n_b and total.n_batches == a.n_batches + b.n_batches

    target = Stats({k: acc.copy() for k, acc in a.accumulators.items()}, a.run, n_tokens=a.n_tokens,
                   n_batches=a.n_batches)
    result = target.merge(b)
    assert result is None, "merge is in place and returns None"
    assert _same(_snapshot(target), _snapshot(total))
    assert target.n_tokens == total.n_tokens and target.progress is None
    assert _same(_snapshot(b), before_b)


@pytest.mark.models
def test_merged_halves_equal_one_run(halves):
    model, a, b, opts, tokens = halves
    whole = collect(model, tokens, **{**opts, "batch_size": 5})
    total = a + b
    # Jacobian probes are drawn per batch index, so only M differs (as another probe draw would)
    for key, acc in whole.accumulators.items():
        if key[0] == "jacobians":
            continue
        for f, t in acc.tensors.items():
            torch.testing.assert_close(total.accumulators[key].tensors[f], t, rtol=1e-12, atol=1e-12)


@pytest.mark.models
def test_merging_different_configs_is_refused(halves):
    model, a, _, opts, tokens = halves
    for change in (dict(jacobians=JacobianConfig(n_probes=3)), dict(positions=[-1]),
                   dict(observers=[HeadSync(layers=[0])]), dict(batch_size=3)):
        other = collect(model, tokens[5:], **{**opts, **change})
        before = _snapshot(a)
        with pytest.raises(ValueError, match="differ"):
            a.merge(other)
        with pytest.raises(ValueError, match="differ"):
            a + other  # noqa: B018
        assert _same(_snapshot(a), before), "a refused merge must not change anything"
    with pytest.raises(TypeError):
        a.merge({})  # type: ignore[arg-type]


# -- imports ---------------------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO), capture_output=True,
                          text=True, timeout=300)


def test_stats_module_itself_depends_on_no_observer():
    """The stats module on its own (package __init__ bypassed) imports no observer, and its source
    names none: Stats knows nothing about head or neuron synchronisation."""
    result = _python(f"""
        import sys, types
        pkg = types.ModuleType('tl_degeneracy')
        pkg.__path__ = [{str(REPO / 'tl_degeneracy')!r}]
        sys.modules['tl_degeneracy'] = pkg
        import tl_degeneracy.collection.stats
        loaded = sorted(m for m in sys.modules if m.startswith('tl_degeneracy.'))
        assert 'tl_degeneracy.sync.heads' not in loaded and 'tl_degeneracy.sync.neurons' not in loaded, loaded
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    tree = ast.parse((REPO / "tl_degeneracy" / "collection" / "stats.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    assert not [m for m in imported if "sync" in m], imported  # not even lazily
    assert not hasattr(Stats, "head_sync") and not hasattr(Stats, "neuron_sync")


# -- analyze: synchronisation stored once, provenance, checkpoint clean-up ---------------------------

def _count_key(tree, key: str) -> int:
    if isinstance(tree, dict):
        return sum((k == key) + _count_key(v, key) for k, v in tree.items())
    if isinstance(tree, list):
        return sum(_count_key(v, key) for v in tree)
    return 0


def _count_head_sync_results(tree) -> int:
    """Dicts shaped like a SynchronizedHeads result, wherever they sit."""
    n = 0
    if isinstance(tree, dict):
        if {"blocks", "freedoms_per_layer", "rank_source"} <= set(tree):
            n += 1
        n += sum(_count_head_sync_results(v) for v in tree.values())
    elif isinstance(tree, list):
        n += sum(_count_head_sync_results(v) for v in tree)
    return n


@pytest.mark.models
@pytest.mark.slow
def test_analyze_report_stores_synchronisation_once(tiny, tiny_tokens, tmp_path):
    from tl_degeneracy.analysis import analyze
    from tl_degeneracy.analysis.files import CHECKPOINT_FILE as CHECKPOINT_NAME

    out = tmp_path / "run"
    analyze(tiny, tiny_tokens, out, max_tokens=120, batch_size=5, progress=False, dataset="tiny test tokens")
    report = json.loads((out / "report.json").read_text())

    heads = report["synchronized_heads"]
    assert heads is not None and heads["threshold"] == 0.05
    assert _count_key(report, "synchronized_heads") == 1
    assert _count_head_sync_results(report) == 1
    assert report["synchronized_neurons"] is not None
    assert _count_key(report, "synchronized_neurons") == 1
    degeneracy = report["degeneracy"]
    assert "synchronized_heads" not in degeneracy and "synchronized_neurons" not in degeneracy
    assert degeneracy["head_threshold"] == heads["threshold"]
    assert degeneracy["neuron_threshold"] == report["synchronized_neurons"]["threshold"]
    # the totals subtract the freedoms of exactly that one result
    assert degeneracy["totals"]["synchronized_head_freedoms"] == heads["total_freedoms"]

    prov = report["provenance"]
    assert prov["dataset"] == "tiny test tokens"
    assert prov["package_version"]
    config = prov["run"]["config"]
    assert config["batch_size"] == 5
    assert config["context"] == 12  # min(128, n_ctx)
    assert "blocks.0.hook_resid_pre" in config["hooks"]
    assert config["jacobians"]["n_probes"] == 4
    assert prov["run"]["model"]["weights_sha256"]
    assert prov["analysis"]["max_tokens"] == 120
    assert report["n_tokens"] == 120

    assert not (out / CHECKPOINT_NAME).exists(), "the checkpoint is deleted after success"
    assert (out / "stats.safetensors").exists()


@pytest.mark.models
@pytest.mark.slow
def test_analyze_keeps_the_checkpoint_when_asked(tiny, tiny_tokens, tmp_path):
    from tl_degeneracy.analysis import analyze
    from tl_degeneracy.analysis.files import CHECKPOINT_FILE as CHECKPOINT_NAME

    out = tmp_path / "run"
    analyze(tiny, tiny_tokens, out, max_tokens=60, batch_size=5, progress=False, keep_checkpoint=True)
    assert (out / CHECKPOINT_NAME).exists()
    kept = Stats.load(out / CHECKPOINT_NAME)
    assert kept.progress is not None and kept.progress.tokens_seen == 60
    assert kept.run == Stats.load(out / "stats.safetensors").run


# -- the rank convention -----------------------------------------------------------------------------

def _planted(sigma: list[float], m: int = 7, seed: int = 0) -> torch.Tensor:
    """An ``m × len(sigma)`` matrix with exactly these singular values."""
    g = torch.Generator().manual_seed(seed)
    n = len(sigma)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("sigma, rtol, expected", [
    ([1.0, 1e-3, 1e-5], 1e-8, 2),   # σ² = 1e-10 ≤ 1e-8; 1e-6 > 1e-8
    ([1.0, 1e-3, 1e-5], 1e-5, 1),   # 1e-6 ≤ 1e-5
    ([1.0, 1e-3, 1e-5], 1e-12, 3),
    ([2.0, 2e-3, 2e-5], 1e-8, 2),   # relative to σ_max²
    ([1.0, 0.5, 0.0], 1e-8, 2),
])
def test_matrix_rank_is_the_rank_of_its_gram(sigma, rtol, expected):
    W = _planted(sigma)
    assert matrix_rank(W, rtol) == expected
    assert gram_rank(W.T @ W, rtol) == expected
    assert matrix_rank(W.T, rtol) == expected  # either orientation


def test_the_convention_is_not_numpy_s():
    """numpy/torch count σ > rtol·σ_max; the package counts σ² > rtol·σ_max² (so rank 2 here, not 3)."""
    W = _planted([1.0, 1e-3, 1e-5])
    assert int(torch.linalg.matrix_rank(W, rtol=1e-8)) == 3
    assert matrix_rank(W, 1e-8) == 2


def test_value_ranks_use_the_convention():
    from tl_degeneracy.sync.heads import value_ranks

    W_V = torch.stack([_planted([1.0, 1e-3, 1e-5, 1e-7], m=16, seed=s) for s in range(3)])  # [head, d_model, d_head]
    model = SimpleNamespace(blocks=[SimpleNamespace(attn=SimpleNamespace(W_V=W_V))])
    assert value_ranks(model, 0, rtol=1e-8) == [2, 2, 2]
    assert value_ranks(model, 0, rtol=1e-15) == [4, 4, 4]
    assert value_ranks(model, 0, rtol=1e-5) == [1, 1, 1]


def test_span_dim_uses_the_convention():
    from tl_degeneracy.sync.neurons import span_dim

    W = _planted([1.0, 1e-3, 1e-5], m=9)
    gram = W @ W.T  # eigenvalues 1, 1e-6, 1e-10 (and zeros)
    assert span_dim(gram, 1e-8) == 2 == gram_rank(gram, 1e-8)
    assert span_dim(gram, 1e-5) == 1


@pytest.mark.models
def test_degeneracy_counts_use_the_convention():
    """A planted G at the unembedding's input: eigenvalues 1, 1e-6, 1e-10, 0, …: rank_G = 2 at rtol 1e-8."""
    from tl_degeneracy.collection.accumulators import GramAccumulator
    from tl_degeneracy.degeneracy import weight_matrices
    from tl_degeneracy.testing import tiny_model

    tiny = tiny_model(seed=0, normalization_type=None)  # W_U reads the residual stream itself: G as planted
    W_U = next(w for w in weight_matrices(tiny) if w.name == "W_U")
    d = W_U.d_in
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    eigs = torch.zeros(d, dtype=torch.float64)
    eigs[:3] = torch.tensor([1.0, 1e-6, 1e-10])
    n = 1000
    G = (Q * eigs) @ Q.T
    acc = GramAccumulator.from_sums(G * n, torch.zeros(d, dtype=torch.float64), n)
    stats = Stats({("activations", W_U.input_hook): acc})
    for rtol, expected in ((1e-8, 2), (1e-5, 1), (1e-12, 3)):
        report = tld.degeneracy_report(tiny, stats, rtol=rtol)
        account = report.matrix("W_U")
        assert account.rank_G == expected == gram_rank(G, rtol)
        assert account.g_threshold == pytest.approx(rtol * 1.0, rel=1e-9)
        assert account.free_from_G == W_U.d_out * (d - expected)
