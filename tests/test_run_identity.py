"""A checkpoint is resumed only by the run that wrote it, and a resumed run is the uninterrupted one.

Every field of the run identity (data, context, batching, positions, hooks, Jacobian options,
observers, model weights, dtype) is changed on its own: each change is refused with a
``CheckpointMismatchError`` naming the field, and the refusal leaves the checkpoint as it was.
Resuming the same run gives the uninterrupted sums to 1e-12, whether the run was stopped by
``max_tokens``, by Ctrl-C (KeyboardInterrupt from the data) or by SIGTERM in another process.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy import CheckpointMismatchError, HeadSync, JacobianConfig, Stats, collect
from tl_degeneracy.testing import tiny_model

pytestmark = pytest.mark.models

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid"]
JAC = JacobianConfig(n_probes=2, seed=0)
# the run every case is a variation of: 3 sequences of 12 tokens per batch, Jacobians, one observer
BASE = dict(hooks=HOOKS, jacobians=JAC, observers=[HeadSync(layers=[0])], batch_size=3)
PART = 108  # max_tokens of the partial run: exactly 3 whole batches of 3 × 12 tokens


def _tokens(seed: int = 0, n: int = 12) -> torch.Tensor:
    return torch.randint(0, 23, (n, 12), generator=torch.Generator().manual_seed(seed))


TOKENS = _tokens(0)


def _batches(tokens: torch.Tensor, size: int = 3) -> list[torch.Tensor]:
    return [tokens[i:i + size] for i in range(0, tokens.shape[0], size)]


def _interrupt_after(batches: list[torch.Tensor], k: int):
    """Yield ``k`` batches, then raise KeyboardInterrupt as Ctrl-C would."""
    for i, batch in enumerate(batches):
        if i == k:
            raise KeyboardInterrupt
        yield batch


def assert_same_stats(a: Stats, b: Stats, tol: float = 1e-12) -> None:
    """Every tensor (S, s, n of every Gram; every observer sum) and the token/batch counts agree."""
    assert set(a.accumulators) == set(b.accumulators)
    for key, acc in a.accumulators.items():
        other = b.accumulators[key]
        assert type(acc) is type(other), key
        for name in acc.fields:
            x, y = acc.tensors[name], other.tensors[name]
            assert x.shape == y.shape, (key, name)
            if x.is_floating_point():
                scale = max(1.0, float(x.abs().max()))
                assert float((x - y).abs().max()) <= tol * scale, (key, name)
            else:
                assert torch.equal(x, y), (key, name)
    assert a.n_tokens == b.n_tokens
    assert a.n_batches == b.n_batches


# -- one refusal per identity field ----------------------------------------------------------------

@pytest.fixture(scope="module")
def partial_checkpoint(tmp_path_factory):
    """A checkpoint of the BASE run after its first 3 batches (finished by max_tokens)."""
    path = tmp_path_factory.mktemp("identity") / "run.safetensors"
    model = tiny_model(seed=0)
    stats = collect(model, TOKENS, **BASE, max_tokens=PART, checkpoint=path, progress=False)
    assert stats.n_tokens == PART
    saved = Stats.load(path)
    assert saved.progress is not None and saved.progress.batches_seen == 3 and saved.progress.tokens_seen == PART
    assert len(saved.progress.data_sha256) == 64
    return path


def _refused(model, data, path: Path, field_pattern: str, **changes) -> str:
    """Resume ``path`` with BASE changed by ``changes``: must be refused, naming the field; checkpoint untouched."""
    before = path.read_bytes()
    options = {**BASE, **changes}
    with pytest.raises(CheckpointMismatchError) as info:
        collect(model, data, **options, checkpoint=path, resume=True, progress=False)
    message = str(info.value)
    assert re.search(field_pattern, message), f"{field_pattern!r} not named in: {message}"
    assert path.read_bytes() == before, "a refused resume must leave the checkpoint as it was"
    return message


def test_same_run_is_accepted(tiny, partial_checkpoint, tmp_path):
    """The control for every refusal below: unchanged options resume fine."""
    path = tmp_path / "copy.safetensors"
    path.write_bytes(partial_checkpoint.read_bytes())
    stats = collect(tiny, TOKENS, **BASE, checkpoint=path, resume=True, progress=False)
    assert stats.n_tokens == TOKENS.numel()


# field (as the message names it, a regex) and the change that must be refused
CONFIG_CHANGES = {
    "batch_size": (r"\bbatch_size\b", dict(batch_size=2)),
    "positions": (r"\bpositions\b", dict(positions=[-1])),
    "hooks": (r"(?<![_.\w])hooks:", dict(hooks=["blocks.0.hook_resid_pre"], jacobian_hooks=None)),
    "jacobian_hooks": (r"\bjacobian_hooks\b", dict(jacobian_hooks=["blocks.0.hook_resid_pre"])),
    "context": (r"\bcontext\b", dict(context=6)),
    "jacobians.n_probes": (r"jacobians\.n_probes", dict(jacobians=JacobianConfig(n_probes=3, seed=0))),
    "jacobians.seed": (r"jacobians\.seed", dict(jacobians=JacobianConfig(n_probes=2, seed=1))),
    "jacobians.loss": (r"jacobians\.loss", dict(jacobians=JacobianConfig(n_probes=2, seed=0, loss="kl"))),
    "jacobians.exact": (r"jacobians\.exact", dict(jacobians=JacobianConfig(exact=True, seed=0))),
    "jacobians.output_positions": (r"jacobians\.output_positions",
                                   dict(jacobians=JacobianConfig(n_probes=2, seed=0, output_positions=[-1]))),
    "jacobians.probe": (r"jacobians\.probe", dict(jacobians=JacobianConfig(n_probes=2, seed=0, probe="gaussian"))),
    "jacobians.output": (r"jacobians\.output\b",
                         dict(jacobians=JacobianConfig(n_probes=2, seed=0, output="blocks.1.hook_resid_post"))),
    "jacobians off": (r"\bjacobians\b", dict(jacobians=False)),
    "observers.layers": (r"\bobservers\b", dict(observers=[HeadSync(layers=[1])])),
    "observers none": (r"\bobservers\b", dict(observers=[])),
}


@pytest.mark.parametrize("case", list(CONFIG_CHANGES))
def test_changed_option_is_refused_naming_the_field(tiny, partial_checkpoint, case):
    pattern, changes = CONFIG_CHANGES[case]
    _refused(tiny, TOKENS, partial_checkpoint, pattern, **changes)


def test_other_model_weights_are_refused(partial_checkpoint):
    _refused(tiny_model(seed=1), TOKENS, partial_checkpoint, r"model\.weights_sha256")


def test_other_dtype_is_refused(partial_checkpoint):
    _refused(tiny_model(seed=0, dtype=torch.float32), TOKENS, partial_checkpoint, r"model\.dtype")


def test_other_data_same_shape_is_refused(tiny, partial_checkpoint):
    other = _tokens(seed=1)
    assert other.shape == TOKENS.shape and not torch.equal(other[:9], TOKENS[:9])
    message = _refused(tiny, other, partial_checkpoint, r"\bdata\b")
    assert "3 batches" in message


def test_one_changed_token_is_refused(tiny, partial_checkpoint):
    other = TOKENS.clone()
    other[4, 7] = (other[4, 7] + 1) % 23  # inside batch 1 of the 3 the checkpoint consumed
    _refused(tiny, other, partial_checkpoint, r"\bdata\b")


def test_changed_data_after_the_checkpoint_is_fine(tiny, partial_checkpoint, tmp_path):
    """Only the consumed batches are checked: new rows past the resume point are simply more data."""
    path = tmp_path / "copy.safetensors"
    path.write_bytes(partial_checkpoint.read_bytes())
    other = TOKENS.clone()
    other[9:] = _tokens(seed=5)[9:]
    resumed = collect(tiny, other, **BASE, checkpoint=path, resume=True, progress=False)
    assert_same_stats(resumed, collect(tiny, other, **BASE, progress=False))


@pytest.mark.parametrize("which", ["prefix", "other"])
def test_shorter_data_is_refused(tiny, partial_checkpoint, which):
    """Data with fewer batches than the checkpoint consumed cannot be the same data (and is never
    checked against the hash, since the replay never reaches the resume point): it must be refused,
    not answered with the checkpoint's sums over data the caller did not pass."""
    data = TOKENS[:6] if which == "prefix" else _tokens(seed=1)[:6]
    _refused(tiny, data, partial_checkpoint, r"\bdata\b")


def test_context_of_a_text_dataset_end_to_end(tmp_path):
    """The embedded model and text: another ``context`` (another tokenization) is refused;
    the same context resumes to the uninterrupted result."""
    from tl_degeneracy.default_model import default_text_dataset, load_default_model

    model = load_default_model()
    data = default_text_dataset()
    path = tmp_path / "text.safetensors"
    opts = dict(hooks="blocks.0.hook_resid_pre", batch_size=2, context=16, progress=False)
    collect(model, data, **opts, max_tokens=64, checkpoint=path)  # 2 whole batches of 2 × 16
    before = path.read_bytes()
    with pytest.raises(CheckpointMismatchError, match=r"\bcontext\b"):
        collect(model, data, **{**opts, "context": 32}, max_tokens=128, checkpoint=path, resume=True)
    assert path.read_bytes() == before
    resumed = collect(model, data, **opts, max_tokens=128, checkpoint=path, resume=True)
    assert_same_stats(resumed, collect(model, data, **opts, max_tokens=128))
    assert resumed.run is not None and resumed.run.config["context"] == 16
    assert resumed.run.tokenizer is not None


def test_run_config_identity_differs_in_exactly_the_changed_field(tiny):
    """``RunConfig.to_dict`` (the identity) changes in the field changed and nowhere else."""
    from tl_degeneracy import RunConfig
    from tl_degeneracy.checkpoint import differences

    base = RunConfig.build(tiny, **BASE).to_dict()
    for case, (_, changes) in CONFIG_CHANGES.items():
        if case in ("jacobian_hooks", "hooks", "jacobians off"):
            continue  # these legitimately move two fields (hooks and jacobian_hooks)
        other = RunConfig.build(tiny, **{**BASE, **changes}).to_dict()
        changed = {d.split(":")[0] for d in differences(base, other)}
        top = {c.split(".")[0] for c in changed}
        assert len(top) == 1, (case, changed)
        if case.startswith("jacobians."):
            assert case in changed or any(c.startswith(case) for c in changed), (case, changed)


# -- resumed == uninterrupted ----------------------------------------------------------------------

def test_resume_after_max_tokens_equals_uninterrupted(tiny, partial_checkpoint, tmp_path):
    path = tmp_path / "copy.safetensors"
    path.write_bytes(partial_checkpoint.read_bytes())
    resumed = collect(tiny, TOKENS, **BASE, checkpoint=path, resume=True, progress=False)
    full = collect(tiny, TOKENS, **BASE, progress=False)
    assert_same_stats(resumed, full)
    assert resumed.n_tokens == TOKENS.numel() and resumed.n_batches == 4
    final = Stats.load(path)  # the checkpoint is the finished run
    assert final.progress is not None and final.progress.batches_seen == 4
    assert_same_stats(final, full)


@pytest.mark.parametrize("stops", [[1], [3], [1, 3]], ids=lambda s: "ctrl-c after " + "+".join(map(str, s)))
def test_resume_after_ctrl_c_equals_uninterrupted(tiny, tmp_path, stops):
    batches = _batches(TOKENS)
    path = tmp_path / "run.safetensors"
    for i, k in enumerate(stops):
        with pytest.raises(KeyboardInterrupt):
            collect(tiny, _interrupt_after(batches, k), **BASE, checkpoint=path, resume=i > 0, progress=False)
        saved = Stats.load(path)
        assert saved.progress is not None and saved.progress.batches_seen == k
        assert saved.n_batches == k and saved.n_tokens == k * 36
    resumed = collect(tiny, batches, **BASE, checkpoint=path, resume=True, progress=False)
    assert_same_stats(resumed, collect(tiny, batches, **BASE, progress=False))


def test_interrupt_in_the_first_batch_leaves_no_partial_sums(tiny, tmp_path):
    path = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        collect(tiny, _interrupt_after(_batches(TOKENS), 0), **BASE, checkpoint=path, progress=False)
    if path.exists():  # nothing consumed: either no file or an empty resume point
        saved = Stats.load(path)
        assert saved.progress is not None and saved.progress.batches_seen == 0 and not saved.accumulators
    resumed = collect(tiny, TOKENS, **BASE, checkpoint=path, resume=True, progress=False)
    assert_same_stats(resumed, collect(tiny, TOKENS, **BASE, progress=False))


def test_larger_max_tokens_after_a_trimmed_last_batch_is_refused(tiny, tmp_path):
    """max_tokens=40 trims the 2nd batch to 1 row; a resume with more tokens would have to
    add the dropped rows of a batch already counted. It must be refused, not silently skip them."""
    path = tmp_path / "run.safetensors"
    first = collect(tiny, TOKENS, **BASE, max_tokens=40, checkpoint=path, progress=False)
    assert first.n_tokens == 48 and first.n_batches == 2  # 36 + one trimmed row of 12
    before = path.read_bytes()
    for more in (None, 100):
        with pytest.raises(CheckpointMismatchError, match=r"max_tokens") as info:
            collect(tiny, TOKENS, **BASE, max_tokens=more, checkpoint=path, resume=True, progress=False)
        assert "data" in str(info.value)
        assert path.read_bytes() == before
    # the same max_tokens: accepted, nothing more to do, the same sums
    again = collect(tiny, TOKENS, **BASE, max_tokens=40, checkpoint=path, resume=True, progress=False)
    assert_same_stats(again, first)


def test_larger_max_tokens_after_whole_batches_continues(tiny, tmp_path):
    path = tmp_path / "run.safetensors"
    collect(tiny, TOKENS, **BASE, max_tokens=36, checkpoint=path, progress=False)
    more = collect(tiny, TOKENS, **BASE, max_tokens=PART, checkpoint=path, resume=True, progress=False)
    assert more.n_batches == 3
    assert_same_stats(more, collect(tiny, TOKENS, **BASE, max_tokens=PART, progress=False))


# -- when checkpoints are written ------------------------------------------------------------------

def _checkpoint_exists_after_one_batch(model, path, **options) -> bool:
    """Run collect on TOKENS; report whether the checkpoint existed when batch 2 was requested."""
    seen: list[bool] = []

    def data():
        for i, batch in enumerate(_batches(TOKENS)):
            if i == 1:
                seen.append(path.exists())
            yield batch

    collect(model, data(), **BASE, checkpoint=path, checkpoint_every=10**6, progress=False, **options)
    assert len(seen) == 1
    return seen[0]


def test_checkpoint_is_written_by_elapsed_time(tiny, tmp_path):
    path = tmp_path / "run.safetensors"
    assert _checkpoint_exists_after_one_batch(tiny, path, checkpoint_seconds=1e-9), \
        "after one batch and > 1e-9 s a checkpoint must exist"


def test_no_checkpoint_before_either_interval(tiny, tmp_path):
    """The control: neither interval has passed after one batch, so no file yet (only at the end)."""
    path = tmp_path / "run.safetensors"
    assert not _checkpoint_exists_after_one_batch(tiny, path, checkpoint_seconds=1e6)
    assert path.exists()  # written at the end


def test_checkpoint_every_n_batches(tiny, tmp_path):
    path = tmp_path / "run.safetensors"
    seen: list[int | None] = []

    def data():
        for batch in _batches(TOKENS):
            seen.append(Stats.load(path).progress.batches_seen if path.exists() else None)
            yield batch

    collect(tiny, data(), **BASE, checkpoint=path, checkpoint_every=2, checkpoint_seconds=1e6, progress=False)
    assert seen == [None, None, 2, 2]


# -- SIGTERM ------------------------------------------------------------------------------------

def test_sigterm_in_process_raises_terminated_after_checkpointing(tiny, tmp_path):
    path = tmp_path / "run.safetensors"
    batches = _batches(TOKENS)
    previous = signal.getsignal(signal.SIGTERM)

    def data():
        for i, batch in enumerate(batches):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs here, in the main thread
            yield batch

    with pytest.raises(tld.Terminated) as info:
        collect(tiny, data(), **BASE, checkpoint=path, progress=False)
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == previous, "collect must restore the SIGTERM handler"
    saved = Stats.load(path)
    assert saved.progress is not None and saved.progress.batches_seen == 2
    resumed = collect(tiny, batches, **BASE, checkpoint=path, resume=True, progress=False)
    assert_same_stats(resumed, collect(tiny, batches, **BASE, progress=False))


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from tl_degeneracy import HeadSync, JacobianConfig, collect
    from tl_degeneracy.testing import tiny_model

    model = tiny_model(seed=0)
    tokens = torch.randint(0, 23, (40, 12), generator=torch.Generator().manual_seed(7))

    def slow():
        for start in range(0, 40, 2):
            time.sleep(0.2)
            yield tokens[start:start + 2]

    print("STARTED", flush=True)
    collect(model, slow(), {hooks!r}, jacobians=JacobianConfig(n_probes=2, seed=0),
            observers=[HeadSync(layers=[0])], batch_size=3, checkpoint=sys.argv[1], checkpoint_every=1,
            progress=False)
    print("DONE", flush=True)
""").format(hooks=HOOKS)


def test_sigterm_in_subprocess_checkpoints_and_resumes(tiny, tmp_path):
    path = tmp_path / "run.safetensors"
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it was terminated: {proc.communicate()}"
        assert path.exists(), "no checkpoint appeared within 120 s"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, (out, err)
    assert "DONE" not in out
    assert "Terminated" in err, err[-2000:]

    saved = Stats.load(path)
    assert saved.progress is not None
    assert 1 <= saved.progress.batches_seen < 20
    assert saved.n_batches == saved.progress.batches_seen

    tokens = torch.randint(0, 23, (40, 12), generator=torch.Generator().manual_seed(7))
    batches = _batches(tokens, 2)
    resumed = collect(tiny, batches, **BASE, checkpoint=path, resume=True, progress=False)
    assert_same_stats(resumed, collect(tiny, batches, **BASE, progress=False))
