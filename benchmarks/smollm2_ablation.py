"""SmolLM2-135M ablation curves: keep the top-k directions of a residual node, per basis, on held-out text.

    python benchmarks/smollm2_ablation.py --folder DIR [--layers 5 15 25] [--tokens 512] [--threads 2]

``--folder``: a SmolLM2 analysis with residual bases and statistics (``basis.safetensors``,
``pca_basis.safetensors``, ``stats.safetensors``; read only). The interaction basis (by Λ), PCA (by
variance), the model's own coordinates (by variance) and a random basis of the PCA span are ablated at
``blocks.L.hook_resid_pre`` for each ``--layers``; the held-out tokens are the last ``--tokens`` of the
embedded text (the analysis reads from its start; disjoint while the analysis used fewer than the text
minus ``--tokens``). Prints a Markdown table (behavioural loss and cross-entropy increase per k) and a
``RESULT {json}`` line with the wall time and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="a SmolLM2 analysis with residual bases (read only)")
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 15, 25])
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens, as rows of --context")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64, 128, 256, 576])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import load_smollm2

    from tl_degeneracy.basis.bases import InteractionBasis
    from tl_degeneracy.collection.stats import Stats
    from tl_degeneracy.interactions.ablation import ablation_curves

    model, ids, _ = load_smollm2(args.threads)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in args.layers]
    out = Path(args.folder)
    stats = Stats.load(out / "stats.safetensors")
    bases = {"interaction": InteractionBasis.load(out / "basis.safetensors"),
             "pca": InteractionBasis.load(out / "pca_basis.safetensors"),
             "standard": InteractionBasis.fit_kind("standard", stats, hooks)}
    n = args.tokens // args.context * args.context
    held_out = ids[-n:].reshape(-1, args.context)
    start = time.perf_counter()
    curves = ablation_curves(model, held_out, bases, hooks, ks=args.ks, batch_size=2, progress=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("\n| hook | basis | " + " | ".join(f"k={k}" for k in curves[0].k) + " |")
    print("|---|---|" + "---:|" * len(curves[0].k))
    for c in curves:
        cells = " | ".join(f"{b:.3g} / {ce:+.2f}" for b, ce in zip(c.behavioral_loss, c.ce_increase))
        print(f"| `{c.hook}` | {c.basis} | {cells} |")
    print("(behavioural loss, the MSE of the logits summed over the vocabulary / cross-entropy increase in nats; "
          f"clean cross-entropy {curves[0].meta['clean_ce']:.3f})")
    print(f"ablation: {wall:.0f} s, peak RSS {peak / 1e9:.2f} GB, load {os.getloadavg()[:3]}")
    print("RESULT " + json.dumps({"benchmark": "smollm2_ablation", "hooks": hooks, "tokens": int(held_out.numel()),
                                  "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 2),
                                  "curves": [c.to_dict() for c in curves]}))


if __name__ == "__main__":
    main()
