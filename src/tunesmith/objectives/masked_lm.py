"""Masked-LM domain adaptation for encoders: dynamic 80/10/10 masking."""

from __future__ import annotations

from .base import Objective

class MaskedLM(Objective):
    """Predict masked tokens."""

    name = "masked_lm"
    auto_class = "AutoModelForMaskedLM"
    peft_task_type = None

    def encode(self, tokenizer, record, data, task):
        raise NotImplementedError("masked_lm: being implemented")

    def collator(self, tokenizer, cfg, task, *, train):
        raise NotImplementedError("masked_lm: being implemented")

    def loss(self, model, batch):
        raise NotImplementedError("masked_lm: being implemented")
