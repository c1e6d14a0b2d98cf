"""The three global interaction bases of the grokked modular-addition model (RIB's task, issue 11).

``blocks.0.hook_resid_pre`` at every position, ``hook_resid_mid`` and ``hook_resid_post`` at the
last; Jacobians of the last-position logits; float64; the 3830 training pairs. One ``collect``
pass (positions per hook), then ``InteractionBasis.fit``. Each mode runs in a fresh subprocess
so that its peak RSS is its own. Goals: exact ≤ 9 s, 4 probes ≤ 3 s, peak ≤ 1 GB (RIB: ~18 s).
Measured on the 2-core CPU: 12.3 s exact (the floor of its matrix products alone is 9–10 s
there; benchmarks/README.md), 0.93 s with 4 probes, about 0.6 GB.

    python benchmarks/modadd_bases.py                 # exact and 4 probes, batch 1000
    python benchmarks/modadd_bases.py --batch-size 250 --modes exact
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_shaped import emit_result, environment  # noqa: E402

GOALS = {"exact": 9.0, "probes": 3.0}
HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]


def one(mode: str, batch_size: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    import tl_degeneracy as tld
    from tl_degeneracy.testing import modadd_dataset, modadd_model

    torch.set_num_threads(threads)
    model = modadd_model(dtype=torch.float64, device=device)
    data = modadd_dataset("train")
    positions = {HOOKS[1]: [-1], HOOKS[2]: [-1]}
    jac = (tld.JacobianConfig(exact=True, output_positions=[-1]) if mode == "exact"
           else tld.JacobianConfig(n_probes=4, output_positions=[-1]))
    if device.startswith("cuda"):  # first-call costs (CUDA context, kernels) are not the method's
        tld.collect(model, data[:8], HOOKS, positions=positions, jacobians=jac, batch_size=8, progress=False)
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = tld.collect(model, data, HOOKS, positions=positions, jacobians=jac, batch_size=batch_size,
                        progress=False)
    basis = tld.InteractionBasis.fit(stats)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": round(seconds, 2), "goal_s": GOALS[mode], "met": seconds <= GOALS[mode],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "probe_space": stats.run.jacobians["probe_space"], "kept": {h: basis[h].k for h in HOOKS},
            "top_lambda": {h: float(basis[h].eigenvalues[0]) for h in HOOKS}, "pairs": int(data.shape[0])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["exact", "probes"], choices=["exact", "probes"])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one(args.child, args.batch_size, args.threads, args.device)))
        return {}
    rows = []
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch-size", str(args.batch_size),
                              "--threads", str(args.threads), "--device", args.device],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{mode:7s}: {row['seconds']:6.2f}s (goal ≤ {row['goal_s']:g}s: {'met' if row['met'] else 'MISSED'}), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB (goal ≤ 1024), kept {row['kept']}, {row['probe_space']} probes")
    result = {"benchmark": "modadd_bases", "batch_size": args.batch_size, "device": args.device,
              "rows": rows, "environment": environment()}
    emit_result(result, args)
    return result


if __name__ == "__main__":
    main()
