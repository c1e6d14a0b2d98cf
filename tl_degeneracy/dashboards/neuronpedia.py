"""Direction dashboards as SAEDashboard's Neuronpedia JSON (``batch-N.json``), for the exported latents.

A signed basis exported to sae_lens (``basis.sae_lens_export``) has ``2k`` latents: latent ``i`` is
``relu(f̂_i)``, latent ``k + i`` is ``relu(−f̂_i)``. Each feature here is one such latent, built from the
streamed examples of its sign (``examples``), its histogram, and its decoder's direct logit effect
(``facts``; for latent ``k + i`` the decoder is ``−C⁺[:, i]``, so raising and lowering swap).

**Schema.** The field names and nesting are those SAEDashboard writes and Neuronpedia's importer reads:
``NeuronpediaDashboardBatch`` / ``NeuronpediaDashboardFeature`` / ``NeuronpediaDashboardActivation``
``.to_dict()`` in ``sae_dashboard/neuronpedia/neuronpedia_dashboard.py`` (jbloomAus/SAEDashboard @ db4839a,
May 2026), checked against its acceptance fixture ``tests/acceptance/test_simple/batch-0.json``. What this
tool does not compute is given empty (``correlated_*``, ``decoder_weights_dist``, ``vector``), as SAEDashboard
itself does when a statistic is off.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from .examples import HistogramBins
from .pages import DirectionView, Example

BATCH_KEYS = ("model_id", "layer", "sae_set", "sae_id_suffix", "features")
FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector",
)
ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index")


def layer_of_hook(hook: str) -> int:
    match = re.search(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else 0


def _activation(example: Example, sign: float, group_max: float) -> dict[str, Any]:
    """One context of SAEDashboard's top-activation group (``bin_min``/``bin_contains`` −1, ``bin_max`` the group's
    largest activation): relu(±f̂) at each token of the window (tokens beyond the sequence left out)."""
    keep = [i for i, t in enumerate(example.tokens) if t is not None]
    values = [round(max(0.0, sign * (example.values[i] or 0.0)), 5) for i in keep]
    return {"bin_min": -1, "bin_max": round(group_max, 5), "bin_contains": -1,
            "tokens": [example.tokens[i] for i in keep], "values": values,
            "qualifying_token_index": keep.index(example.center)}


def _histogram(counts: Sequence[int], scale: float, bins: HistogramBins) -> tuple[list[float], list[int]]:
    """Bar centres (activation units) and heights of the nonzero bins of one sign (the underflow bin, which
    holds the zeros and values below 10^lo·s, is left out like SAEDashboard's zero activations)."""
    edges = bins.edges().tolist()
    centres, heights = [], []
    for b, c in enumerate(counts):
        if b == 0 or not c:
            continue
        lo = edges[b - 1]
        hi = edges[b] if b < len(edges) else lo * 10 ** (1 / bins.per_decade)
        centres.append(round(math.sqrt(lo * hi) * scale, 5))
        heights.append(int(c))
    return centres, heights


def feature_json(view: DirectionView, index: int, sign: float, decoder: torch.Tensor | None, bins: HistogramBins,
                 n_prompts: int, context: int, dataset: str) -> dict[str, Any]:
    """One latent's entry (``sign`` +1: ``relu(f̂_i)``, −1: ``relu(−f̂_i)``, whose decoder is ``−C⁺[:, i]``: its
    logit effect is the direction's negated, so the tokens it raises are those the direction lowers)."""
    f = view.facts
    examples = view.positive if sign > 0 else view.negative
    counts = view.hist_positive if sign > 0 else view.hist_negative
    centres, heights = _histogram(counts, f.rms, bins)
    align_i: list[int] = []
    align_v: list[float] = []
    align_l1: list[float] = []
    if decoder is not None:
        d = sign * decoder.to(torch.float64)
        top = torch.topk(d.abs(), min(3, d.numel()))
        l1 = float(d.abs().sum()) or 1.0
        align_i = [int(i) for i in top.indices]
        align_v = [round(float(d[i]), 5) for i in top.indices]
        align_l1 = [round(abs(v) / l1, 5) for v in align_v]
    raises, lowers = (f.logits_top, f.logits_bottom) if sign > 0 else (f.logits_bottom, f.logits_top)
    hist_values = [round(sign * v, 5) for v in f.logits_hist_values]
    hist_heights = list(f.logits_hist_heights)
    if sign < 0:
        hist_values, hist_heights = hist_values[::-1], hist_heights[::-1]
    feature = {
        "feature_index": index,
        "neuron_alignment_indices": align_i, "neuron_alignment_values": align_v, "neuron_alignment_l1": align_l1,
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [t.token for t in lowers], "neg_values": [round(sign * t.value, 5) for t in lowers],
        "pos_str": [t.token for t in raises], "pos_values": [round(sign * t.value, 5) for t in raises],
        "frac_nonzero": round(sum(counts) / max(f.n, 1), 7),
        "freq_hist_data_bar_values": centres, "freq_hist_data_bar_heights": heights,
        "logits_hist_data_bar_heights": hist_heights, "logits_hist_data_bar_values": hist_values,
        "n_prompts_total": n_prompts, "n_tokens_in_prompt": context, "dataset": dataset,
        "decoder_weights_dist": [], "vector": [],
        "activations": [_activation(e, sign, abs(examples[0].value)) for e in examples],
    }
    feature = {key: feature[key] for key in FEATURE_KEYS}  # SAEDashboard's to_dict order
    return feature


def batch_json(views: Sequence[DirectionView], hook: str, k: int, model_id: str, sae_set: str,
               decoders: torch.Tensor | None, bins: HistogramBins, n_prompts: int, context: int,
               dataset: str) -> dict[str, Any]:
    """``batch-0.json`` for the latents of the chosen directions of one hook's basis (``k`` its number of
    directions: latent ``k + i`` is direction ``i``'s negative side, as in the sae_lens export).
    ``decoders[:, r]`` is ``views[r]``'s ``C⁺`` column."""
    features = []
    for r, view in enumerate(views):
        for sign, offset in ((1.0, 0), (-1.0, k)):
            features.append(feature_json(view, view.facts.index + offset, sign,
                                         None if decoders is None else decoders[:, r], bins, n_prompts, context,
                                         dataset))
    features.sort(key=lambda f: f["feature_index"])
    return {"model_id": model_id, "layer": layer_of_hook(hook), "sae_set": sae_set, "sae_id_suffix": None,
            "features": features}
