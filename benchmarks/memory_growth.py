"""Peak RSS of ``tl_degeneracy.collect`` over N tokens vs 10 × N tokens.

Acceptance figure (issue 2): the peak grows by less than 10 % when 10× more tokens stream
through ``collect`` (memory is O(d²) per hook point; activations are never cached).

Each token count runs in its own fresh subprocess (so the peaks cannot mix). In the child:
build the model, free the construction transients (the float64 state dict), then reset the
kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) and read ``VmHWM``
after ``collect``: the peak *during collect*, including the model, Python and torch. Where
the counter cannot be reset, a thread samples RSS every 2 ms (psutil) instead; as a last
resort the whole-process ``ru_maxrss`` is used. The data is a generator of random batches,
so the data itself takes no memory that grows with N.

    python benchmarks/memory_growth.py                      # GPT-2 shape, 4 layers, N = 2048 tokens
    python benchmarks/memory_growth.py --layers 12 --batches 4
    python benchmarks/memory_growth.py --quick --parallel   # tiny model, both children at once
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_shaped import RESULT_PREFIX, add_common_args, emit_result, environment  # noqa: E402

TARGET = 0.10


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) if match else None


def _ru_maxrss_kib() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel honoured it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


class _Sampler:
    """Fallback peak meter: poll RSS from a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss // 1024)
            time.sleep(self.interval)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss // 1024)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back to the OS (glibc)
    except (OSError, AttributeError):
        pass


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads if args.threads is not None else min(2, torch.get_num_threads()))
    from gpt2_shaped import build_model, model_config, token_batches

    import tl_degeneracy

    cfg = model_config(args.preset, args.layers)
    model = build_model(args.preset, args.layers, seed=args.seed)
    _trim()
    n_batches = args.child_batches
    data = token_batches(n_batches, args.batch_size, args.context, cfg["d_vocab"], seed=args.seed)
    rss_before = _status_kib("VmRSS") or 0
    construction_peak = _ru_maxrss_kib()  # before any reset: includes the float64 state dict
    start = time.perf_counter()
    if _reset_peak():
        method = "VmHWM after clear_refs reset"
        stats = tl_degeneracy.collect(model, data, "blocks.*.hook_resid_pre", batch_size=args.batch_size,
                                      progress=False)
        peak = _status_kib("VmHWM") or 0
    else:
        try:
            with _Sampler() as sampler:
                stats = tl_degeneracy.collect(model, data, "blocks.*.hook_resid_pre", batch_size=args.batch_size,
                                              progress=False)
            method, peak = "psutil RSS sampled every 2 ms", sampler.peak
        except ImportError:
            stats = tl_degeneracy.collect(model, data, "blocks.*.hook_resid_pre", batch_size=args.batch_size,
                                          progress=False)
            method, peak = "ru_maxrss (whole process, includes model construction)", _ru_maxrss_kib()
    elapsed = time.perf_counter() - start
    n_tokens = n_batches * args.batch_size * args.context
    assert stats.n_tokens == n_tokens, (stats.n_tokens, n_tokens)
    print(RESULT_PREFIX + json.dumps({
        "n_tokens": n_tokens, "n_batches": n_batches, "peak_kib": peak, "rss_before_kib": rss_before,
        "rss_after_kib": _status_kib("VmRSS"), "construction_peak_kib": construction_peak, "method": method,
        "seconds": elapsed, "model_class": type(model).__name__, "env": environment(),
    }), flush=True)


def _spawn(args: argparse.Namespace, n_batches: int) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-batches", str(n_batches),
           "--preset", args.preset, "--batch-size", str(args.batch_size), "--context", str(args.context),
           "--seed", str(args.seed)]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result_of(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{out}\n{err}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=2, context=256, batches=4, repeats=1)
    parser.add_argument("--factor", type=int, default=10, help="token multiplier of the second run (default 10)")
    parser.add_argument("--parallel", action="store_true", help="run both children at once (faster, same peaks)")
    parser.add_argument("--child-batches", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_batches is not None:
        child(args)
        return None
    # defaults: GPT-2 shape with 4 layers; --quick: the tiny model
    quick = dict(preset="tiny", batch_size=8, context=32, batches=2, threads=1)
    full = dict(preset="gpt2", batch_size=2, context=256, batches=4)
    for key, value in (quick if args.quick else full).items():  # explicit options win
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layers is None and args.preset == "gpt2":
        args.layers = 4

    small_n, big_n = args.batches, args.batches * args.factor
    tok = args.batch_size * args.context
    print(f"collect at every hook_resid_pre, preset {args.preset}, layers {args.layers or 'preset'}, batches of "
          f"[{args.batch_size}, {args.context}] streamed from a generator: {small_n * tok} vs {big_n * tok} tokens, "
          f"one fresh subprocess each{' (in parallel)' if args.parallel else ''}")
    if args.parallel:
        procs = [_spawn(args, small_n), _spawn(args, big_n)]
        small, big = (_result_of(p) for p in procs)
    else:
        small = _result_of(_spawn(args, small_n))
        big = _result_of(_spawn(args, big_n))

    growth = big["peak_kib"] / small["peak_kib"] - 1.0
    own_small = small["peak_kib"] - small["rss_before_kib"]
    own_big = big["peak_kib"] - big["rss_before_kib"]
    mib = 1 / 1024
    print(f"model: {small['model_class']}; peak measured as: {small['method']}")
    for label, r in (("N", small), (f"{args.factor}N", big)):
        print(f"  {label:>4} = {r['n_tokens']:7d} tokens: peak RSS during collect {r['peak_kib'] * mib:8.1f} MiB "
              f"(RSS before collect {r['rss_before_kib'] * mib:7.1f} MiB, collect's own working memory "
              f"{(r['peak_kib'] - r['rss_before_kib']) * mib:6.1f} MiB; peak while building the model "
              f"{r['construction_peak_kib'] * mib:7.1f} MiB; {r['seconds']:.1f}s)")
    print(f"GROWTH of peak RSS from N to {args.factor}N tokens = {100 * growth:+.2f}%   "
          f"(target < {100 * TARGET:.0f}%: {'met' if growth < TARGET else 'MISSED'}); "
          f"collect's own working memory {own_small * mib:.1f} -> {own_big * mib:.1f} MiB")
    result = {
        "benchmark": "memory_growth",
        "growth": growth,
        "target": TARGET,
        "met": growth < TARGET,
        "small": small,
        "big": big,
        "own_working_memory_kib": {"small": own_small, "big": own_big},
        "config": {"preset": args.preset, "n_layers": args.layers, "batch_size": args.batch_size,
                   "context": args.context, "batches_small": small_n, "batches_big": big_n},
        "env": small["env"],
    }
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
