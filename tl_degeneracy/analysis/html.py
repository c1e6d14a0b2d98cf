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
img { max-width: 100%; border: 1px solid #eee; margin: 4px; } img.wide { width: 100%; }
.grid { display: flex; flex-wrap: wrap; } .grid img { width: 48%; }
.note { color: #555; font-size: 0.9em; } .mono { font-family: monospace; font-size: 0.8em; }
.error { background: #fff3f3; border: 1px solid #e99; padding: 0.4em 1em; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #225; }
"""


def _img(path: Path, wide: bool = False) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    cls = ' class="wide"' if wide else ""
    return f'<img{cls} alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[object]], left: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{html.escape(str(c))}</td>' if i < left else f"<td>{html.escape(str(c))}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# report.json's field names → the account table's column headers, so that notes name what the reader sees
_COLUMNS = {"free_from_G": "free (G≈0)", "free_from_K": "free (K≈0)", "free_combined": "free (G∪K)",
            "kfac_rank": "K-FAC rank", "(g_threshold, k_threshold)": "(g_threshold, k_threshold in report.json)"}


def _as_shown(note: str) -> str:
    for field, column in _COLUMNS.items():
        note = note.replace(field, column)
    return note


def _fmt(value: object) -> str:
    """Numbers as people read them: no "−0", large counts with separators, None as "–"."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.3g}"
    return str(value)


def _plain_path(text: str) -> str:
    """An absolute local path shown by its last two parts (provenance names data, not someone's home folder)."""
    p = Path(text)
    return str(Path(*p.parts[-2:])) if p.is_absolute() and len(p.parts) > 2 else text


def _details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{html.escape(summary)}</summary>{body}</details>"


def write_html(report: AnalysisReport, figures: dict[str, list[Path]], path: Path, explore: str | None = None) -> Path:
    """report.html; ``explore``: a relative link to the direction dashboards' index, when they exist."""
    m = report.model
    cfg = m.get("cfg", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tl_degeneracy report</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>Degeneracy report</h1>",
             f"<p>{html.escape(m.get('class', '?'))} <code>{html.escape(_plain_path(str(cfg.get('model_name', ''))))}"
             f"</code> ({cfg.get('n_layers', '?')} layers, d_model {cfg.get('d_model', '?')}), TransformerLens "
             f"{html.escape(str(m.get('transformer_lens', '?')))}; {report.n_tokens:,} tokens, "
             f"{report.n_probes} probes per batch, {report.seconds} s. Eigenvalues below rtol = {report.rtol:g} × the "
             f"largest count as zero (absolute thresholds in each table row).</p>"]
    if explore is not None:
        parts.append(f"<p><a href='{html.escape(explore)}'><b>Direction dashboards</b></a>: what each of the most "
                     "important interaction-basis and PCA directions responds to (top contexts of both signs, "
                     "histograms) and what it does (direct logit effect, edges).</p>")
    if report.errors:
        parts.append("<div class='error'><b>Sections that could not be computed</b> (the statistics are kept; "
                     "<code>tl-degeneracy report DIR</code> rebuilds the report):<ul>"
                     + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in report.errors.items())
                     + "</ul></div>")
    if report.notes:
        parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("".join(_img(p, wide=True) for p in figures.get("summary", [])))
    parts.append(_provenance(report))

    if report.spectra:
        parts.append("<h2>Residual stream: interaction basis vs PCA</h2>")
        rows = [[h, s.d, s.n_datapoints, s.ib_kept, s.pca_kept, s.ib_dirs_99, s.pca_dirs_99,
                 ", ".join(f"{v:.3g}" for v in s.top_lambda[:4]) or "–", s.thresholds.get("interaction"),
                 "data-limited" if s.data_limited else ("outliers" if s.without_outliers else "")]
                for h, s in report.spectra.items()]
        parts.append("<p class='note'>IB dirs 99% ΣΛ: the fewest interaction-basis directions carrying 99% of ΣΛ; "
                     "PCA dirs 99% var: the fewest principal directions carrying 99% of the variance. "
                     "'data-limited': fewer datapoints than 4× the width.</p>")
        parts.append(_table(["hook", "d", "datapoints", "IB kept", "PCA kept", "IB dirs 99% ΣΛ", "PCA dirs 99% var",
                             "top Λ", "Λ threshold", "flag"], [[_fmt(c) for c in r] for r in rows]))
        parts.append("".join(_img(p, wide=True) for p in figures.get("cumulative", [])))
        parts.append(_details(f"spectra of each hook ({len(figures.get('spectra', []))} plots)",
                              '<div class="grid">' + "".join(_img(p) for p in figures.get("spectra", [])) + "</div>"))
    if report.outliers:
        parts.append(_outliers_html(report))

    d = report.degeneracy
    if d is not None:
        parts.append("<h2>Degeneracy account</h2>")
        parts.append(f"<p class='note'>{html.escape(d.eps_meaning)}</p>")
        rows = [[layer, r.nominal, r.free_from_G, r.free_from_K, r.free_combined, r.kfac_rank,
                 r.synchronized_head_freedoms, r.synchronized_neuron_freedoms]
                for layer, r in d.per_layer.items()]
        parts.append(_table(["layer", "nominal", "free (G≈0)", "free (K≈0)", "free (G∪K)", "K-FAC rank",
                             "sync-head freedoms", "sync-neuron freedoms"], [[_fmt(c) for c in r] for r in rows]))
        t = d.totals
        assert t is not None
        parts.append(f"<p><b>Totals:</b> {t.nominal_weights:,} weight parameters ({t.nominal_model:,} trainable "
                     f"in the model, tied weights once); K-FAC effective count {t.kfac_rank:,} at eps = {d.eps:.3g}; "
                     f"minus synchronisation freedoms (heads at TV ≤ {_fmt(d.head_threshold)}, neurons at cost ≤ "
                     f"{_fmt(d.neuron_threshold)}) → <b>{t.effective_parameters:,}</b> effective parameters.</p>")
        parts.append("".join(_img(p, wide=True) for p in figures.get("parameters", [])))
        if d.notes:
            parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(_as_shown(n))}</li>" for n in d.notes)
                         + "</ul>")

    heads = report.synchronized_heads
    if heads is not None:
        parts.append("<h2>Synchronized attention heads</h2>")
        parts.append(f"<p class='note'>threshold {heads.threshold:g} on the {html.escape(heads.meaning)}; "
                     f"{html.escape(heads.rank_source)}.</p>")
        rows = [[b.layer, ", ".join(map(str, b.heads)), "" if b.kv_heads is None else ", ".join(map(str, b.kv_heads)),
                 f"{b.worst_distance:.3g}", b.freedoms] for b in heads.blocks if len(b.heads) > 1]
        parts.append(_table(["layer", "heads", "key/value heads", "worst distance", "freedoms"],
                            [[_fmt(c) for c in r] for r in rows]) if rows
                     else "<p>No synchronized pair at this threshold.</p>")
        if heads.closest:
            parts.append(_details("closest pair of each layer", _table(
                ["layer", "heads", "distance"], [[layer, f"{a}, {b}", f"{v:.3g}"]
                                                 for layer, (a, b, v) in sorted(heads.closest.items())])))
        parts.append(_details(f"head distance matrices ({len(figures.get('heads', []))} layers, one colour scale)",
                              '<div class="grid">' + "".join(_img(p) for p in figures.get("heads", [])) + "</div>"))

    neurons = report.synchronized_neurons
    if neurons is not None:
        parts.append("<h2>Synchronized and dead neurons</h2>")
        parts.append(f"<p class='note'>threshold {neurons.threshold:g} on the {html.escape(neurons.meaning)}; dead: "
                     f"E[f²] ≤ {_fmt(neurons.dead_rtol)} × the layer's largest.</p>")
        def pair(c: tuple[int, int, float] | None) -> str:
            return "–" if c is None else f"{c[0]}–{c[1]} ({_fmt(c[2])})"

        rows = [[l, s.d_mlp, len(s.dead), sum(len(b.neurons) > 1 for b in s.blocks), s.sum_s_squared_minus_d,
                 s.added_freedoms, pair(s.closest)] for l, s in neurons.layers.items()]
        parts.append(_table(["layer", "d_mlp", "dead", "blocks (>1 neuron)", "Σ s_a² − d", "added freedoms",
                             "closest pair (cost)"],
                            [[_fmt(c) for c in r] for r in rows]))
    if report.interactions is not None:
        parts.append(_interactions_html(report.interactions, figures))
    if report.llc is not None:
        parts.append(_llc_html(report.llc, figures))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _provenance(report: AnalysisReport) -> str:
    prov = report.provenance
    cfg_run = prov.run.get("config", {})
    jac = cfg_run.get("jacobians") or {}
    hooks_g, hooks_m = cfg_run.get("hooks", []), cfg_run.get("jacobian_hooks", [])
    rows = [
        ["dataset", _plain_path(prov.dataset) if prov.dataset else "(not recorded)"],
        ["tokens", f"{report.n_tokens:,}"],
        ["context", cfg_run.get("context")],
        ["batch size", cfg_run.get("batch_size")],
        ["positions", cfg_run.get("positions")],
        ["stages", ", ".join(prov.analysis.get("stages") or []) or "all"],
        ["layers", "all" if prov.analysis.get("layers") is None else ", ".join(map(str, prov.analysis["layers"]))],
        ["Jacobians", ", ".join(f"{k}={v}" for k, v in jac.items()) or "–"],
        ["observers", "; ".join(str(o.get("kind", o)) for o in cfg_run.get("observers", []))],
        ["tokenizer", _plain_path(str(prov.run.get("tokenizer")))],
        ["weights sha256", report.model.get("weights_sha256")],
        ["model dtype", report.model.get("dtype")],
        ["tl_degeneracy", prov.package_version],
    ]
    body = _table(["what", "value"], rows)
    body += _details(f"activation Grams at {len(hooks_g)} hooks", "<p class='mono'>" + html.escape(", ".join(hooks_g))
                     + "</p>")
    body += _details(f"Jacobian Grams at {len(hooks_m)} hooks", "<p class='mono'>" + html.escape(", ".join(hooks_m))
                     + "</p>")
    return "<h2>Provenance</h2>" + _details("what was collected, on what", body)


def _outliers_html(report: AnalysisReport) -> str:
    rows = []
    threshold = None
    for hook, o in report.outliers.items():
        threshold = o.ratio_threshold
        for c in o.coordinates:
            at = ", ".join(f"pos {s.position} {s.text!r}" if s.text is not None else f"pos {s.position} tok {s.token}"
                           for s in c.sites[:3])
            share = f"{c.position_share[0]:.0%}" if c.position_share else "–"
            rows.append([hook, c.coordinate, f"{c.rms:.3g}", f"{c.ratio:,.0f}", share, at or "–"])
    parts = ["<h2>Massive-activation directions</h2>",
             f"<p class='note'>Residual coordinates whose mean square exceeds {_fmt(threshold)}× the median "
             "coordinate's (one such coordinate makes PCA's leading direction and 'directions for 99%' describe it "
             "alone; the residual table's figures without them are below). 'at position 0': its share of "
             "Σ f² at the first position.</p>",
             _table(["hook", "coordinate", "RMS", "× median", "at position 0", "largest at"],
                    [[_fmt(c) for c in r] for r in rows])]
    wo = [[h, ", ".join(map(str, s.without_outliers["coordinates"])), s.without_outliers.get("ib_kept"),
           s.without_outliers.get("ib_dirs_99"), s.without_outliers.get("pca_dirs_99"), s.ib_dirs_99, s.pca_dirs_99]
          for h, s in report.spectra.items() if s.without_outliers]
    if wo:
        parts.append(_table(["hook", "left out", "IB kept", "IB dirs 99% ΣΛ", "PCA dirs 99% var",
                             "(with: IB 99%)", "(with: PCA 99%)"], [[_fmt(c) for c in r] for r in wo]))
    return "\n".join(parts)


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
                 "sparser) and the Gini coefficient (larger is sparser). The figure shows the share of ΣE carried by "
                 "the strongest edges against their fraction on a log axis (the Lorenz curve turned around: a sparse "
                 "basis reaches 1 far to the left).</p>")
    parts.append(_table(["basis", "layer pair", "edges", "ΣE", "50%", "90%", "99%", "Gini"], rows, left=2))
    parts.append("".join(_img(p, wide=True) for p in figures.get("lorenz", [])))  # full width: legible ticks
    parts.append("<h3>Modules</h3><p class='note'>cut cost Σ max(0, ½ log(E/ε)) of the best balanced partition "
                 f"into {cfg.n_modules} modules (balance {cfg.balance}), against random partitions of the "
                 "same sizes; ε relative to the largest edge, absolute value alongside.</p>")
    mrows = [[name, f"{r.eps_rtol:.0e}" if r.eps_rtol is not None else "–", f"{r.eps:.3g}",
              ", ".join(map(str, r.module_sizes)), f"{r.cut_cost:.3g}", r.n_cut_edges,
              f"{r.random.mean:.3g}" if r.random.mean is not None else "–"]
             for name, rs in section.modules.items() for r in rs]
    parts.append(_table(["basis", "ε/max E", "ε", "module sizes", "cut cost", "edges cut", "random mean"], mrows))
    parts.append("".join(_img(p, wide=True) for p in figures.get("interaction_graph", [])))  # full width: legible ticks
    ab = section.ablation
    parts.append(f"<h3>Ablation curves</h3><p class='note'>keep the top-k directions of one node, set the rest to "
                 f"their mean; behavioural loss and cross-entropy increase on {ab.tokens} tokens "
                 f"({html.escape(ab.text)}).</p>")
    parts.append("".join(_img(p, wide=True) for p in figures.get("ablation", [])))
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
