"""Collect degeneracy statistics for GPT-2 and print its degeneracy account.

One streaming pass over the text collects, at every hook point the degeneracy account needs
(``degeneracy_hooks``) and along the residual stream: float64 activation Grams ``G``, Jacobian
Grams ``M``/``K`` of the logits (random output probes), attention-pattern statistics
(synchronized heads) and firing-pattern statistics (synchronized neurons). From them:

- the degeneracy report: per layer, nominal weight parameters vs the effective count
  (K-FAC rank of each weight matrix's Gauss-Newton block, minus the freedoms that
  synchronized heads and neurons add), with the thresholds used;
- the interaction basis of the residual stream: how many directions matter, vs PCA.

    python examples/analyze_gpt2.py                       # gpt2 (embedded model when offline)
    python examples/analyze_gpt2.py --model default       # the embedded default model
    python examples/analyze_gpt2.py --dataset my.txt --tokens 50000 --out gpt2_out

Writes ``OUT/stats.safetensors`` (reload with ``tl_degeneracy.Stats.load``), ``OUT/report.json``
(``DegeneracyReport.from_json``) and ``OUT/summary.json``.

Memory: every hook gets a ``d × d`` float64 Gram and Jacobian Gram; for gpt2 (``d_mlp = 3072``)
the whole account needs several GB of RAM.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import tl_degeneracy as tld
from tl_degeneracy.basis import InteractionBasis
from tl_degeneracy.default_model import default_text_dataset, load_model_or_default


def load_model(name: str, device: str | None) -> tuple[torch.nn.Module, str]:
    """``--model default`` is the embedded model; otherwise a TL name or local HF folder, falling
    back to the embedded model when the Hugging Face hub cannot be reached."""
    return load_model_or_default(name, device=device)


def load_text(spec: str | None):
    """The embedded text (Jane Austen's *Persuasion*), or a local text/JSON(L)/parquet file or folder."""
    if spec is None:
        return default_text_dataset(), "embedded text (Persuasion, held out from the default model's training)"
    import datasets

    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--dataset {spec!r}: no such file or folder (pass a local .txt/.json/.jsonl/.parquet)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    builder = builders.get(files[0].suffix, "text") if files else "text"
    data = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    return data, f"{spec} ({builder}, {len(data)} rows)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="TL model name or local HF folder; 'default' = embedded model")
    parser.add_argument("--dataset", default=None,
                        help="local text/JSON(L)/parquet file or folder (default: embedded text)")
    parser.add_argument("--tokens", type=int, default=10_000, help="tokens to collect statistics on")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--probes", type=int, default=4, help="random output probes per batch (Jacobian Grams)")
    parser.add_argument("--rtol", type=float, default=1e-8, help="eigenvalues <= rtol x the largest count as zero")
    parser.add_argument("--head-threshold", type=float, default=0.05, help="mean TV distance for synchronized heads")
    parser.add_argument("--neuron-threshold", type=float, default=1e-3, help="cost threshold for synchronized neurons")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="analyze_gpt2_out", help="folder for stats.safetensors and report.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, model_name = load_model(args.model, args.device)
    data, data_desc = load_text(args.dataset)
    context = min(args.context, int(model.cfg.n_ctx))
    L = int(model.cfg.n_layers)
    resid_hooks = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    hooks = list(dict.fromkeys(tld.degeneracy_hooks(model) + resid_hooks))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model_name} as {type(model).__name__} ({n_params:,} parameters, {L} layers, "
          f"d_model {model.cfg.d_model})")
    print(f"data: {data_desc}; up to {args.tokens:,} tokens in sequences of {context}")
    print(f"collecting G and Jacobian Grams at {len(hooks)} hook points ({args.probes} probes per batch, "
          f"MSE behavioral loss on the logits), head and neuron synchronization ...")

    start = time.time()
    stats = tld.collect(model, data, hooks, jacobians=tld.JacobianConfig(n_probes=args.probes),
                        max_tokens=args.tokens, batch_size=args.batch_size, context=context,
                        observers=[tld.HeadSync(), tld.NeuronSync()])
    collect_s = time.time() - start
    print(f"collected {stats.n_tokens:,} tokens in {stats.n_batches} batches in {collect_s:.1f} s")

    # Synchronized heads and neurons, computed once: the account subtracts their freedoms (and
    # records the thresholds), summary.json keeps the blocks themselves.
    heads = tld.synchronized_heads(stats, args.head_threshold, model=model)
    neurons = tld.synchronized_neurons(stats, threshold=args.neuron_threshold, model=model)
    report = tld.degeneracy_report(model, stats, rtol=args.rtol, heads=heads, neurons=neurons)
    t = report.totals
    print("\n== Degeneracy report ==")
    print("thresholds:")
    print(f"  G and K eigenvalues: <= rtol={report.rtol:g} x their matrix's largest count as zero")
    print(f"  K-FAC eps = {report.eps:.3g}: {report.eps_meaning}")
    print(f"  synchronized heads: mean TV distance <= {report.head_threshold:g}; "
          f"synchronized neurons: cost <= {report.neuron_threshold:g}")
    print(report.summary())

    print("\nnominal vs effective parameters per layer "
          "(effective = K-FAC rank - synchronized-head - synchronized-neuron freedoms):")
    print(f"{'layer':>8} {'nominal':>10} {'K-FAC rank':>11} {'-heads':>8} {'-neurons':>9} {'effective':>10} "
          f"{'eff/nom':>8}")
    per_layer, clipped = {}, False
    for layer, row in report.per_layer.items():
        head_free = row.synchronized_head_freedoms or 0
        neuron_free = row.synchronized_neuron_freedoms or 0
        raw = row.kfac_rank - head_free - neuron_free
        effective = max(0, raw)
        clipped |= raw < 0
        per_layer[layer] = {"nominal": row.nominal, "kfac_rank": row.kfac_rank, "head_freedoms": head_free,
                            "neuron_freedoms": neuron_free, "effective": effective}
        ratio = effective / row.nominal if row.nominal else float("nan")
        print(f"{layer:>8} {row.nominal:>10,} {row.kfac_rank:>11,} {head_free:>8,} {neuron_free:>9,} "
              f"{effective:>10,}{'*' if raw < 0 else ' '}{ratio:>8.1%}")
    print(f"{'total':>8} {t.nominal_weights:>10,} {t.kfac_rank:>11,} {t.synchronized_head_freedoms:>8,} "
          f"{t.synchronized_neuron_freedoms:>9,} {t.effective_parameters:>10,} "
          f"{t.effective_parameters / t.nominal_weights:>8.1%}")
    if clipped:
        print("* clipped at 0: the synchronization freedoms exceed the layer's K-FAC rank, i.e. they overlap "
              "directions the K-FAC count already treats as free (the counts are not additive)")
    if report.missing:
        print(f"missing from the account: {len(report.missing)} items, e.g. {report.missing[0]}")

    ib = InteractionBasis.fit(stats, hooks=resid_hooks, rtol=args.rtol)
    pca = InteractionBasis.fit(stats, hooks=resid_hooks, scaling="pca", rtol=args.rtol)
    print("\n== Residual stream: interaction basis vs PCA ==")
    print(f"{'hook':28s} {'d':>5s} {'IB kept':>8s} {'IB 99% ΣΛ':>10s} {'PCA 99% var':>12s}  top Λ")
    resid = {}
    for h in resid_hooks:
        row = {"d": ib[h].d, "ib_kept": ib[h].k, "ib_dirs_99": ib[h].n_directions_for(0.99),
               "pca_dirs_99": pca[h].n_directions_for(0.99), "top_lambda": ib[h].eigenvalues[:5].tolist(),
               "thresholds": ib[h].thresholds}
        resid[h] = row
        top = ", ".join(f"{v:.3g}" for v in row["top_lambda"][:3])
        print(f"{h:28s} {row['d']:5d} {row['ib_kept']:8d} {row['ib_dirs_99']:10d} {row['pca_dirs_99']:12d}  {top}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats.save(out / "stats.safetensors")
    (out / "report.json").write_text(report.to_json(indent=2))
    summary = {"model": stats.run.model, "data": data_desc, "n_tokens": stats.n_tokens, "context": context,
               "probes": args.probes, "collect_seconds": round(collect_s, 1), "per_layer": per_layer,
               "totals": dataclasses.asdict(t), "residual_stream": resid,
               "synchronized_heads": heads.to_dict(), "synchronized_neurons": neurons.to_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'stats.safetensors'}, {out / 'report.json'}, {out / 'summary.json'}")


if __name__ == "__main__":
    main()
