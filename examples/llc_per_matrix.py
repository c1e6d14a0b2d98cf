"""Per-matrix sampled N_eff(ε) beside the degeneracy account's K-FAC count at the same cut-off γε.

On the embedded default model: analyse 256 tokens (G and K per weight matrix), then sample
N_eff(ε) = 2λ̂(ε) by SGLD for a few head matrices (each alone, the rest held at θ*) on the
same tokens, and write a Markdown table (docs/llc.md §5). About 2 minutes on 2 CPU threads with the
defaults (the EK-FAC preconditioner, a burn-in of 360 steps: tens of relaxation times); plain SGLD
(``--preconditioner none``) needs a burn-in of about 3000 steps (3–5 relaxation times 1/(ηγ)), 10 minutes.

    python examples/llc_per_matrix.py [--eps 1e-2] [--gamma 100] [--burn-in 360] [--draws 300]
                                      [--preconditioner ekfac|kfac|diag|rmsprop|none] [--out table.md]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tl_degeneracy.analysis import analyze
from tl_degeneracy.analysis.llc import relax_steps
from tl_degeneracy.collection.stats import Stats
from tl_degeneracy.data import whole_rows
from tl_degeneracy.default_model import default_text_dataset, load_default_model
from tl_degeneracy.degeneracy import KfacSpectra
from tl_degeneracy.llc import ParamSubset, estimate_neff

MATRICES = [("blocks.1.attn.W_V", 0), ("blocks.1.attn.W_O", 0), ("blocks.3.attn.W_V", 0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--gamma", type=float, default=100.0)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--burn-in", type=int, default=360)
    p.add_argument("--preconditioner", default="ekfac", choices=["ekfac", "kfac", "diag", "rmsprop", "none"])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--step-size", type=float, default=None, help="SGLD step η (default: chosen automatically)")
    p.add_argument("--out", default=None, help="write the Markdown table here too")
    args = p.parse_args()
    start = time.time()
    model = load_default_model()
    data = default_text_dataset()
    cut = args.gamma * args.eps
    with tempfile.TemporaryDirectory() as folder:
        analyze(model, data, folder, max_tokens=args.tokens, context=args.context, progress=False)
        kfac = KfacSpectra(model, Stats.load(Path(folder) / "stats.safetensors"))
    tokens = whole_rows(data, model, args.tokens, args.context, at_most=True)
    assert tokens is not None
    lines = [f"ε = {args.eps:g}, γ = {args.gamma:g} (cut-off γε = {cut:g}); {tokens.numel()} tokens of the embedded "
             f"text for both; {args.chains} chains × {args.draws} draws after {args.burn_in} burn-in steps, "
             f"preconditioner {args.preconditioner}, step size chosen automatically.", "",
             "| matrix | nominal | sampled N_eff(ε) ± s.e. | chains kept | steps to relax / run | "
             "K-FAC #{g·k > γε} | K-FAC soft Σ gk/(gk+γε) | K-FAC rank (τ=1e-8) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, head in MATRICES:
        result = estimate_neff(model, tokens, eps=[args.eps], params=ParamSubset(name, head=head), gamma=args.gamma,
                               n_chains=args.chains, n_draws=args.draws, burn_in=args.burn_in, step_size=args.step_size,
                               preconditioner=args.preconditioner,
                               progress=False)
        s = result.scale(args.eps)
        label = f"{name}[{head}]"
        ((g, k),) = [(m.g, m.k) for m in kfac.matrices if m.weight.tl_name == label]
        prod = (g[:, None] * k[None, :]).flatten()
        hard = int((prod > cut).sum())
        soft = float((prod / (prod + cut)).sum())
        rank = int((prod > 1e-8 * float(prod.max())).sum())
        relax = relax_steps(s, args.gamma)
        drifted = [c.n_eff for c in s.chains if c.status == "drifted"]
        value = (f"{s.n_eff:.1f} ± {s.standard_error:.1f}" if s.kept else
                 f"– (drifted; ≥ {sum(drifted) / len(drifted):.1f})" if drifted else "–")
        lines.append(f"| `{label}` | {result.n_params} | {value} | "
                     f"{s.kept}/{len(s.chains)} | {relax:.0f} / {args.burn_in + args.draws} | {hard} | {soft:.1f} | "
                     f"{rank} |")
        print(lines[-1], flush=True)
    lines += ["", f"({time.time() - start:.0f} s)"]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
