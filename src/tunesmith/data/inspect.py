"""`tunesmith data inspect`: what a dataset holds, before any training run touches it.

It reads and normalizes rows exactly as training does (same readers, same format detection,
same templates), but skips bad rows and reports them instead of stopping at the first one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import DataError
from .formats import detect_format, normalize_rows
from .sources import columns_of, read_rows

MAX_ERRORS = 5  # enough to see the pattern without flooding the terminal
CONVERSATION_FORMATS = {"chat", "sharegpt"}


def inspect_data(
    source: str,
    *,
    format: str = "auto",
    model: str | None = None,
    max_length: int = 1024,
    columns: dict[str, str] | None = None,
    column_names: list[str] | None = None,
    against: str | None = None,
    write_clean: str | Path | None = None,
    html: str | Path | None = None,
) -> dict[str, Any]:
    """Describe a dataset: format, size, invalid rows, field stats, duplicates, token lengths, and the
    quality checks (near-duplicates, leakage into `against`, outliers, languages, echoed prompts,
    chat structure).

    `model` names a tokenizer source; without it the token statistics are left out.
    `column_names` is the header of a CSV/TSV file that has none. `write_clean` is a folder that
    gets the cleaned rows and a dataset card; `html` a report file with plots.
    """
    from .quality import quality

    mapping = columns or {}
    # Checked before anything is read: an empty folder may take the cleaned copy, nothing else is replaced.
    if write_clean is not None and Path(write_clean).exists() and not (
            Path(write_clean).is_dir() and not any(Path(write_clean).iterdir())):
        raise DataError(f"--write-clean: {write_clean} already exists; name a new folder")
    if html is not None and Path(html).exists():
        raise DataError(f"--html: {html} already exists; name a new file")
    errors: list[str] = []
    rows, unreadable = read_rows(source, skip_invalid=True, errors=errors, column_names=column_names)
    if not rows:
        raise DataError(f"no rows found in {source}" + (f" ({unreadable} unreadable)" if unreadable else ""))
    fmt = detect_format(columns_of(rows), mapping) if format == "auto" else format
    valid: list[int] = []
    records, invalid = normalize_rows(rows, fmt, mapping, skip_invalid=True, errors=errors, kept=valid)
    other = None
    if against is not None:
        # Read as training reads a validation file: same format, invalid rows skipped.
        theirs, _ = read_rows(against, skip_invalid=True, column_names=column_names)
        other, _ = normalize_rows(theirs, fmt, mapping, skip_invalid=True)
        if not other:
            raise DataError(f"--against: no {fmt} rows in {against}")

    report: dict[str, Any] = {
        "source": source,
        "format": fmt,
        "detected": format == "auto",
        "rows": len(rows) + unreadable,
        "valid": len(records),
        "invalid": unreadable + invalid,
        "errors": errors[:MAX_ERRORS],
        "duplicates": len(rows) - len({_key(r.data) for r in rows}),
        "fields": _field_stats([r.data for r in rows]),
        "turns": None,
        "labels": None,
        "tokens": None,
    }
    if fmt in CONVERSATION_FORMATS and records:
        # System prompts are configuration, not dialogue: count only user/assistant turns.
        turns = [sum(m["role"] != "system" for m in r["messages"]) for r in records]
        report["turns"] = {"mean": sum(turns) / len(turns), "min": min(turns), "max": max(turns)}
    if fmt == "text_label" and records:
        report["labels"] = _distribution(str(r["label"]) for r in records)
    elif fmt == "tokens" and records:
        report["labels"] = _distribution(t for r in records for t in r["tags"])
        words = [len(r["tokens"]) for r in records]
        report["words"] = {"mean": sum(words) / len(words), "min": min(words), "max": max(words)}
    if model is not None and records:
        report["tokens"] = _token_stats(records, model, max_length)
    if records:
        report["quality"] = quality(records, [rows[i].where for i in valid],
                                    labels=report["labels"] if fmt == "text_label" else None,
                                    against=other, against_name=against)
    if write_clean is not None and records:
        from .quality import write_clean as clean

        report["clean"] = {"folder": str(write_clean), **clean(Path(write_clean), source, [r.data for r in rows],
                                                              valid, report)}
    if html is not None and records:
        from .report_html import write_html

        write_html(Path(html), report, records)
        report["html"] = str(html)
    return report


def _distribution(labels) -> dict[str, dict[str, float]]:
    """Count and share of each label (or tag), most frequent first: class imbalance at a glance."""
    counts = Counter(labels)
    total = sum(counts.values())
    return {name: {"count": n, "share": n / total} for name, n in counts.most_common()}


def _as_text(record: dict) -> dict:
    """Records that are not text or conversations, as what a model reads: the running text of an encoder's
    rows; for preference data the conversation a length limit applies to (prompt + the longer answer of a
    pair, prompt + completion of an unpaired row, the prompt alone of an online-RL row)."""
    if "tokens" in record:
        return {"text": " ".join(record["tokens"])}
    if "chosen" in record:
        longer = max(record["chosen"], record["rejected"], key=lambda m: sum(len(t["content"]) for t in m))
        return {"messages": record["prompt"] + longer}
    if "completion" in record:
        return {"messages": record["prompt"] + record["completion"]}
    if "prompt" in record:
        return {"messages": record["prompt"]}
    if "label" in record:
        return {"text": record["text"] + (" " + record["text_pair"] if "text_pair" in record else "")}
    return record


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def _is_empty(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True  # NaN is how pandas-written files spell a missing cell
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, (list, dict)) and not value


def _chars(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(_key(value))


def _field_stats(rows: list[dict]) -> dict[str, dict[str, float]]:
    names = list(dict.fromkeys(k for r in rows for k in r))  # first-seen order, like the file
    stats = {}
    for name in names:
        # A row without the column counts as empty: to training it is the same thing.
        present = [r[name] for r in rows if not _is_empty(r.get(name))]
        lengths = [_chars(v) for v in present]
        stats[name] = {
            "non_empty": len(present),
            "empty": len(rows) - len(present),
            "mean_chars": sum(lengths) / len(lengths) if lengths else 0.0,
            "max_chars": max(lengths, default=0),
        }
    return stats


def _token_stats(records: list[dict], model: str, max_length: int) -> dict[str, Any]:
    import numpy as np

    from ..config import ModelConfig
    from ..models import load_tokenizer
    from .templates import encode_record, ensure_chat_template

    try:
        tokenizer = load_tokenizer(ModelConfig(name_or_path=model))
    except OSError as exc:  # transformers' "not a folder or hub id" and friends
        raise DataError(f"could not load a tokenizer from '{model}': {exc}") from None
    fallback = ensure_chat_template(tokenizer)
    encoded = [encode_record(tokenizer, _as_text(r)) for r in records]
    lengths = np.array([len(e.input_ids) for e in encoded])
    loss = np.array([e.n_loss_tokens for e in encoded])
    return {
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "loss_p50": float(np.percentile(loss, 50)),
        "max_length": max_length,
        "over_max_length": int((lengths > max_length).sum()),
        "over_max_length_share": float((lengths > max_length).mean()),
        "no_loss_tokens": int((loss == 0).sum()),
        "fallback_template": fallback,
    }


def render_report(report: dict[str, Any], console) -> None:
    """Print the report as rich tables."""
    from rich.table import Table

    how = "detected" if report["detected"] else "forced"
    summary = Table(title=f"dataset: {report['source']}", show_header=False)
    summary.add_row("format", f"{report['format']} ({how})")
    summary.add_row("rows", str(report["rows"]))
    summary.add_row("valid rows", str(report["valid"]))
    summary.add_row("invalid rows", str(report["invalid"]))
    summary.add_row("exact duplicates", str(report["duplicates"]))
    if report["turns"]:
        t = report["turns"]
        summary.add_row("turns per conversation", f"mean {t['mean']:.1f}, min {t['min']}, max {t['max']}")
    if report.get("words"):
        w = report["words"]
        summary.add_row("words per example", f"mean {w['mean']:.1f}, min {w['min']}, max {w['max']}")
    console.print(summary)

    if report.get("labels"):
        kind = "tags" if report["format"] == "tokens" else "labels"
        table = Table(title=f"{kind} ({len(report['labels'])})")
        for name, justify in (("name", "left"), ("count", "right"), ("share", "right")):
            table.add_column(name, justify=justify)
        for name, s in report["labels"].items():
            table.add_row(name, str(s["count"]), f"{s['share']:.1%}")
        console.print(table)

    if report["errors"]:
        shown = len(report["errors"])
        console.print(f"[bold yellow]first {shown} of {report['invalid']} invalid rows:[/]")
        for message in report["errors"]:
            console.print(f"  {message}", highlight=False, markup=False)

    fields = Table(title="fields")
    for name, justify in (("column", "left"), ("non-empty", "right"), ("empty", "right"),
                          ("mean chars", "right"), ("max chars", "right")):
        fields.add_column(name, justify=justify)
    for name, s in report["fields"].items():
        empty = f"[yellow]{s['empty']}[/]" if s["empty"] else "0"
        fields.add_row(name, str(s["non_empty"]), empty, f"{s['mean_chars']:.1f}", str(s["max_chars"]))
    console.print(fields)

    q = report.get("quality")
    if q:
        table = Table(title="quality" + (f" (against {q['against']})" if q.get("against") else ""))
        for name, justify in (("check", "left"), ("rows", "right"), ("share", "right"), ("examples", "left")):
            table.add_column(name, justify=justify)
        for name, f in q["flags"].items():
            count = f"[yellow]{f['count']}[/]" if f["count"] else "0"
            shown = ", ".join(f["examples"]) + (f"; {f['note']}" if f["note"] and f["count"] else "")
            table.add_row(name, count, f"{f['count'] / max(q['checked'], 1):.1%}", shown)
        if q.get("label_balance"):
            b = q["label_balance"]
            table.add_row("label balance", str(b["classes"]), "", f"largest class / smallest {b['largest_over_smallest']:.1f}x")
        if q.get("languages"):
            langs = ", ".join(f"{k} {v:.0%}" for k, v in list(q["languages"]["shares"].items())[:5])
            table.add_row("languages", str(q["languages"]["sampled"]), "", f"{langs} (py3langid, sampled rows)")
        console.print(table)
        if q.get("missing"):
            console.print(f"[yellow]{q['missing']}[/]")
    if report.get("clean"):
        c = report["clean"]
        console.print(f"cleaned copy: {c['kept']} rows kept in {c['folder']}/data.jsonl (dataset card README.md); "
                      + ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("folder", "kept") and v) + " removed")
    if report.get("html"):
        console.print(f"report: {report['html']}")

    tok = report["tokens"]
    if tok:
        table = Table(title="tokens per example", show_header=False)
        table.add_row("p50 / p95 / max", f"{tok['p50']:.0f} / {tok['p95']:.0f} / {tok['max']}")
        table.add_row("loss tokens p50", f"{tok['loss_p50']:.0f}")
        table.add_row(f"longer than {tok['max_length']} (truncated)",
                      f"{tok['over_max_length']} ({tok['over_max_length_share']:.1%})")
        if tok["no_loss_tokens"]:
            table.add_row("no tokens to learn (dropped)", str(tok["no_loss_tokens"]))
        if tok["fallback_template"]:
            table.add_row("chat template", "none in tokenizer; ChatML fallback used")
        console.print(table)
