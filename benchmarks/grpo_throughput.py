"""GRPO step time: tunesmith vs TRL GRPOTrainer + peft, same workload, one invocation.

Workload: SmolLM2-135M-Instruct + LoRA (r 16, alpha 32, dropout 0.05, all linear layers), the
arithmetic word problems of grpo_arithmetic.py (one operation, seeded) as chat prompts, 8
completions per prompt of at most 48 new tokens (temperature 1, top_p 1, no top-k), 4 prompts
(32 completions) per optimizer step as 2 micro-batches of 16 completions, one optimizer step per
rollout, loss dapo, beta 0 (no reference), reward = the correctness of the last number, lr 1e-5,
seed 42, --steps optimizer steps. tunesmith runs with precision auto and runs first; TRL runs tuned
for this CPU: gradient checkpointing off (its default turns it on), and bf16 autocast exactly when
tunesmith's auto chose bf16 (on a CPU without fast bf16, e.g. AVX2 only, bf16 is emulated and
several times slower, so TRL runs fp32 there).

Reported per tool: seconds per optimizer step (rollout, rewards and update together), completion
tokens generated per step (sampling differs between the tools, so the lengths are shown beside the
times), and peak RSS. Each tool runs in its own process.

Usage:  python benchmarks/grpo_throughput.py [--steps 6]
The last line is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_arithmetic import SMOLLM2, write_splits  # noqa: E402

HP = {"r": 16, "alpha": 32, "dropout": 0.05, "generations": 8, "max_new_tokens": 48, "prompts_per_micro": 2,
      "accum": 2, "lr": 1e-5, "seed": 42}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_number_correct(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's side of the `correctness` reward with `last_number` extraction."""
    out = []
    for completion, gold in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        out.append(1.0 if numbers and float(numbers[-1]) == float(gold) else 0.0)
    return out


def run_tunesmith(data: Path, work: Path, steps: int) -> dict:
    import tunesmith

    cfg = {
        "model": {"name_or_path": SMOLLM2},
        "data": {"train": str(data), "max_length": 256, "split": {"validation_ratio": 0.0}},
        "method": {"type": "lora", "r": HP["r"], "alpha": HP["alpha"], "dropout": HP["dropout"],
                   "target_modules": "all-linear"},
        "objective": {"type": "grpo", "num_generations": HP["generations"], "max_completion_length": HP["max_new_tokens"],
                      "loss_type": "dapo", "rewards": [{"function": "correctness", "args": {"extract": "last_number"}}]},
        "training": {"max_steps": steps, "batch_size": HP["prompts_per_micro"], "grad_accum": HP["accum"],
                     "learning_rate": HP["lr"], "scheduler": "constant", "seed": HP["seed"], "log_every": 1,
                     "progress": False, "precision": "auto"},
        "eval": {"at_end": False, "forgetting": False},
        "output": {"dir": str(work / "tunesmith"), "overwrite": True, "model_card": False, "save_model": False},
    }
    result = tunesmith.train(cfg, echo=lambda m: print("  [tunesmith]", m, file=sys.stderr))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["completions/mean_length"] for r in records if "completions/mean_length" in r]
    return {"steps": result.steps, "train_runtime_s": result.throughput["train_runtime_s"],
            "completion_tokens_per_step": sum(lengths) / len(lengths) * HP["generations"] * HP["prompts_per_micro"]
            * HP["accum"], "peak_rss_mb": peak_rss_mb(), "reward": sum(r["reward"] for r in records if "reward" in r)
            / max(1, len(lengths)), "settings": f"precision auto = {result.precision}",
            "bf16": result.precision.startswith("bf16")}


def run_trl(data: Path, work: Path, steps: int, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.config import ModelConfig
    from tunesmith.models import materialize

    torch.manual_seed(HP["seed"])
    folder = materialize(ModelConfig(name_or_path=SMOLLM2))
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    micro = HP["prompts_per_micro"] * HP["generations"]
    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=HP["accum"], num_generations=HP["generations"],
        max_completion_length=HP["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", beta=0.0,
        learning_rate=HP["lr"], lr_scheduler_type="constant", seed=HP["seed"], gradient_checkpointing=False,
        bf16=bf16, logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_cfg = LoraConfig(r=HP["r"], lora_alpha=HP["alpha"], lora_dropout=HP["dropout"], target_modules="all-linear",
                          task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, args=args, reward_funcs=[last_number_correct],
                          train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_cfg)
    out = trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    lengths = [h["completions/mean_length"] for h in logs]
    return {"steps": trainer.state.global_step, "train_runtime_s": out.metrics["train_runtime"],
            "completion_tokens_per_step": sum(lengths) / len(lengths) * micro * HP["accum"],
            "peak_rss_mb": peak_rss_mb(), "reward": sum(h["reward"] for h in logs) / max(1, len(logs)),
            "settings": f"bf16={trainer.args.bf16}, gradient_checkpointing={trainer.args.gradient_checkpointing}"}


def worker(args) -> None:
    if args.worker == "tunesmith":
        res = run_tunesmith(Path(args.train), Path(args.work), args.steps)
    else:
        res = run_trl(Path(args.train), Path(args.work), args.steps, args.trl_bf16 == "1")
    res["seconds_per_step"] = res["train_runtime_s"] / res["steps"]
    print("RESULT " + json.dumps(res), flush=True)


def launch(tool: str, common: list[str]) -> dict:
    print(f"running {tool} ...", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", tool, *common], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{tool} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--worker", choices=["tunesmith", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--trl-bf16", dest="trl_bf16", choices=["0", "1"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    work = Path(tempfile.mkdtemp(prefix="tunesmith-grpo-bench-"))
    train, _, _ = write_splits(work, ops=[1], train=400, heldout=0)
    from tunesmith.config import ModelConfig
    from tunesmith.models import materialize

    materialize(ModelConfig(name_or_path=SMOLLM2))  # convert the GGUF once, outside both timings
    common = ["--work", str(work), "--train", str(train), "--steps", str(args.steps)]
    ours = launch("tunesmith", common)
    trl = launch("trl", [*common, "--trl-bf16", "1" if ours["bf16"] else "0"])
    started = time.strftime("%Y-%m-%d")
    print(f"\n{'tool':10} {'s/step':>7} {'completion tok/step':>20} {'peak RSS MB':>12} {'reward':>7}  settings ({started})")
    for name, r in (("tunesmith", ours), ("TRL", trl)):
        print(f"{name:10} {r['seconds_per_step']:7.1f} {r['completion_tokens_per_step']:20.0f} {r['peak_rss_mb']:12.0f} "
              f"{r['reward']:7.3f}  {r['settings']}")
    print(json.dumps({"step_time_ratio": trl["seconds_per_step"] / ours["seconds_per_step"],
                      "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"], "tunesmith": ours, "trl": trl}))


if __name__ == "__main__":
    main()
