"""The comparison as a terminal table, report.md and a self-contained report.html.

The HTML draws its bar charts as inline SVG: no script, no CDN, so it renders offline and
in any mail client or CI artifact viewer.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Callable

from .metrics import METRICS

if TYPE_CHECKING:
    from .compare import CompareResult


def _metric_of(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    m = METRICS.get(metric)
    if m is not None and m.scale == 1.0:
        return f"{100 * value:.1f}%"
    if metric in ("perplexity", "pair_margin") or m is None:
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    return f"{value:.1f}"


def fmt_delta(metric: str, delta: float | None, pct: float | None) -> str:
    if delta is None:
        return "–"
    m = METRICS.get(metric)
    d = f"{100 * delta:+.1f} pts" if m is not None and m.scale == 1.0 else f"{delta:+.2f}"
    return d + (f" ({pct:+.1f}%)" if pct is not None else "")


def columns(result: CompareResult) -> list[tuple[str, str, Callable[[str], float | None]]]:
    """(header, metric name, model label -> value) for every number in the summary table."""
    cols = []
    for t in result.tasks:
        for name in t.settings.metrics:
            cols.append((f"{t.label} {name}", name,
                         lambda m, t=t.label, n=name: result.metric(m, t, n)))
    ref_keys = sorted({k for r in result.reference.values() for k in r})
    for key in ref_keys:
        cols.append((key, _metric_of(key), lambda m, k=key: result.reference.get(m, {}).get(k)))
    return cols


def forgetting_rows(result: CompareResult) -> list[tuple[str, str, str, float | None, float | None, float | None, float | None]]:
    """(model, reference key, metric, baseline value, value, delta, change %) per model and key."""
    rows = []
    base = result.reference.get(result.baseline, {})
    for label, deltas in result.forgetting.items():
        for key in sorted(result.reference.get(label, {})):
            stem = "forgetting/" + key[len("ref/"):]
            rows.append((label, key, _metric_of(key), base.get(key), result.reference[label][key],
                         deltas.get(f"{stem}_delta"), deltas.get(f"{stem}_change_pct")))
    return rows


def print_table(result: CompareResult, console) -> None:
    from rich.table import Table

    table = Table(title="tunesmith compare" + (f" (baseline: {result.baseline})" if len(result.models) > 1 else ""))
    table.add_column("model")
    cols = columns(result)
    for header, _, _ in cols:
        table.add_column(header, justify="right")
    for m in result.models:
        cached = any(r.cached for r in result.results.get(m.label, {}).values())
        name = m.label + (" (cached)" if cached else "")
        table.add_row(name, *[fmt(metric, get(m.label)) for _, metric, get in cols])
    console.print(table)
    rows = forgetting_rows(result)
    if rows:
        ft = Table(title=f"forgetting vs {result.baseline} (after - before)")
        for c in ("model", "reference", "before", "after", "delta"):
            ft.add_column(c, justify="left" if c in ("model", "reference") else "right")
        for label, key, metric, before, after, delta, pct in rows:
            ft.add_row(label, key, fmt(metric, before), fmt(metric, after), fmt_delta(metric, delta, pct))
        console.print(ft)


def _md_cell(text: str, limit: int = 160, *, keep_end: bool = False) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        # A long generated answer ends with its result (GSM8K's '#### 72'): keep both ends.
        half = (limit - 3) // 2
        text = text[:half] + " … " + text[-half:] if keep_end else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def differing_examples(result: CompareResult, task_label: str) -> list[int]:
    """Indices where the compared models' answers disagree in correctness, then in text."""
    per_model = [result.results.get(m.label, {}).get(task_label) for m in result.models]
    per_model = [r for r in per_model if r is not None and r.examples]
    if len(per_model) < 2:
        # One model: its misses are what a reader wants to see first.
        ex = per_model[0].examples if per_model else []
        return [e["index"] for e in ex if not e["correct"]] + [e["index"] for e in ex if e["correct"]]
    n = min(len(r.examples) for r in per_model)
    by_correct = [i for i in range(n) if len({r.examples[i]["correct"] for r in per_model}) > 1]
    by_text = [i for i in range(n) if i not in by_correct
               and len({r.examples[i]["answer"] for r in per_model}) > 1]
    return by_correct + by_text


def render_markdown(result: CompareResult, *, show_examples: int = 10) -> str:
    names = [m.label for m in result.models]
    lines = ["# tunesmith evaluation report", ""]
    lines += ["| model | source |", "|---|---|"]
    for m in result.models:
        src = m.model + (f" + adapter {m.adapter}" if m.adapter else "")
        note = " (reference sets only)" if m.label in result.reference_only else ""
        lines.append(f"| {m.label}{' (baseline)' if m.label == result.baseline else ''} | `{src}`{note} |")
    lines += ["", "## Tasks", ""]
    for t in result.tasks:
        s = t.settings
        gen = "; greedy" if not s.do_sample else f"; sampling T={s.temperature} top_p={s.top_p}"
        lines.append(f"- **{t.label}**: `{t.source}`, {len(t.records)} examples; metrics {', '.join(s.metrics)}; "
                     f"extract `{s.extract}`, normalize {', '.join(s.normalize) or 'none'}; "
                     f"max_new_tokens {s.max_new_tokens}{gen}")
    lines += ["", "## Results", ""]
    cols = columns(result)
    lines.append("| model | " + " | ".join(h for h, _, _ in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for m in result.models:
        lines.append(f"| {m.label} | " + " | ".join(fmt(metric, get(m.label)) for _, metric, get in cols) + " |")
    rows = forgetting_rows(result)
    if rows:
        lines += ["", f"## Forgetting (reference sets, vs {result.baseline})", "",
                  "A higher reference perplexity (positive delta) or a lower reference task score "
                  "(negative delta) means the model lost some of what it knew.", "",
                  "| model | reference | before | after | delta |", "|---|---|---:|---:|---:|"]
        for label, key, metric, before, after, delta, pct in rows:
            lines.append(f"| {label} | {key} | {fmt(metric, before)} | {fmt(metric, after)} | "
                         f"{fmt_delta(metric, delta, pct)} |")
    for t in result.tasks:
        idx = differing_examples(result, t.label)
        if not idx or show_examples == 0:
            continue
        title = "Where the models differ" if len(names) > 1 else "Examples (misses first)"
        lines += ["", f"## {title}: {t.label}", "",
                  f"{len(idx)} of {len(t.records)} examples {'differ' if len(names) > 1 else 'listed'}; the first {min(show_examples, len(idx))} "
                  "(full outputs in results.json):", "",
                  "| # | prompt | expected | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for i in idx[:show_examples]:
            cells = []
            for m in result.models:
                r = result.results.get(m.label, {}).get(t.label)
                if r is None or i >= len(r.examples):
                    cells.append("–")
                    continue
                ex = r.examples[i]
                mark = "✓" if ex["correct"] else "✗"
                cells.append(f"{mark} `{_md_cell(ex['answer'], 40)}` {_md_cell(ex['prediction'], 160, keep_end=True)}")
            ex0 = next(result.results[m.label][t.label].examples[i] for m in result.models
                       if t.label in result.results.get(m.label, {}))
            lines.append(f"| {i} | {_md_cell(ex0['prompt'], 100)} | `{_md_cell(ex0['expected'], 40)}` | "
                         + " | ".join(cells) + " |")
    cached = result.cache_hits
    lines += ["", f"_{result.evaluated} evaluations computed, {cached} from the cache; "
                  f"{result.seconds:.1f} s._", ""]
    return "\n".join(lines)


_COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def svg_bars(title: str, labels: list[str], values: list[float | None], metric: str) -> str:
    """A horizontal bar chart as inline SVG."""
    width, row, left, top = 560, 26, 170, 28
    height = top + row * len(labels) + 10
    known = [v for v in values if v is not None]
    top_value = max(known + [METRICS[metric].scale if metric in METRICS and METRICS[metric].scale else 0, 1e-9])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="4" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    for i, (label, v) in enumerate(zip(labels, values)):
        y = top + i * row
        w = 0 if v is None else max(1, int((width - left - 80) * v / top_value))
        parts.append(f'<text x="{left - 6}" y="{y + 16}" font-size="12" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 4}" width="{w}" height="{row - 8}" '
                     f'fill="{_COLORS[i % len(_COLORS)]}"/>')
        parts.append(f'<text x="{left + w + 4}" y="{y + 16}" font-size="12">{html.escape(fmt(metric, v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right}.ok{color:#2a7d2a}.bad{color:#b22}
pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:420px}.charts svg{margin:0.5em 1em 0.5em 0}"""


def render_html(result: CompareResult, *, show_examples: int = 10) -> str:
    e = html.escape
    names = [m.label for m in result.models]
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunesmith evaluation report</title>",
           f"<style>{_CSS}</style></head><body><h1>tunesmith evaluation report</h1>",
           "<table><tr><th>model</th><th>source</th></tr>"]
    for m in result.models:
        src = m.model + (f" + adapter {m.adapter}" if m.adapter else "")
        out.append(f"<tr><td>{e(m.label)}{' (baseline)' if m.label == result.baseline else ''}</td>"
                   f"<td><code>{e(src)}</code></td></tr>")
    out.append("</table><h2>Results</h2><table><tr><th>model</th>")
    cols = columns(result)
    out += [f"<th>{e(h)}</th>" for h, _, _ in cols] + ["</tr>"]
    for m in result.models:
        out.append(f"<tr><td>{e(m.label)}</td>" + "".join(
            f"<td class='num'>{e(fmt(metric, get(m.label)))}</td>" for _, metric, get in cols) + "</tr>")
    out.append("</table><div class='charts'>")
    for header, metric, get in cols:
        out.append(svg_bars(header, names, [get(n) for n in names], metric))
    out.append("</div>")
    rows = forgetting_rows(result)
    if rows:
        out.append(f"<h2>Forgetting (vs {e(result.baseline)})</h2><table><tr><th>model</th><th>reference</th>"
                   "<th>before</th><th>after</th><th>delta</th></tr>")
        for label, key, metric, before, after, delta, pct in rows:
            out.append(f"<tr><td>{e(label)}</td><td>{e(key)}</td><td class='num'>{e(fmt(metric, before))}</td>"
                       f"<td class='num'>{e(fmt(metric, after))}</td>"
                       f"<td class='num'>{e(fmt_delta(metric, delta, pct))}</td></tr>")
        out.append("</table>")
    for t in result.tasks:
        idx = differing_examples(result, t.label)
        if not idx or show_examples == 0:
            continue
        out.append(f"<h2>Where the models differ: {e(t.label)}</h2><p>{len(idx)} of {len(t.records)} "
                   f"examples differ; the first {min(show_examples, len(idx))}:</p>"
                   "<table><tr><th>#</th><th>prompt</th><th>expected</th>"
                   + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for i in idx[:show_examples]:
            ex0 = next(result.results[m.label][t.label].examples[i] for m in result.models
                       if t.label in result.results.get(m.label, {}))
            cells = []
            for m in result.models:
                r = result.results.get(m.label, {}).get(t.label)
                if r is None or i >= len(r.examples):
                    cells.append("<td>–</td>")
                    continue
                ex = r.examples[i]
                cls, mark = ("ok", "✓") if ex["correct"] else ("bad", "✗")
                cells.append(f"<td><span class='{cls}'>{mark} {e(ex['answer'])}</span><pre>{e(ex['prediction'])}</pre></td>")
            out.append(f"<tr><td>{i}</td><td><pre>{e(ex0['prompt'])}</pre></td><td>{e(ex0['expected'])}</td>"
                       + "".join(cells) + "</tr>")
        out.append("</table>")
    out.append(f"<p><em>{result.evaluated} evaluations computed, {result.cache_hits} from the cache; "
               f"{result.seconds:.1f} s.</em></p></body></html>")
    return "\n".join(out)
