"""The model card: Hub YAML front matter, then what was trained, how, and how well."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .config import RunConfig

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_datasets(cfg: RunConfig) -> list[str]:
    train = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    return [d for d in train if _HUB_ID.match(d) and not Path(d).exists()]


def render_card(cfg: RunConfig, *, artifact: str, metrics: dict, trainable: int, total: int,
                data_stats: dict, steps: int) -> str:
    base = cfg.output.card_base_model or cfg.model.name_or_path
    front = {
        "base_model": base,
        "library_name": "peft" if artifact == "adapter" else "transformers",
        "license": cfg.output.license,
        "pipeline_tag": "text-generation",
        "tags": ["tunesmith", cfg.method.type, cfg.objective.type],
    }
    datasets = _hub_datasets(cfg)
    if datasets:
        front["datasets"] = datasets
    t = cfg.training
    hyper = {
        "method": cfg.method.type,
        **({"lora_r": cfg.method.r, "lora_alpha": cfg.method.alpha, "lora_dropout": cfg.method.dropout,
            "target_modules": cfg.method.target_modules} if cfg.method.type == "lora" else {}),
        "objective": cfg.objective.type,
        "learning_rate": t.learning_rate,
        "scheduler": t.scheduler,
        "epochs": t.epochs,
        "optimizer_steps": steps,
        "batch_size": t.batch_size,
        "gradient_accumulation": t.grad_accum,
        "effective_batch_size": t.batch_size * t.grad_accum,
        "max_length": cfg.data.max_length,
        "packing": cfg.packing_enabled,
        "precision": t.precision,
        "seed": t.seed,
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {cfg.run_name}", "",
             f"Fine-tuned from `{base}` with [tunesmith](https://github.com/tunesmith) "
             f"({cfg.method.type}, {cfg.objective.type}).", "",
             f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%).", "",
             "## Usage", "", "```python"]
    if artifact == "adapter":
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained('path/to/this/folder')"]
    else:
        lines += ["from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained('path/to/this/folder')"]
    lines += ["```", "", "## Training data", ""]
    for k, v in data_stats.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Hyperparameters", "", "| name | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"
