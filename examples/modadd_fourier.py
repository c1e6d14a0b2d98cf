"""Fourier structure of interaction-basis and PCA directions of the grokked modular-addition transformer
(RIB's checkpoint, shipped as ``tl_degeneracy.testing.MODADD_DIR``).

The bases are those of examples/modadd_interaction_basis.py: exact Jacobians of the last-position
logits (MSE) on the 3830 train pairs, float64, rtol 1e-10; ``blocks.0.hook_resid_pre`` at all three
positions, ``hook_resid_mid`` and ``hook_resid_post`` at the last. Each of the top directions (by Λ for
the interaction basis, by variance for PCA) is then evaluated on all p² = 12769 inputs (a, b) and its
2-D Fourier spectrum taken (``tl_degeneracy.analysis.fourier``): the share of its variance in its
strongest 1, 2 and 5 frequency pairs, and in its strongest key frequency. At resid_pre the spectra of
the three positions are pooled (position 2, the constant ``=`` token, has no variance on the grid).
Baselines: the model's own coordinates and random orthonormal directions of PCA's span.

    python examples/modadd_fourier.py --out docs/modadd_fourier.md
"""
import argparse
import sys
import time

import torch

import tl_degeneracy as tld
from tl_degeneracy.analysis.fourier import (
    FourierSpectrum,
    activation_grid,
    direction_grids,
    fourier_spectrum,
    modular_grid_tokens,
)
from tl_degeneracy.basis import random_basis
from tl_degeneracy.testing import MODADD_P, modadd_dataset, modadd_model

HOOKS = {  # hook → positions its basis is fitted at (None: all) and its grids are read at
    "blocks.0.hook_resid_pre": None,
    "blocks.0.hook_resid_mid": [-1],
    "blocks.0.hook_resid_post": [-1],
}
MS = (1, 2, 5)
KEY_SHARE_LISTED = 0.02  # key frequencies listed per hook: those carrying more of its variance than this


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pair(k: tuple[int, int]) -> str:
    """A merged frequency pair by what it is a wave in."""
    k_a, k_b = k
    if k_b == 0:
        return f"a{k_a}"
    if k_a == 0:
        return f"b{k_b}"
    if k_a == k_b:
        return f"(a+b){k_a}"
    if k_a == -k_b:
        return f"(a−b){k_a}"
    return f"({k_a},{k_b})"


def describe(spectrum: FourierSpectrum, grids: torch.Tensor, importance: torch.Tensor | None) -> list[dict]:
    """One row per direction: shares in the strongest 1/2/5 pairs, the strongest key frequency, the pairs.
    ``importance``: what ranks the directions (None: their variance over the grid)."""
    index, shares = spectrum.strongest(max(MS))
    keys, _ = spectrum.key_frequency_shares()
    key_share, key = keys.max(dim=-1)
    # the variance over the grid, positions pooled (what the basis was fitted on, up to the data), and the
    # share of it within positions, which is all the spectrum sees: below 1 only where positions are
    # pooled and their means differ
    pooled = grids.flatten(1).var(dim=1, unbiased=False)
    within = spectrum.variance / grids.shape[1] / pooled
    importance = pooled if importance is None else importance
    return [{"importance": float(importance[i]), "variance": float(pooled[i]), "within": float(within[i]),
             **{f"top{m}": float(shares[i, :m].sum()) for m in MS},
             "key": int(key[i]) + 1, "key_share": float(key_share[i]),
             "pairs": [(pair(tuple(spectrum.frequencies[j].tolist())), float(shares[i, n]))
                       for n, j in enumerate(index[i].tolist())]}
            for i in range(len(importance))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the Markdown tables here")
    parser.add_argument("--n", type=int, default=None, help="fit the bases on the first N train pairs only")
    parser.add_argument("--top", type=int, default=10, help="directions per basis (by Λ / variance)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly: a shared machine)")
    args = parser.parse_args()
    for name in ("n", "top", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    p = MODADD_P
    model = modadd_model(dtype=torch.float64)
    train = modadd_dataset("train")[: args.n]
    start = time.time()
    log(f"collecting exact Jacobians on {len(train)} train pairs ...")
    positions = {h: pos for h, pos in HOOKS.items() if pos is not None}
    stats = tld.collect(model, train, list(HOOKS), positions=positions,
                        jacobians=tld.JacobianConfig(exact=True, output_positions=[-1]), batch_size=1000,
                        progress=False)
    fits = {"interaction": tld.InteractionBasis.fit(stats, rtol=1e-10),
            "pca": tld.InteractionBasis.fit(stats, scaling="pca", rtol=1e-10),
            "standard": tld.InteractionBasis.fit(stats, scaling="identity")}
    fitted = time.time()

    tokens = modular_grid_tokens(p)
    rows: dict[tuple[str, str], list[dict]] = {}
    overall: dict[str, torch.Tensor] = {}
    for hook, pos in HOOKS.items():
        log(f"{hook}: the {p} × {p} grid ...")
        read = [0, 1, 2] if pos is None else pos
        acts = activation_grid(model, hook, tokens, (p, p), positions=read)
        bases = {name: fits[name][hook] for name in fits} | {"random": random_basis(fits["pca"][hook], seed=0)}
        # the whole activation, basis-free (every coordinate's spectrum summed, positions pooled)
        overall[hook] = fourier_spectrum(acts.permute(3, 0, 1, 2)).sum(1).sum(0).key_frequency_shares()[0]
        for name, basis in bases.items():
            order = basis.importance.argsort(descending=True)[: args.top]  # the fitted kinds are sorted already
            grids = direction_grids(basis, acts)[order]
            spectrum = fourier_spectrum(grids).sum(1)  # pooled over positions
            rows[hook, name] = describe(spectrum, grids, None if name == "random" else basis.importance[order])
    done = time.time()

    text = render(rows, overall, args, len(train), fitted - start, done - fitted)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


def render(rows: dict, overall: dict, args: argparse.Namespace, n_train: int, fit_s: float, grid_s: float) -> str:
    top = args.top
    lines = [
        "# Fourier structure of interaction-basis and PCA directions (modular addition)\n",
        f"Generated by `python examples/modadd_fourier.py{f' --n {args.n}' if args.n else ''} --top {top} "
        f"--threads {args.threads}` ({n_train} train pairs, exact Jacobians of the last-position logits, MSE, "
        f"rtol 1e-10 on G and M'; bases {fit_s:.0f} s, grids and spectra {grid_s:.0f} s).\n"
        f"Every direction is evaluated on all {MODADD_P}² inputs; shares are of its non-DC power (its variance "
        "over the grid), conjugate pairs merged; at `resid_pre` the three positions are pooled (position 2 is "
        "constant on the grid). Pairs: `a15` is a wave in a alone, `b15` in b, `(a+b)15` / `(a−b)15` in a ± b, "
        "`(15,-18)` a mixed pair. Key frequency k: the share in `ak`, `bk`, `(a+b)k`, `(a−b)k` together.\n",
        f"## Summary: mean over the top {top} directions\n",
        "| hook | basis | top-1 share | top-2 share | top-5 share | key-frequency share | weighted top-1 | "
        "weighted top-5 | weighted key share | top-5 share ≥ 0.9 | key frequencies (strongest per direction) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (hook, name), r in rows.items():
        mean = {c: sum(row[c] for row in r) / len(r) for c in ("top1", "top2", "top5", "key_share")}
        weight = [row["importance"] * row["within"] for row in r]  # the part of each direction the spectrum sees
        weighted = {c: sum(row[c] * w for row, w in zip(r, weight)) / sum(weight)
                    for c in ("top1", "top5", "key_share")}
        keys = sorted({row["key"] for row in r})
        sparse = sum(row["top5"] >= 0.9 for row in r)
        lines.append(f"| `{hook.split('.')[-1]}` | {name} | {mean['top1']:.3f} | {mean['top2']:.3f} | "
                     f"{mean['top5']:.3f} | {mean['key_share']:.3f} | {weighted['top1']:.3f} | "
                     f"{weighted['top5']:.3f} | {weighted['key_share']:.3f} | {sparse}/{len(r)} | "
                     f"{', '.join(map(str, keys))} |")
    lines.append("\nWeighted: each direction weighted by its Λ (interaction basis) or fitted variance (the others; "
                 "random directions: their variance over the grid) times its within-positions share (the part of its "
                 "variance the spectrum describes; 1 except at `resid_pre`).")
    lines.append(f"\nThe whole activation at each hook (every coordinate's spectrum summed; the same for any "
                 f"orthonormal basis), key frequencies carrying more than {KEY_SHARE_LISTED:.0%} of its variance:\n")
    for hook, keys in overall.items():
        listed = [(k + 1, float(v)) for k, v in enumerate(keys.tolist()) if v > KEY_SHARE_LISTED]
        listed.sort(key=lambda kv: -kv[1])
        lines.append(f"- `{hook}`: " + ", ".join(f"k = {k} ({v:.1%})" for k, v in listed)
                     + f"; together {sum(v for _, v in listed):.1%}")
    for (hook, name), r in rows.items():
        if name not in ("interaction", "pca"):
            continue
        label = "Λ" if name == "interaction" else "variance"
        lines += [f"\n## `{hook}`, {name}\n",
                  f"| # | {label} (fit) | variance (grid) | within positions | top-1 | top-2 | top-5 | key k (share) "
                  "| strongest 5 pairs (share) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i, row in enumerate(r):
            pairs = ", ".join(f"{name_} {share:.2f}" for name_, share in row["pairs"])
            lines.append(f"| {i} | {row['importance']:.4g} | {row['variance']:.4g} | {row['within']:.3f} | "
                         f"{row['top1']:.3f} | {row['top2']:.3f} | {row['top5']:.3f} | {row['key']} "
                         f"({row['key_share']:.2f}) | {pairs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
