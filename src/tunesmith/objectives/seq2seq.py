"""Sequence-to-sequence (T5 family): input text in, target text out, loss on targets."""

from __future__ import annotations

from .base import Objective

class Seq2Seq(Objective):
    """Loss on target tokens."""

    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"

    def encode(self, tokenizer, record, data, task):
        raise NotImplementedError("seq2seq: being implemented")

    def collator(self, tokenizer, cfg, task, *, train):
        raise NotImplementedError("seq2seq: being implemented")

    def loss(self, model, batch):
        raise NotImplementedError("seq2seq: being implemented")
