"""Classification: one label per sequence, or one BIO tag per word (NER)."""

from __future__ import annotations

from .base import Objective

class SequenceClassification(Objective):
    """One label per text."""

    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def encode(self, tokenizer, record, data, task):
        raise NotImplementedError("classification: being implemented")

    def collator(self, tokenizer, cfg, task, *, train):
        raise NotImplementedError("classification: being implemented")

    def loss(self, model, batch):
        raise NotImplementedError("classification: being implemented")


class TokenClassification(Objective):
    """One tag per word."""

    name = "token_classification"
    auto_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"

    def encode(self, tokenizer, record, data, task):
        raise NotImplementedError("token_classification: being implemented")

    def collator(self, tokenizer, cfg, task, *, train):
        raise NotImplementedError("token_classification: being implemented")

    def loss(self, model, batch):
        raise NotImplementedError("token_classification: being implemented")
