"""A self-contained ``report.html`` (images inlined as base64): readable without Python."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from .llc import TABLE_HEADER, table_rows
from .report import AnalysisReport
from .sections import InteractionsSection, LLCSection

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l { text-align: left; font-family: monospace; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px; }
.grid { display: flex; flex-wrap: wrap; } .grid img { width: 48%; }
.note { color: #555; font-size: 0.9em; }
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[object]], left: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{html.escape(str(c))}</td>' if i < left else f"<td>{html.escape(str(c))}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(report: AnalysisReport, figures: dict[str, list[Path]], path: Path) -> Path:
    m = report.model
    cfg = m.get("cfg", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tl_degeneracy report</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>Degeneracy report</h1>",
             f"<p>{html.escape(m.get('class', '?'))} <code>{html.escape(str(cfg.get('model_name', '')))}</code> "
             f"({cfg.get('n_layers', '?')} layers, d_model {cfg.get('d_model', '?')}), TransformerLens "
             f"{html.escape(str(m.get('transformer_lens', '?')))}; {report.n_tokens:,} tokens, "
             f"{report.n_probes} probes per batch, {report.seconds} s. Eigenvalues below rtol = {report.rtol:g} × the "
             f"largest count as zero (absolute thresholds in each table row).</p>"]
    prov = report.provenance
    cfg_run = prov.run.get("config", {})
    jac = cfg_run.get("jacobians") or {}
    parts.append("<h2>Provenance</h2>")
    parts.append(_table(["what", "value"], [
        ["dataset", prov.dataset or "(not recorded)"],
        ["tokens", f"{report.n_tokens:,}"],
        ["context", cfg_run.get("context")],
        ["batch size", cfg_run.get("batch_size")],
        ["positions", cfg_run.get("positions")],
        ["hooks (G)", ", ".join(cfg_run.get("hooks", []))],
        ["hooks (M)", ", ".join(cfg_run.get("jacobian_hooks", []))],
        ["Jacobians", ", ".join(f"{k}={v}" for k, v in jac.items())],
        ["observers", "; ".join(str(o) for o in cfg_run.get("observers", []))],
        ["tokenizer", prov.run.get("tokenizer")],
        ["weights sha256", m.get("weights_sha256")],
        ["model dtype", m.get("dtype")],
        ["tl_degeneracy", prov.package_version],
    ]))

    parts.append("<h2>Residual stream: interaction basis vs PCA</h2>")
    rows = [[h, s.d, s.ib_kept, s.pca_kept, s.ib_dirs_99, s.pca_dirs_99,
             ", ".join(f"{v:.3g}" for v in s.top_lambda[:4]), f"{s.thresholds.get('interaction', float('nan')):.3g}"]
            for h, s in report.spectra.items()]
    parts.append(_table(["hook", "d", "IB kept", "PCA kept", "IB dirs 99% ΣΛ", "PCA dirs 99% var", "top Λ",
                         "Λ threshold"], rows))
    parts.append('<div class="grid">' + "".join(_img(p) for p in figures.get("cumulative", []) +
                                                figures.get("spectra", [])) + "</div>")

    d = report.degeneracy
    parts.append("<h2>Degeneracy account</h2>")
    parts.append(f"<p class='note'>{html.escape(d.eps_meaning)}</p>")
    rows = [[layer, r.nominal, r.free_from_G, r.free_from_K, r.free_combined, r.kfac_rank,
             "" if r.synchronized_head_freedoms is None else r.synchronized_head_freedoms,
             "" if r.synchronized_neuron_freedoms is None else r.synchronized_neuron_freedoms]
            for layer, r in d.per_layer.items()]
    parts.append(_table(["layer", "nominal", "free (G≈0)", "free (K≈0)", "free (G∪K)", "K-FAC rank",
                         "sync-head freedoms", "sync-neuron freedoms"], rows))
    t = d.totals
    assert t is not None
    parts.append(f"<p><b>Totals:</b> {t.nominal_weights:,} weight parameters ({t.nominal_model:,} in "
                 f"the model); K-FAC effective count {t.kfac_rank:,} at eps = {d.eps:.3g}; minus "
                 f"synchronisation freedoms (heads at TV ≤ {d.head_threshold}, neurons at cost ≤ "
                 f"{d.neuron_threshold}) → <b>{t.effective_parameters:,}</b> effective parameters.</p>")
    parts.append("".join(_img(p) for p in figures.get("parameters", [])))
    if d.notes:
        parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in d.notes) + "</ul>")

    heads = report.synchronized_heads
    if heads is not None:
        parts.append("<h2>Synchronized attention heads</h2>")
        parts.append(f"<p class='note'>threshold {heads.threshold:g} on the {html.escape(heads.meaning)}; "
                     f"{html.escape(heads.rank_source)}.</p>")
        rows = [[b.layer, ", ".join(map(str, b.heads)), f"{b.worst_distance:.3g}", b.freedoms]
                for b in heads.blocks if len(b.heads) > 1]
        parts.append(_table(["layer", "heads", "worst distance", "freedoms"], rows) if rows
                     else "<p>No synchronized pair at this threshold.</p>")
        parts.append('<div class="grid">' + "".join(_img(p) for p in figures.get("heads", [])) + "</div>")

    neurons = report.synchronized_neurons
    if neurons is not None:
        parts.append("<h2>Synchronized and dead neurons</h2>")
        parts.append(f"<p class='note'>threshold {neurons.threshold:g} on the {html.escape(neurons.meaning)}.</p>")
        rows = [[l, s.d_mlp, len(s.dead), sum(len(b.neurons) > 1 for b in s.blocks), s.sum_s_squared_minus_d,
                 s.added_freedoms] for l, s in neurons.layers.items()]
        parts.append(_table(["layer", "d_mlp", "dead", "blocks (>1 neuron)", "Σ s_a² − d", "added freedoms"], rows))
    if report.interactions is not None:
        parts.append(_interactions_html(report.interactions, figures))
    if report.llc is not None:
        parts.append(_llc_html(report.llc, figures))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _interactions_html(section: InteractionsSection, figures: dict[str, list[Path]]) -> str:
    """The interaction graph: sparsity per basis, modules per ε, ablation curves (docs/theory.md §6)."""
    cfg = section.config
    mode = "exact" if cfg.n_probes is None else f"{cfg.n_probes} probes over output positions"
    parts = ["<h2>Interaction graph</h2>",
             f"<p class='note'>Edges E<sub>ij</sub> between consecutive nodes ({len(section.nodes)} nodes), "
             f"{section.edge_tokens} tokens, {mode}; units: {html.escape(section.edge_units)}.</p>"]
    rows = [[r.basis, f"{r.source} → {r.target}", r.n_edges, f"{r.total:.3g}",
             *(f"{r.fraction(q):.3f}" for q in (0.5, 0.9, 0.99)), f"{r.gini:.3f}"]
            for r in section.sparsity]
    parts.append("<h3>Sparsity</h3><p class='note'>fraction of edges carrying 50/90/99% of ΣE (smaller is "
                 "sparser) and the Gini coefficient (larger is sparser).</p>")
    parts.append(_table(["basis", "layer pair", "edges", "ΣE", "50%", "90%", "99%", "Gini"], rows, left=2))
    parts.append('<div class="grid">' + "".join(_img(p) for p in figures.get("lorenz", [])) + "</div>")
    parts.append("<h3>Modules</h3><p class='note'>cut cost Σ max(0, ½ log(E/ε)) of the best balanced partition "
                 f"into {cfg.n_modules} modules (balance {cfg.balance}), against random partitions of the "
                 "same sizes; ε relative to the largest edge, absolute value alongside.</p>")
    mrows = [[name, f"{r.eps_rtol:.0e}" if r.eps_rtol is not None else "–", f"{r.eps:.3g}",
              ", ".join(map(str, r.module_sizes)), f"{r.cut_cost:.3g}", r.n_cut_edges,
              f"{r.random.mean:.3g}" if r.random.mean is not None else "–"]
             for name, rs in section.modules.items() for r in rs]
    parts.append(_table(["basis", "ε/max E", "ε", "module sizes", "cut cost", "edges cut", "random mean"], mrows))
    parts.append('<div class="grid">' + "".join(_img(p) for p in figures.get("interaction_graph", [])) + "</div>")
    ab = section.ablation
    parts.append(f"<h3>Ablation curves</h3><p class='note'>keep the top-k directions of one node, set the rest to "
                 f"their mean; behavioural loss and cross-entropy increase on {ab.tokens} tokens "
                 f"({html.escape(ab.text)}).</p>")
    parts.append("".join(_img(p) for p in figures.get("ablation", [])))
    return "\n".join(parts)


def _llc_html(section: LLCSection, figures: dict[str, list[Path]]) -> str:
    """Sampled N_eff(ε) per part beside the K-FAC count at the same cut-off γε (docs/llc.md)."""
    cfg = section.config
    parts = ["<h2>Effective parameter count (SGLD)</h2>",
             f"<p class='note'>N<sub>eff</sub>(ε) = 2λ̂(ε) = 2t·E<sub>t</sub>[L<sub>B</sub>] at t = 1/ε, sampled by "
             f"SGLD from p<sub>t</sub>(θ) ∝ exp(−t·L<sub>B</sub>(θ) − γ/2‖θ − θ*‖²) with γ = {cfg.gamma:g} over "
             f"each part (the rest held at θ*): {cfg.n_chains} chains × {cfg.n_draws} draws after "
             f"{cfg.burn_in} burn-in steps, {section.tokens} tokens, {section.seconds} s. "
             f"Per layer at ε = {cfg.layer_eps:g}. Chains that diverged or drifted are flagged and left out.</p>",
             _table(TABLE_HEADER, table_rows(section))]
    parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in section.notes) + "</ul>")
    parts.append('<div class="grid">' + "".join(_img(p) for p in figures.get("llc", [])) + "</div>")
    return "\n".join(parts)
