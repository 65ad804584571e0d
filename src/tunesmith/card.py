"""The model card: Hub YAML front matter, then what was trained, how, and how well."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .config import RunConfig

LORA_FAMILY = ("lora", "dora", "rslora", "lora_fa", "qlora")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_datasets(cfg: RunConfig) -> list[str]:
    train = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    return [d for d in train if _HUB_ID.match(d) and not Path(d).exists()]


PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
}


def _usage(cfg: RunConfig, library: str, auto_class: str) -> list[str]:
    if library == "peft":
        import peft

        peft_class = auto_class.replace("AutoModelFor", "AutoPeftModelFor")
        if not hasattr(peft, peft_class):  # peft has no class for every head (masked LM): the generic one
            peft_class = "AutoPeftModel"
        return [f"from peft import {peft_class}", f"model = {peft_class}.from_pretrained('path/to/this/folder')"]
    if library == "transformers":
        return [f"from transformers import {auto_class}", f"model = {auto_class}.from_pretrained('path/to/this/folder')"]
    # tunesmith's own adapters (bottleneck adapters, BitFit biases, probe heads) load through tunesmith.
    return ["from tunesmith.artifacts import load_trained",
            "loaded = load_trained('path/to/this/folder')  # loaded.model, loaded.tokenizer"]


def render_card(cfg: RunConfig, *, artifact: str, metrics: dict, trainable: int, total: int,
                data_stats: dict, steps: int, library: str | None = None,
                forgetting: dict | None = None, processes: int = 1) -> str:
    """The card; `library` is 'peft', 'transformers' or 'tunesmith' (what loads the artifact)."""
    from .objectives import run_objective

    auto_class = run_objective(cfg).auto_class
    library = library or ("peft" if artifact == "adapter" else "transformers")
    base = cfg.output.card_base_model or cfg.model.name_or_path
    front = {
        "base_model": base,
        "library_name": library,
        "license": cfg.output.license,
        "pipeline_tag": PIPELINE_TAGS.get(auto_class, "text-generation"),
        "tags": ["tunesmith", cfg.method.type, cfg.objective.type],
    }
    datasets = _hub_datasets(cfg)
    if datasets:
        front["datasets"] = datasets
    t = cfg.training
    hyper = {
        "method": cfg.method.type,
        **({"lora_r": cfg.method.r, "lora_alpha": cfg.method.alpha, "lora_dropout": cfg.method.dropout,
            "target_modules": cfg.method.target_modules} if cfg.method.type in LORA_FAMILY else {}),
        **{f"method.{k}": v for k, v in cfg.method.model_dump(exclude_defaults=True).items() if k != "type"},
        "objective": cfg.objective.type,
        "learning_rate": t.learning_rate,
        "scheduler": t.scheduler,
        "epochs": t.epochs,
        "optimizer_steps": steps,
        "batch_size": t.batch_size,
        "gradient_accumulation": t.grad_accum,
        **({"processes": processes} if processes > 1 else {}),
        "effective_batch_size": t.batch_size * t.grad_accum * processes,
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
    lines += _usage(cfg, library, auto_class)
    lines += ["```", "", "## Training data", ""]
    for k, v in data_stats.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Hyperparameters", "", "| name | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    if cfg.tasks:
        lines += ["", "## Tasks", "", _task_table(cfg, metrics)]
        lines += ["", "Load one task's model: `tunesmith.load_trained(run_folder, task=\"<name>\")`."]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if forgetting:
        lines += ["", "## Forgetting", "",
                  "Reference sets measured on the base model before training and on this model after "
                  "(positive perplexity deltas mean the model forgot some of what it knew).", "",
                  "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in forgetting.items()]
    return "\n".join(lines) + "\n"


def _task_table(cfg: RunConfig, metrics: dict) -> str:
    """One row per task (objective, data, loss weight, its final eval metrics), and the mean."""
    names = [t.name for t in cfg.tasks] + ["mean"]
    found = {n: {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"eval_{n}/")} for n in names}
    columns = sorted({k for m in found.values() for k in m} - {"tokens"}, key=lambda k: (k != "loss", k))
    head = ["task", "objective", "data", "loss weight", *columns]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    specs = {t.name: t for t in cfg.tasks}
    for n in names:
        if n == "mean" and not found[n]:
            continue
        spec = specs.get(n)
        cells = [n, spec.objective.type if spec else "", str(spec.data.train) if spec else "",
                 f"{spec.loss_weight:g}" if spec else ""]
        cells += [f"{found[n][c]:.4f}" if isinstance(found[n].get(c), float) else str(found[n].get(c, ""))
                  for c in columns]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
