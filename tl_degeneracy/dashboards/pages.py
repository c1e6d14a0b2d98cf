"""Direction dashboards as a self-contained set of HTML pages: no server, no CDN, no script.

``index.html`` lists every hook with its directions by importance, the bases side by side (a sparkline of
each direction's histogram, its densities and its strongest token); one page per hook and basis holds a
section per direction: highlighted contexts of both signs (each token's background is the direction's
coordinate there, blue positive and red negative, scaled to the section's largest |f̂|; the example's own
token is outlined), the histogram, the direct logit effect, the edges of the interaction graph (linked)
and the module. Pages link to each other by relative paths only.
"""
from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .facts import DirectionFacts

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1400px;padding:0 18px;
color:#222}
h1{font-size:22px}h2{font-size:17px;margin:26px 0 6px}h3{font-size:14px;margin:10px 0 4px}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
th{border-bottom:1px solid #999}.num{text-align:right;font-variant-numeric:tabular-nums}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:24px}.note{color:#555;max-width:1100px}
section{border-top:2px solid #ddd;padding-top:6px;margin-top:18px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre;margin:1px 0;overflow:hidden}
.tok{padding:0 1px;border-radius:2px}.hit{outline:1.5px solid #000}.val{color:#666;display:inline-block;width:78px}
nav a{margin-right:14px}.muted{color:#888}svg{vertical-align:middle}
"""


@dataclass
class Example:
    """One top example: the window's tokens (decoded), the coordinate at each (None beyond the sequence or on
    padding), the example's own index in the window and value, and its datapoint id."""

    tokens: list[str]
    values: list[float | None]
    center: int
    value: float
    datapoint: int


@dataclass
class DirectionView:
    facts: DirectionFacts
    positive: list[Example] = field(default_factory=list)
    negative: list[Example] = field(default_factory=list)
    hist_positive: list[int] = field(default_factory=list)  # counts per bin of |f̂|/s (underflow, …, overflow)
    hist_negative: list[int] = field(default_factory=list)


def page_name(hook: str, basis: str) -> str:
    """``blocks.3.hook_resid_pre.interaction.html``: a file name from a hook and a basis (safe characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{hook}.{basis}") + ".html"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"  # never "−0"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 and abs(x) < 1e5 else f"{x:.{digits - 1}e}"


def _mean(mean: float, rms: float) -> str:
    return "≈ 0" if abs(mean) <= 1e-9 * rms else _fmt(mean)  # a centred coordinate's rounding, not a value


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x >= 1e-4 else (f"{100 * x:.1e}%" if x > 0 else "0%")


def _colour(v: float | None, scale: float) -> str:
    if v is None or scale <= 0 or math.isnan(v):
        return "#ffffff"
    a = min(1.0, abs(v) / scale)
    rgb = (33, 102, 172) if v > 0 else (178, 24, 43)  # blue for +, red for −
    mix = [round(255 + (c - 255) * a) for c in rgb]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _show(token: str) -> str:
    return html.escape(token.replace("\n", "↵").replace("\t", "→"))


def context_html(example: Example, scale: float) -> str:
    spans = []
    for i, (tok, v) in enumerate(zip(example.tokens, example.values)):
        if tok is None:
            continue
        cls = "tok hit" if i == example.center else "tok"
        title = "" if v is None else f' title="{_fmt(v, 4)}"'
        spans.append(f'<span class="{cls}" style="background:{_colour(v, scale)}"{title}>{_show(tok)}</span>')
    return f'<div class="ctx"><span class="val">{_fmt(example.value, 4)}</span>{"".join(spans)}</div>'


def histogram_svg(positive: Sequence[int], negative: Sequence[int], width: int = 320, height: int = 60,
                  sparkline: bool = False) -> str:
    """Counts per bin, negative side mirrored to the left (log-count bars); the middle line is |f̂| = 0."""
    bins = list(reversed(negative)) + list(positive)
    if not bins:
        return ""
    top = max(math.log1p(c) for c in bins) or 1.0
    w = width / len(bins)
    bars = []
    for i, c in enumerate(bins):
        if c:
            h = (height - 2) * math.log1p(c) / top
            colour = "#b2182b" if i < len(negative) else "#2166ac"
            bars.append(f'<rect x="{i * w:.1f}" y="{height - h:.1f}" width="{max(w - 0.4, 0.6):.1f}" height="{h:.1f}" '
                        f'fill="{colour}"/>')
    mid = len(negative) * w
    axis = "" if sparkline else f'<line x1="{mid:.1f}" x2="{mid:.1f}" y1="0" y2="{height}" stroke="#444"/>'
    label = "" if sparkline else ('<title>log(1+count) per bin of |f̂|/RMS, 10⁻⁴ … 10³ from the centre out; '
                                  'negative values left, positive right</title>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">{label}'
            f'{"".join(bars)}{axis}</svg>')


def _direction_section(view: DirectionView, basis: str, n_show: int, pages: Mapping[str, str]) -> str:
    f = view.facts
    scale = max([abs(v) for e in view.positive + view.negative for v in e.values if v is not None] or [1.0])
    head = (f'<section id="d{f.index}"><h2>{html.escape(basis)} direction {f.index} '
            f'<span class="muted">(rank {f.rank + 1})</span></h2>'
            f'<p>{f.importance_name} = {_fmt(f.importance)} · RMS = {_fmt(f.rms)} · mean = {_mean(f.mean, f.rms)} · '
            f'density above +RMS {_pct(f.density_positive)}, below −RMS {_pct(f.density_negative)} '
            f'(of {f.n:,} tokens)' + ("" if f.module is None else f" · module {f.module}") + "</p>")
    hist = histogram_svg(view.hist_positive, view.hist_negative)

    def examples(title: str, items: list[Example]) -> str:
        if not items:
            return f"<h3>{title}</h3><p class='muted'>none in the data</p>"
        shown = "".join(context_html(e, scale) for e in items[:n_show])
        more = "".join(context_html(e, scale) for e in items[n_show:])
        extra = f"<details><summary>{len(items) - n_show} more</summary>{more}</details>" if more else ""
        return f"<h3>{title}</h3>{shown}{extra}"

    logits = ""
    if f.logits_top:
        rows = "".join(f"<tr><td>{_show(a.token)}</td><td class='num'>{_fmt(a.value)}</td>"
                       f"<td>{_show(b.token)}</td><td class='num'>{_fmt(b.value)}</td></tr>"
                       for a, b in zip(f.logits_top, f.logits_bottom))
        logits = ("<h3>Direct logit effect</h3><table><tr><th>raises</th><th></th><th>lowers</th><th></th></tr>"
                  f"{rows}</table>")
    edges = ""
    if f.in_edges or f.out_edges:
        def edge_list(items: list, label: str) -> str:
            cells = []
            for e in items:
                target = "rest" if e.index is None else f"{e.hook} #{e.index}"
                link = (target if e.index is None or e.hook not in pages else
                        f'<a href="{pages[e.hook]}#d{e.index}">{html.escape(target)}</a>')
                cells.append(f"<li>{link}: E = {_fmt(e.E)} ({_pct(e.share)})</li>")
            return f"<h3>{label}</h3><ul>{''.join(cells)}</ul>" if cells else ""
        edges = edge_list(f.in_edges, "Strongest edges in") + edge_list(f.out_edges, "Strongest edges out")
    return (head + f'<div>{hist}</div><div class="cols"><div>{examples("Largest positive", view.positive)}</div>'
            f'<div>{examples("Most negative", view.negative)}</div></div>'
            f'<div class="cols"><div>{logits}</div><div>{edges}</div></div></section>')


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def write_pages(folder: str | Path, views: Mapping[str, Mapping[str, list[DirectionView]]], meta: Mapping[str, Any],
                n_show: int = 10) -> list[Path]:
    """Write ``index.html`` and one page per hook and basis into ``folder``; return the paths written.

    ``views[hook][basis]``: the directions in order of importance. ``meta``: ``title``, ``notes`` (a list of
    HTML-safe sentences) and ``report`` (a relative link back to report.html, optional)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hooks = list(views)
    written = []
    bases = list(dict.fromkeys(b for per in views.values() for b in per))
    for basis in bases:
        pages = {h: page_name(h, basis) for h in hooks if basis in views[h]}
        for i, hook in enumerate(hooks):
            if basis not in views[hook]:
                continue
            nav = ['<a href="index.html">index</a>']
            nav += [f'<a href="{page_name(hook, other)}">{html.escape(other)}</a>' for other in views[hook]
                    if other != basis]
            if i > 0:
                nav.append(f'<a href="{page_name(hooks[i - 1], basis)}">← {html.escape(hooks[i - 1])}</a>')
            if i + 1 < len(hooks):
                nav.append(f'<a href="{page_name(hooks[i + 1], basis)}">{html.escape(hooks[i + 1])} →</a>')
            sections = "".join(_direction_section(v, basis, n_show, pages) for v in views[hook][basis])
            body = (f"<nav>{''.join(nav)}</nav><h1>{html.escape(hook)} — {html.escape(basis)} basis</h1>"
                    f"{sections}")
            path = folder / pages[hook]
            path.write_text(_page(f"{hook} · {basis}", body), encoding="utf-8")
            written.append(path)
    written.insert(0, _write_index(folder, views, meta, bases))
    return written


def _write_index(folder: Path, views: Mapping[str, Mapping[str, list[DirectionView]]], meta: Mapping[str, Any],
                 bases: list[str]) -> Path:
    notes = "".join(f"<p class='note'>{n}</p>" for n in meta.get("notes", []))
    back = f'<nav><a href="{meta["report"]}">report</a></nav>' if meta.get("report") else ""
    blocks = []
    for hook, per in views.items():
        columns = []
        for basis in bases:
            if basis not in per:
                columns.append("<div></div>")
                continue
            rows = []
            for v in per[basis]:
                f = v.facts
                best = v.positive[0].tokens[v.positive[0].center] if v.positive else ""
                rows.append(f'<tr><td class="num">{f.rank + 1}</td><td><a href="{page_name(hook, basis)}#d{f.index}">'
                            f'#{f.index}</a></td><td class="num">{_fmt(f.importance)}</td>'
                            f'<td>{histogram_svg(v.hist_positive, v.hist_negative, 120, 18, sparkline=True)}</td>'
                            f'<td class="num">{_pct(f.density_positive)}</td><td class="num">{_pct(f.density_negative)}'
                            f'</td><td>{_show(best)}</td></tr>')
            name = per[basis][0].facts.importance_name if per[basis] else ""
            columns.append(f'<div><h3><a href="{page_name(hook, basis)}">{html.escape(basis)}</a></h3><table>'
                           f'<tr><th>rank</th><th>dir</th><th>{name}</th><th>histogram</th><th>&gt;+RMS</th>'
                           f'<th>&lt;−RMS</th><th>top token</th></tr>{"".join(rows)}</table></div>')
        blocks.append(f"<h2>{html.escape(hook)}</h2><div class='cols'>{''.join(columns)}</div>")
    body = f"{back}<h1>{html.escape(meta.get('title', 'Directions'))}</h1>{notes}{''.join(blocks)}"
    path = folder / "index.html"
    path.write_text(_page(meta.get("title", "Directions"), body), encoding="utf-8")
    return path
