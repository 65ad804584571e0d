"""Next-token prediction: instruction SFT (loss on answers) and continued pretraining."""

from __future__ import annotations

import torch

from ..config import DataConfig, ObjectiveConfig
from ..data.collate import Collator
from ..data.templates import IGNORE, encode_record, truncate
from ..scoring import labelled_nll
from .base import LossOutput, Objective, StepContext, TaskInfo


class CausalLM(Objective):
    """Loss over labelled tokens only.

    The LM head runs on the positions that carry a label, not on the whole sequence: with a
    49k vocabulary and answers that are a fraction of each row, this skips most of the
    largest matmul and most of the logits memory.
    """

    name = "causal_lm"
    formats = ("text", "chat", "sharegpt", "alpaca", "prompt_completion")
    generative = True
    reports_perplexity = True

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        enc = encode_record(tokenizer, record, train_on_prompt=data.train_on_prompt)
        cut = truncate(enc, data.max_length, data.truncation)
        if cut is None or cut.n_loss_tokens == 0:
            return None, False
        return {"input_ids": cut.input_ids, "labels": cut.labels}, cut is not enc

    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool):
        return Collator(tokenizer.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        # labels[0] of a row is never predicted (nothing precedes it), so it is not counted.
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        nll = labelled_nll(ctx.policy, inputs, batch["labels"])
        return LossOutput(nll.sum(), int(nll.numel()))


class SFT(CausalLM):
    """Instruction tuning: the data pipeline masks prompts, the loss is the same."""

    name = "sft"
    # Conversation shapes before plain text: a dataset with instruction/output (or messages) columns and
    # a rendered `text` column too (tatsu-lab/alpaca) is instruction data, read so that prompts are masked.
    # Continued pretraining (causal_lm) keeps text first: there the text column is what it learns.
    formats = ("chat", "sharegpt", "alpaca", "prompt_completion", "text")
