"""PPO with a reward model on the arithmetic task of grpo_arithmetic.py: the classic RLHF pipeline in tunesmith.

1. Reward model: `tunesmith train` with objective `reward` (SmolLM2-135M-Instruct + LoRA r 16) on pairs
   of answers to the training problems, the correct answer chosen and a wrong one rejected (three
   answer styles: "The answer is N.", "<name> has N <things> now." or "That makes N.", "N"); its pair accuracy is
   measured on pairs built the same way from the held-out problems.
2. PPO: the same base + LoRA, objective `ppo` with that reward model, a per-token KL penalty to the
   base (k1, kl_coef 0.05), missing-EOS penalty -1, 2 completions per prompt, 16 completions per
   rollout, 2 PPO epochs x 2 minibatches, for --minutes of wall-clock time. `correctness` is logged
   with weight 0 (it does not reach the reward): how often the sampled answers are really right.
3. Held-out exact match (one greedy answer, last number) of the base and of the PPO policy.

Reported: reward-model pair accuracy, the reward model's mean score and the true correctness of the
sampled answers over the first and last rollouts, KL to the base, held-out exact match before/after.

Usage:  python benchmarks/ppo_arithmetic.py [--minutes 15] [--rm-epochs 1]
The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_arithmetic import SMOLLM2, score, write_splits  # noqa: E402

LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def answers(prompt: str, n: int) -> list[str]:
    """The three answer styles for the number n."""
    found = re.match(r"(\w+) has \d+ (\w+)\.", prompt)
    middle = f"{found.group(1)} has {n} {found.group(2)} now." if found else f"That makes {n}."
    return [f"The answer is {n}.", middle, str(n)]


def preference_pairs(problems: Path, out: Path, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for line in problems.read_text().splitlines():
        p = json.loads(line)
        right = int(p["answer"])
        wrong = right + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        wrong = wrong if wrong > 0 else right + 1
        style = rng.randrange(3)
        rows.append({"prompt": p["prompt"], "chosen": answers(p["prompt"], right)[style],
                     "rejected": answers(p["prompt"], wrong)[style]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def train_reward_model(train: Path, heldout: Path, work: Path, epochs: float) -> dict:
    import tunesmith

    cfg = {"model": {"name_or_path": SMOLLM2},
           "data": {"train": str(train), "max_length": 256, "split": {"validation_file": str(heldout)}},
           "method": LORA, "objective": {"type": "reward"},
           "training": {"epochs": epochs, "batch_size": 8, "learning_rate": 2e-4, "seed": 42, "progress": False,
                        "log_every": 5},
           "eval": {"at_end": True, "forgetting": False},
           "output": {"dir": str(work / "rm"), "overwrite": True, "model_card": False}}
    result = tunesmith.train(cfg, echo=lambda m: print("  [rm]", m, file=sys.stderr, flush=True))
    return {"run_dir": str(result.run_dir), "steps": result.steps,
            "eval_accuracy": result.metrics.get("eval_accuracy"), "eval_margin": result.metrics.get("eval_margin")}


def train_ppo(prompts: Path, reward_model: str, work: Path, minutes: float, lr: float) -> dict:
    import tunesmith

    cfg = {"model": {"name_or_path": SMOLLM2},
           "data": {"train": str(prompts), "max_length": 256, "split": {"validation_ratio": 0.0}},
           "method": LORA,
           "objective": {"type": "ppo", "reward_model": reward_model, "max_completion_length": 48,
                         "num_generations": 2, "ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.05,
                         "missing_eos_penalty": -1.0,
                         "rewards": [{"function": "correctness", "weight": 0.0, "args": {"extract": "last_number"}}]},
           "training": {"epochs": 50, "max_minutes": minutes, "batch_size": 4, "grad_accum": 2, "learning_rate": lr,
                        "scheduler": "constant", "seed": 42, "log_every": 1, "progress": False},
           "eval": {"at_end": False, "forgetting": False},
           "output": {"dir": str(work / "ppo"), "overwrite": True, "model_card": False}}
    result = tunesmith.train(cfg, echo=lambda m: print("  [ppo]", m, file=sys.stderr, flush=True))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in records if "objective/scores" in r]
    return {"run_dir": str(result.run_dir), "steps": result.steps, "rollouts": len(rollouts),
            "train_minutes": result.throughput["train_runtime_s"] / 60,
            "scores": [r["objective/scores"] for r in rollouts],
            "kl": [r["objective/kl"] for r in rollouts],
            "correct": [r["rewards/correctness/mean"] for r in rollouts],
            "lengths": [r["completions/mean_length"] for r in rollouts]}


def child(args) -> None:
    work = Path(args.work)
    if args.child == "rm":
        out = train_reward_model(Path(args.data), Path(args.heldout_file), work, args.rm_epochs)
    elif args.child == "ppo":
        out = train_ppo(Path(args.data), args.model, work, args.minutes, args.lr)
    else:
        out = score(args.model, Path(args.heldout_file), 48, work / f"eval-{Path(args.model).name}")
    print("RESULT " + json.dumps(out))


def run_child(kind: str, args, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(args.work), "--minutes", str(args.minutes),
           "--rm-epochs", str(args.rm_epochs), "--lr", str(args.lr)]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    print(f"running {kind} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{kind} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the PPO run")
    ap.add_argument("--rm-epochs", dest="rm_epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-5, help="PPO learning rate (LoRA)")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--base", type=float, help="the base model's held-out exact match, if already measured")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--heldout-file", dest="heldout_file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="tunesmith-ppo-arith-"))
    args.work.mkdir(parents=True, exist_ok=True)
    train, heldout, _ = write_splits(args.work, [1], args.train, args.heldout)
    pairs = preference_pairs(train, args.work / "pairs_train.jsonl", seed=1)
    pairs_heldout = preference_pairs(heldout, args.work / "pairs_heldout.jsonl", seed=2)
    report = {"train": args.train, "heldout": args.heldout, "minutes": args.minutes}
    report["reward_model"] = run_child("rm", args, data=str(pairs), **{"heldout-file": str(pairs_heldout)})
    print(f"reward model: held-out pair accuracy {report['reward_model']['eval_accuracy']}", flush=True)
    report["ppo"] = run_child("ppo", args, data=str(train), model=report["reward_model"]["run_dir"])
    report["base_exact_match"] = args.base if args.base is not None else run_child(
        "score", args, model=SMOLLM2, **{"heldout-file": str(heldout)})["exact_match"]
    report["ppo_exact_match"] = run_child("score", args, model=report["ppo"]["run_dir"],
                                          **{"heldout-file": str(heldout)})["exact_match"]
    ppo = report["ppo"]
    k = max(1, min(5, len(ppo["scores"]) // 4))
    print(f"\nreward model pair accuracy (held-out) {report['reward_model']['eval_accuracy']:.3f}")
    print(f"PPO: {ppo['rollouts']} rollouts, {ppo['steps']} steps, {ppo['train_minutes']:.1f} min")
    print(f"{'':24} {'first ' + str(k):>9} {'last ' + str(k):>9}")
    for name, key in (("reward-model score", "scores"), ("KL to base", "kl"), ("sampled correct", "correct"),
                      ("completion length", "lengths")):
        print(f"{name:24} {mean(ppo[key][:k]):9.3f} {mean(ppo[key][-k:]):9.3f}")
    print(f"held-out exact match: base {report['base_exact_match']:.3f}, PPO {report['ppo_exact_match']:.3f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
