"""`tunesmith data inspect` on every file of the shared real datasets, one invocation: the summary
table of docs/data.md (rows, format, every quality flag, languages, leakage of each training file
into its own held-out file).

    python benchmarks/data_quality_shared.py [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# file -> (header for a CSV/TSV without one, column mapping, the held-out file checked for leakage)
FILES = {
    "sst2/train.tsv": (None, None, "sst2/dev.tsv"),
    "sst2/dev.tsv": (None, None, None),
    "sst2/test.tsv": (None, None, None),
    "ag_news/test.csv": (None, {"text": "title", "text_pair": "description"}, None),
    "ag_news/train_subset_10k.tsv": (["text", "label"], None, "ag_news/test_alps.tsv"),
    "ag_news/test_alps.tsv": (["text", "label"], None, None),
    "gsm8k/train.jsonl": (None, {"prompt": "question", "completion": "answer"}, None),
    "ultrafeedback_dpo_sample/train_clean.jsonl": (None, None, "ultrafeedback_dpo_sample/eval_clean.jsonl"),
    "ultrafeedback_dpo_sample/eval_clean.jsonl": (None, None, None),
    "alpaca/alpaca_data_first200.json": (None, None, None),
    # alpaca/seed_tasks.jsonl is Self-Instruct's seed shape (instances nested): `tunesmith data generate` reads it.
}
SHORT = {"exact duplicate": "exact dup", "near duplicate": "near dup", "empty text": "empty",
         "empty answer": "empty answer", "answer repeats the prompt": "echo", "chat structure": "chat structure",
         "length outlier (long)": "long", "length outlier (short)": "short", "leak: exact": "leak exact",
         "leak: near": "leak near"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from tunesmith.data.inspect import inspect_data
    from tunesmith.errors import TunesmithError

    rows = []
    for name, (header, columns, against) in FILES.items():
        path = args.data / name
        if not path.is_file():
            print(f"skip {name}: not found")
            continue
        started = time.perf_counter()
        try:
            r = inspect_data(str(path), column_names=header, columns=columns,
                             against=str(args.data / against) if against else None)
        except TunesmithError as exc:
            rows.append({"file": name, "error": str(exc)})
            print(f"{name}: {exc}")
            continue
        q = r["quality"]
        flags = {}
        for full, f in q["flags"].items():
            key = next((v for k, v in SHORT.items() if full.startswith(k)), full)
            flags[key] = f["count"]
        langs = q.get("languages", {}).get("shares", {})
        rows.append({"file": name, "format": r["format"], "rows": r["rows"], "valid": r["valid"],
                     "flags": flags, "languages": {k: round(v, 3) for k, v in list(langs.items())[:3]},
                     "labels": len(r["labels"]) if r.get("labels") else None,
                     "balance": q.get("label_balance", {}).get("largest_over_smallest"),
                     "against": against, "seconds": round(time.perf_counter() - started, 1)})
        print(f"{name}: {rows[-1]}", flush=True)
    cols = ["exact dup", "near dup", "empty answer", "echo", "chat structure", "long", "short", "leak exact",
            "leak near"]
    print("\n| file | format | rows (valid) | " + " | ".join(cols) + " | languages | labels (largest/smallest) | s |")
    print("|---" * (len(cols) + 6) + "|")
    for row in rows:
        if "error" in row:
            print(f"| {row['file']} | error: {row['error']} |")
            continue
        f = row["flags"]
        cells = [str(f.get(c, "")) if c in f else "—" for c in cols]
        langs = ", ".join(f"{k} {v:.0%}" for k, v in row["languages"].items())
        labels = f"{row['labels']} ({row['balance']:.2f}x)" if row["labels"] else "—"
        print(f"| {row['file']} | {row['format']} | {row['rows']:,} ({row['valid']:,}) | " + " | ".join(cells)
              + f" | {langs} | {labels} | {row['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
