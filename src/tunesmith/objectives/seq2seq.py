"""Sequence-to-sequence (T5 family): input text in, target text out, loss on targets.

A conversation record becomes one (input, target) pair: the target is the last assistant
turn, the input every turn before it joined as plain text — T5-style models have no chat
template, and evaluation by generation renders prompts the same way (evaluation.generate),
so the model is asked at evaluation exactly what it learned to answer.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import DataConfig, ObjectiveConfig
from ..data.templates import IGNORE
from ..evaluation.generate import render_prompt
from .base import LossOutput, Objective, StepContext, TaskInfo
from .truncation import tokenize_truncated


def split_conversation(messages: list[dict]) -> tuple[str, str]:
    """(input text, target text): everything before the last assistant turn, and that turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render_prompt(None, messages[:last], chat_template=False), messages[last]["content"]


class Seq2SeqCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest_in = max(len(r["input_ids"]) for r in rows)
        longest_out = max(len(r["labels"]) for r in rows)
        ids, attention, labels = [], [], []
        for r in rows:
            pad = longest_in - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_token_id] * pad)
            attention.append([1] * len(r["input_ids"]) + [0] * pad)
            labels.append(r["labels"] + [IGNORE] * (longest_out - len(r["labels"])))
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention),
                "labels": torch.tensor(labels)}


class Seq2Seq(Objective):
    """Cross-entropy over the target tokens (including the end-of-sequence token, so the
    model learns to stop); the model shifts the labels into its decoder inputs itself."""

    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    formats = ("prompt_completion", "alpaca", "chat", "sharegpt")
    generative = True
    reports_perplexity = True

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        source, target = split_conversation(record["messages"])
        enc, truncated = tokenize_truncated(tokenizer, data, source)
        if enc is None:
            return None, False
        # The target is always cut on the right: its end is what the model must learn to produce.
        full = tokenizer(text_target=target)["input_ids"]
        limit = task.extra.get("max_target_length", len(full))
        labels = tokenizer(text_target=target, truncation=True, max_length=limit)["input_ids"]
        if not labels:
            return None, False
        return {"input_ids": enc["input_ids"], "labels": labels}, truncated or len(labels) < len(full)

    def prepare(self, records: list[dict], cfg: ObjectiveConfig) -> TaskInfo:
        # encode() sees the data config only, so the target length travels in the task.
        return TaskInfo(extra={"max_target_length": cfg.max_target_length})

    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool) -> Callable:
        return Seq2SeqCollator(tokenizer.pad_token_id)

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        model = ctx.policy
        labels = batch["labels"]
        mask = labels != IGNORE
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        loss_sum = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
        return LossOutput(loss_sum, int(mask.sum()))
