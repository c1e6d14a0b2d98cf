"""Run every benchmark (each in its own subprocess) and print a table of the figures.

    python benchmarks/run_all.py            # GPT-2-small-shaped model; several minutes each on 2 CPUs
    python benchmarks/run_all.py --quick    # 2-layer small / tiny models; about a minute in all
    python benchmarks/run_all.py --only collect_overhead jacobian_overhead --threads 2

Each script prints its own report (streamed here) and a ``RESULT {json}`` line this script
parses. Timings on a shared machine are noisy: the scripts interleave methods and take
medians, but a busy neighbour still moves the figures by several percent.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "RESULT "

# Full-size settings: on 2 idle CPU cores about 1.5, 2.5, 0.7 and 0.7 minutes (much longer when shared).
FULL_ARGS: dict[str, list[str]] = {
    "collect_overhead": ["--batch-size", "2", "--context", "256", "--batches", "5", "--repeats", "3"],
    "jacobian_overhead": ["--batch-size", "2", "--context", "128", "--batches", "3", "--repeats", "3",
                          "--probes", "4"],
    "memory_growth": [],
    "naive_baseline": ["--batch-size", "2", "--context", "256", "--batches", "3", "--repeats", "3"],
    "analyze_wall_time": [],
}
QUICK_ARGS: dict[str, list[str]] = {
    "collect_overhead": ["--quick"],
    "jacobian_overhead": ["--quick"],
    "memory_growth": ["--quick", "--parallel"],
    "naive_baseline": ["--quick"],
    "analyze_wall_time": ["--quick"],
}


def run(name: str, extra: list[str], echo: bool) -> tuple[dict[str, Any] | None, float, str]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    result, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        elif echo:
            print("  " + line, end="", flush=True)
    proc.wait()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 and not echo:
        print("".join(lines[-30:]))
    return (result if proc.returncode == 0 else None), elapsed, "".join(lines)


def rows_of(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) rows for the summary table."""
    def ok(flag: bool) -> str:
        return "met" if flag else "MISSED"

    if name == "collect_overhead":
        tps = r["tokens_per_s"]
        return [
            ("time collect / time plain model(tokens)", f"{r['ratio']:.3f}", "<= 1.10", ok(r["met"])),
            ("time collect / time plain, blocks only", f"{r['ratio_vs_blocks_only']:.3f}", "", ""),
            ("  same, minus collect's per-call fixed cost", f"{r['ratio_without_fixed_cost']:.3f}", "", ""),
            ("  projected: early stop + cached checksum", f"{r['ratio_projected_early_stop']:.3f}", "", ""),
            ("tokens/s plain | collect", f"{tps['plain']:.0f} | {tps['collect']:.0f}", "", ""),
        ]
    if name == "jacobian_overhead":
        S = r["config"]["n_probes"]
        return [
            (f"time collect(jac, S={S}) / fwd + S grad to resid_pre_0", f"{r['ratio']:.3f}", "<= 0.90",
             ok(r["met"])),
            ("  same, minus collect's per-call fixed cost", f"{r['ratio_without_fixed_cost']:.3f}", "", ""),
            ("time collect(jac) / fwd + S .backward() w/ weight grads",
             f"{r['ratio_vs_backward_with_weight_grads']:.3f}", "", ""),
        ]
    if name == "memory_growth":
        mib = 1 / 1024
        return [
            ("peak RSS growth, N -> 10N tokens", f"{100 * r['growth']:+.2f}%", "< 10%", ok(r["met"])),
            ("peak RSS during collect, N | 10N (MiB)",
             f"{r['small']['peak_kib'] * mib:.0f} | {r['big']['peak_kib'] * mib:.0f}", "", ""),
        ]
    if name == "naive_baseline":
        return [
            ("speedup of collect vs run_with_cache + Gram", f"{r['speedup_vs_naive_streaming']:.3f}x", "", ""),
            ("speedup of collect vs cache-all + dense Gram", f"{r['speedup_vs_naive_dense']:.3f}x", "", ""),
        ]
    if name == "analyze_wall_time":
        return [("wall time of analyze, embedded model (s)", f"{r['seconds']:.1f} ({r['tokens']} tokens)",
                 "< 300 s", ok(r["seconds"] < 300))]
    return [("ratio", f"{r.get('ratio')}", "", "")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and sizes")
    parser.add_argument("--only", nargs="+", choices=sorted(FULL_ARGS), default=None)
    parser.add_argument("--threads", type=int, default=None, help="passed to every script")
    parser.add_argument("--quiet", action="store_true", help="do not echo each script's own report")
    args = parser.parse_args()
    names = args.only or list(FULL_ARGS)
    table: list[tuple[str, str, str, str, str]] = []
    failed = []
    for name in names:
        extra = list((QUICK_ARGS if args.quick else FULL_ARGS)[name])
        if args.threads is not None:
            extra += ["--threads", str(args.threads)]
        result, elapsed, _ = run(name, extra, echo=not args.quiet)
        if result is None:
            failed.append(name)
            table.append((name, "FAILED", "", "", f"{elapsed:.0f}s"))
            continue
        for i, (figure, value, target, verdict) in enumerate(rows_of(name, result)):
            table.append((name if i == 0 else "", figure, value, f"{target} {verdict}".strip(),
                          f"{elapsed:.0f}s" if i == 0 else ""))
    header = ("benchmark", "figure", "value", "target", "wall")
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(5)]
    print(f"\n=== summary ({'quick' if args.quick else 'full'}; {sys.executable})")
    for row in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
