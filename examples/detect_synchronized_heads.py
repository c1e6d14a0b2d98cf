"""Find synchronized attention heads in GPT-2: heads of one layer whose attention patterns agree.

Two synchronized heads can trade value directions (mix the rows of their ``W_V``, undo it in
``W_O``) without changing the model: ``2·r_h·r_h'`` free parameter directions per pair
(``r`` = rank of each head's ``W_V``) on top of the generic ones every head has. ``collect``
streams, per layer, the mean total-variation distance ``½‖A_h − A_h'‖₁`` between the heads'
attention rows over the data (memory ``n_heads²``; patterns are never stored).

    python examples/detect_synchronized_heads.py                          # gpt2 (embedded model offline)
    python examples/detect_synchronized_heads.py --model default --threshold 0.1 --layer 1
"""
from __future__ import annotations

import argparse
import time

import torch

import tl_degeneracy as tld
from tl_degeneracy.default_model import default_text_dataset, load_model_or_default


def load_model(name: str, device: str | None) -> tuple[torch.nn.Module, str]:
    """``--model default`` is the embedded model; otherwise a TL name or local HF folder, falling
    back to the embedded model when the Hugging Face hub cannot be reached."""
    return load_model_or_default(name, device=device)


def closest_pair(dist: torch.Tensor) -> tuple[int, int, float]:
    d = torch.maximum(dist, dist.T).clone()
    d.fill_diagonal_(float("inf"))
    flat = int(d.argmin())
    i, j = divmod(flat, d.shape[0])
    return i, j, float(d[i, j])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="TL model name or local HF folder; 'default' = embedded model")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens to collect attention statistics on")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="largest distance at which two heads count as synchronized (TV: fraction of "
                             "attention mass placed differently)")
    parser.add_argument("--metric", choices=("tv", "squared"), default="tv")
    parser.add_argument("--linkage", choices=("components", "complete"), default="components",
                        help="components: chains join blocks; complete: every pair in a block within threshold")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer whose full distance matrix to print (default: the layer with the closest pair)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    model, model_name = load_model(args.model, args.device)
    cfg = model.cfg
    L, H, d_head = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head)
    context = min(args.context, int(cfg.n_ctx))
    print(f"model: {model_name} as {type(model).__name__}; {L} layers x {H} heads, d_head {d_head}")

    start = time.time()
    # Activation statistics at one cheap hook come along; the HeadSync observer adds the pattern statistics.
    stats = tld.collect(model, default_text_dataset(), "blocks.0.hook_resid_pre", observers=[tld.HeadSync()],
                        max_tokens=args.tokens, batch_size=args.batch_size, context=context)
    print(f"data: embedded text, {stats.n_tokens:,} tokens in sequences of {context} ({time.time() - start:.1f} s)")

    sync = tld.synchronized_heads(stats, args.threshold, model=model, metric=args.metric, linkage=args.linkage)
    print(f"\nmetric: {sync.meaning}")
    print(f"threshold: {sync.threshold:g} ({sync.linkage} linkage); free directions per synchronized pair: "
          f"2·r_h·r_h', {sync.rank_source}")
    print(f"\n{'layer':>5}  {'synchronized blocks':24s} {'worst':>7} {'threshold':>9} {'freedoms':>9}   closest pair")
    closest = {}
    for layer in sync.layers:
        dist = tld.head_sync_matrices(stats, layer).metric(args.metric)
        i, j, value = closest_pair(dist)
        closest[layer] = value
        blocks = sync.blocks_in(layer)
        pair = f"heads {i},{j}: {value:.3f}"
        if not blocks:
            print(f"{layer:>5}  {'none':24s} {'':>7} {sync.threshold:>9g} {0:>9,}   {pair}")
        for n, b in enumerate(blocks):
            heads = "{" + ", ".join(str(h) for h in b.heads) + "}"
            freed = f"{b.freedoms:>9,}"
            print(f"{layer if n == 0 else '':>5}  {heads:24s} {b.worst_distance:>7.3f} {sync.threshold:>9g} {freed}   "
                  f"{pair if n == 0 else ''}")
    if args.linkage == "components" and any(b.worst_distance > sync.threshold for b in sync.blocks):
        print("(worst > threshold: a chain of close pairs joined heads that are farther apart; "
              "--linkage complete keeps every pair within the threshold)")

    layer = args.layer if args.layer is not None else min(closest, key=closest.get)
    mats = tld.head_sync_matrices(stats, layer)
    dist = mats.metric(args.metric)
    print(f"\n{args.metric} distance between heads, layer {layer} ({mats.n:,} query rows):")
    print("      " + "".join(f"{'h' + str(h):>8}" for h in range(H)))
    for h in range(H):
        print(f"{'h' + str(h):>6}" + "".join(f"{float(v):8.3f}" for v in dist[h]))

    generic = 2 * d_head * d_head * H * L
    attention_params = 4 * int(cfg.d_model) * H * d_head * L
    print(f"\nsynchronized heads add {sync.total_freedoms:,} free parameter directions "
          f"({', '.join(f'layer {l}: {f:,}' for l, f in sync.freedoms_per_layer.items())})")
    print(f"for scale: every head has 2·d_head² = {2 * d_head * d_head:,} generic ones ({generic:,} in all); "
          f"the attention weights have {attention_params:,} parameters")


if __name__ == "__main__":
    main()
