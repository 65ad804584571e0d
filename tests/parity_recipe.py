"""The verified TRL parity recipe shared by the DPO, reward, KTO, ORPO and SimPO parity tests.

../shared/reference/alignment.md: a tiny saved Llama with tunesmith's fallback chat template
(both tools render the same conversations), 16 conversational rows in order, batch 4, 6 steps,
lr 1e-3 linear to 0, AdamW without weight decay, clipping at 1.0, fp32, full fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_llama, build_tokenizer

STEPS = 6
# The TRL side: every *Config of TRL 1.16 accepts these (TrainingArguments + max_length).
TRL_ARGS = dict(per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3, lr_scheduler_type="linear",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True, bf16=False,
                gradient_checkpointing=False, train_sampling_strategy="sequential", seed=0, report_to=[],
                logging_steps=1, save_strategy="no", max_length=64)


def save_tiny_llama(folder: Path, seed: int = 3, template: str | None = None):
    """Tokenizer (with `template`, tunesmith's fallback chat template by default) and a tiny Llama
    saved in `folder`; returns the model."""
    from tunesmith.data.templates import FALLBACK_CHAT_TEMPLATE

    tok = build_tokenizer(folder)
    tok.chat_template = template or FALLBACK_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return build_llama(folder, len(tok), seed=seed)


def run_tunesmith(folder: Path, data: Path, out: Path, objective: dict) -> list[dict]:
    """tunesmith under the recipe's settings; the per-step metric records."""
    import tunesmith

    cfg = {"model": {"name_or_path": str(folder)},
           "data": {"train": str(data), "max_length": 64, "shuffle": False},
           "method": {"type": "full"},
           "objective": objective,
           "training": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-3, "scheduler": "linear",
                        "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": "fp32", "progress": False,
                        "log_every": 1, "seed": 0},
           "eval": {"forgetting": False, "at_end": False},
           "output": {"dir": str(out), "save_model": False, "model_card": False}}
    result = tunesmith.train(cfg, echo=lambda m: None)
    lines = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]
