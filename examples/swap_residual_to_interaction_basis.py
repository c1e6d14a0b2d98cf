"""Swap GPT-2's residual stream into its interaction basis, then drop the least important directions.

1. Collect activation and Jacobian Grams of the logits at ``blocks.L.hook_resid_pre`` and fit
   two bases there: the interaction basis (IB; ``E[f̂ f̂ᵀ] = Λ``, ``Λ_i`` = how much the
   behavioral loss depends on direction ``i``) and PCA (ordered by variance).
2. Splice the IB into the model: ``blocks.L.hook_resid_pre.hook_ib`` is a new hook point holding
   the coordinates ``f̂ = C (f − μ)``, ``[batch, pos, k]``; read it with ``run_with_cache``.
3. On held-out tokens (never used for fitting), mean-ablate the smallest-Λ directions (set their
   ``f̂`` to 0; ``f̂`` is centered, so 0 is the mean) with ``run_with_hooks``, keeping all, 3/4,
   1/2, 1/4, ... of ``d_model`` directions, and measure how far the logits move: MSE (sum over the
   vocabulary, mean over tokens: the paper's behavioral loss), KL(unablated ‖ ablated) and the
   change of the next-token loss. The same with the PCA basis spliced in the same way.

    python examples/swap_residual_to_interaction_basis.py                  # gpt2, middle layer
    python examples/swap_residual_to_interaction_basis.py --model default --layer all
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import tl_degeneracy as tld
from tl_degeneracy.default_model import default_text_dataset, load_model_or_default


def load_model(name: str, device: str | None) -> tuple[torch.nn.Module, str]:
    """``--model default`` is the embedded model; otherwise a TL name or local HF folder, falling
    back to the embedded model when the Hugging Face hub cannot be reached."""
    return load_model_or_default(name, device=device)


def token_rows(model: torch.nn.Module, context: int) -> torch.Tensor:
    """The embedded text, tokenized with the model's tokenizer into rows of ``context`` tokens (BOS first)."""
    from transformer_lens.utilities import tokenize_and_concatenate

    ds = tokenize_and_concatenate(default_text_dataset(), model.tokenizer, max_length=context,
                                  add_bos_token=True, num_proc=1)
    return torch.as_tensor(ds[:]["tokens"])  # [n_rows, context]


def keep_counts(d: int) -> list[int]:
    """d, 3d/4, d/2, d/4, ..., 1, 0."""
    counts = [d, (3 * d) // 4]
    n = d // 2
    while n >= 1:
        counts.append(n)
        n //= 2
    return list(dict.fromkeys(counts + [0]))


def ablate_beyond(n_keep: int):
    """Hook on ``hook_ib``: zero (= mean-ablate) every coordinate after the first ``n_keep``."""
    def hook_fn(f_hat: torch.Tensor, hook) -> torch.Tensor:
        f_hat = f_hat.clone()
        f_hat[..., n_keep:] = 0.0
        return f_hat
    return hook_fn


@torch.no_grad()
def ablation_losses(model, bases: dict, hook: str, tokens: torch.Tensor, counts: list[int],
                    batch_size: int) -> dict[tuple[str, int], dict[str, float]]:
    """Mean MSE / KL / Δ next-token loss per token for every (basis, directions kept)."""
    sums = {(name, n): {"mse": 0.0, "kl": 0.0, "dce": 0.0} for name in bases for n in counts}
    n_tokens, n_pred = 0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        ref = model(batch).to(torch.float64)
        ref_logp = ref.log_softmax(-1)
        targets = batch[:, 1:, None].to(ref.device)
        ref_ce = -ref_logp[:, :-1].gather(-1, targets).sum()
        n_tokens += batch.numel()
        n_pred += batch[:, 1:].numel()
        for name, basis in bases.items():
            with tld.splice(model, basis, hooks=[hook]):
                for n in counts:
                    logits = model.run_with_hooks(batch, fwd_hooks=[(f"{hook}.hook_ib", ablate_beyond(n))])
                    logits = logits.to(torch.float64)
                    logp = logits.log_softmax(-1)
                    s = sums[(name, n)]
                    s["mse"] += float((logits - ref).square().sum())
                    s["kl"] += float((ref_logp.exp() * (ref_logp - logp)).sum())
                    s["dce"] += float(-logp[:, :-1].gather(-1, targets).sum() - ref_ce)
    return {key: {"mse": s["mse"] / n_tokens, "kl": s["kl"] / n_tokens, "dce": s["dce"] / n_pred}
            for key, s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="TL model name or local HF folder; 'default' = embedded model")
    parser.add_argument("--tokens", type=int, default=10_000, help="tokens to fit the bases on")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens to evaluate ablations on")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--probes", type=int, default=4, help="random output probes per batch (Jacobian Grams)")
    parser.add_argument("--layer", default=None, help="layer whose hook_resid_pre to swap (default: the middle "
                                                      "layer; 'all': each layer in turn)")
    parser.add_argument("--rtol", type=float, default=1e-8, help="eigenvalues <= rtol x the largest are dropped")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, model_name = load_model(args.model, args.device)
    L = int(model.cfg.n_layers)
    layers = list(range(L)) if args.layer == "all" else [L // 2 if args.layer is None else int(args.layer)]
    hooks = [f"blocks.{l}.hook_resid_pre" for l in layers]
    context = min(args.context, int(model.cfg.n_ctx))

    rows = token_rows(model, context)
    n_fit, n_eval = math.ceil(args.tokens / context), math.ceil(args.eval_tokens / context)
    if n_fit + n_eval > rows.shape[0]:
        raise SystemExit(f"the embedded text has {rows.shape[0]} sequences of {context} tokens; "
                         f"--tokens and --eval-tokens ask for {n_fit} + {n_eval}")
    device = next(model.parameters()).device
    fit_tokens = rows[:n_fit].to(device)
    eval_tokens = rows[rows.shape[0] - n_eval:].to(device)  # the end of the text: disjoint from the fit rows
    print(f"model: {model_name} as {type(model).__name__}; d_model {model.cfg.d_model}")
    print(f"data: embedded text; fit on {fit_tokens.numel():,} tokens (first {n_fit} sequences of {context}), "
          f"evaluate on {eval_tokens.numel():,} held-out tokens (last {n_eval} sequences)")

    start = time.time()
    stats = tld.collect(model, fit_tokens, hooks, jacobians=tld.JacobianConfig(n_probes=args.probes),
                        batch_size=args.batch_size)
    ib = tld.InteractionBasis.fit(stats, rtol=args.rtol)
    pca = tld.InteractionBasis.fit(stats, scaling="pca", rtol=args.rtol)
    print(f"fitted IB and PCA bases at {len(hooks)} hook point(s) in {time.time() - start:.1f} s "
          f"({args.probes} probes per batch, MSE behavioral loss on the logits, rtol {args.rtol:g})")
    for h in hooks:
        top = ", ".join(f"{v:.3g}" for v in ib[h].eigenvalues[:4].tolist())
        print(f"  {h}: IB keeps {ib[h].k}/{ib[h].d} directions (99% of ΣΛ in {ib[h].n_directions_for(0.99)}), "
              f"PCA {pca[h].k}/{pca[h].d} (99% of variance in {pca[h].n_directions_for(0.99)}); top Λ: {top}")

    # Splice the IB in and read its coordinates like any other activation.
    probe_batch = eval_tokens[:2]
    with torch.no_grad():
        plain = model(probe_batch)
        with tld.splice(model, ib):
            logits, cache = model.run_with_cache(probe_batch, names_filter=lambda n: n.endswith(".hook_ib"))
    print("\nspliced: run_with_cache sees the new hook points")
    for h in hooks:
        f_hat = cache[f"{h}.hook_ib"]
        var = f_hat.reshape(-1, f_hat.shape[-1]).to(torch.float64).var(0)[:3]
        print(f"  cache['{h}.hook_ib'].shape = {tuple(f_hat.shape)}   held-out Var(f̂)[:3] = "
              f"{', '.join(f'{v:.3g}' for v in var.tolist())} (Λ[:3] on the fit data)")
    print(f"  max |logits(spliced) − logits(model)| = {float((logits - plain).abs().max()):.2e} (error term kept)")

    print("\nmean-ablating the smallest-Λ (IB) / smallest-variance (PCA) directions on the held-out tokens")
    print("MSE = mean over tokens of Σ_vocab (Δ logit)²; KL = mean KL(unablated ‖ ablated) in nats; "
          "ΔCE = change of the next-token loss; ΣΛ dropped = the IB's first-order prediction of the MSE")
    for h in hooks:
        d = ib[h].d
        counts = keep_counts(d)
        start = time.time()
        res = ablation_losses(model, {"IB": ib, "PCA": pca}, h, eval_tokens, counts, args.batch_size)
        print(f"\nablation at {h} ({time.time() - start:.1f} s)")
        print(f"{'basis':6s} {'kept':>10s} {'MSE':>11s} {'KL':>11s} {'ΔCE':>11s} {'ΣΛ dropped':>11s} "
              f"{'KL IB/PCA':>10s}")
        for n in counts:
            for name, basis in (("IB", ib[h]), ("PCA", pca[h])):
                r = res[(name, n)]
                mark = "*" if 0 < n < d and n >= basis.k else " "  # the basis has only k <= n directions
                dropped = f"{float(basis.eigenvalues[n:].sum()):11.4g}" if name == "IB" else f"{'':>11s}"
                pca_kl = res[("PCA", n)]["kl"]
                ratio = f"{r['kl'] / pca_kl:10.3g}" if name == "IB" and pca_kl > 1e-9 else f"{'':>10s}"
                print(f"{name:6s} {n:>4d}/{str(d) + mark:<5s} {r['mse']:11.4g} {r['kl']:11.4g} {r['dce']:11.4g} "
                      f"{dropped} {ratio}")
        short = {name: b[h].k for name, b in (("IB", ib), ("PCA", pca)) if b[h].k < d}
        if short:
            print("* nothing ablated: the basis has only " + ", ".join(f"{k} ({name})" for name, k in short.items())
                  + " directions above the threshold; the rest is in hook_ib_error")
        quarter = [n for n in counts if n <= d // 4][0]
        print(f"keeping {quarter}/{d} directions: KL {res[('IB', quarter)]['kl']:.4g} (IB) vs "
              f"{res[('PCA', quarter)]['kl']:.4g} (PCA)")


if __name__ == "__main__":
    main()
