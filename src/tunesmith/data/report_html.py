"""The HTML form of `tunesmith data inspect`: summary, quality table and Plotly charts (length
histogram, label bar chart, language shares) in one self-contained file that opens offline."""

from __future__ import annotations

import html
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text_atomic


def write_html(path: Path, report: dict, records: list[dict]) -> None:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise ConfigError("--html: the charts need plotly: pip install 'tunesmith[data]'") from None
    from .quality import parts

    figures = []
    lengths = [len(p) + len(a) for p, a in (parts(r) for r in records)]
    figures.append(go.Figure(go.Histogram(x=lengths, nbinsx=60), layout={
        "title": "characters per example", "xaxis_title": "characters", "yaxis_title": "rows"}))
    tokens = report.get("tokens")
    if report.get("labels"):
        names = list(report["labels"])
        kind = "tags" if report["format"] == "tokens" else "labels"
        figures.append(go.Figure(go.Bar(x=names, y=[report["labels"][n]["count"] for n in names]),
                                 layout={"title": f"{kind}: rows per class", "yaxis_title": "rows"}))
    languages = (report.get("quality") or {}).get("languages")
    if languages:
        shares = languages["shares"]
        figures.append(go.Figure(go.Bar(x=list(shares), y=[100 * v for v in shares.values()]), layout={
            "title": f"languages ({languages['sampled']} sampled rows, py3langid)", "yaxis_title": "% of rows"}))
    body = [f"<h1>Dataset report: {html.escape(report['source'])}</h1>", _summary(report, tokens),
            _quality(report.get("quality") or {})]
    body += [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    write_text_atomic(path, "<!doctype html><html><head><meta charset='utf-8'><title>tunesmith data report</title>"
                            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px;"
                            "text-align:left}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    return f"<table>{head}{cells}</table>"


def _summary(report: dict, tokens: dict | None) -> str:
    rows = [("format", report["format"]), ("rows", report["rows"]), ("valid", report["valid"]),
            ("invalid", report["invalid"])]
    if tokens:
        rows.append(("tokens p50 / p95 / max", f"{tokens['p50']:.0f} / {tokens['p95']:.0f} / {tokens['max']}"))
    fields = [(n, s["non_empty"], s["empty"], f"{s['mean_chars']:.1f}", s["max_chars"])
              for n, s in report["fields"].items()]
    return ("<h2>Summary</h2>" + _table(rows) + "<h2>Fields</h2>"
            + _table(fields, ("column", "non-empty", "empty", "mean chars", "max chars")))


def _quality(q: dict) -> str:
    if not q:
        return ""
    rows = [(name, f["count"], f"{f['count'] / max(q['checked'], 1):.1%}", ", ".join(f["examples"]), f["note"])
            for name, f in q["flags"].items()]
    title = "<h2>Quality" + (f" (against {html.escape(str(q['against']))})" if q.get("against") else "") + "</h2>"
    return title + _table(rows, ("check", "rows", "share", "examples", "note"))
