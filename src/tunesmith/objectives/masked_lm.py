"""Masked-LM domain adaptation for encoders (BERT/RoBERTa family): dynamic 80/10/10 masking.

Each time a training batch is collated, `objective.mlm_probability` of its tokens are picked
(special tokens and padding never); of those, 80% become the mask token, 10% a random token
and 10% stay as they are, and the loss is the cross-entropy of predicting the original token
at every picked position. Training masks come from torch's global RNG, which the engine
checkpoints, so a resumed run draws the same masks; evaluation masks are drawn from a
generator seeded by the batch's content, so every evaluation scores the same masked tokens.

Documents longer than data.max_length are truncated (data.truncation), not split into
several windows: one record is one row. Split long documents into paragraphs beforehand to
learn from all of their text.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import DataConfig, ObjectiveConfig
from ..errors import ConfigError
from ..data.templates import IGNORE
from .base import LossOutput, Objective, StepContext, TaskInfo
from .truncation import tokenize_truncated

# Share of the picked tokens replaced by the mask token / by a random token (BERT's recipe).
MASK_REPLACE = 0.8
RANDOM_REPLACE = 0.1


def require_mask_token(tokenizer) -> None:
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        raise ConfigError(
            "objective 'masked_lm' needs a tokenizer with a mask token (BERT's [MASK], RoBERTa's <mask>); "
            f"this tokenizer ({type(tokenizer).__name__}) has none — use an encoder model, or "
            "objective.type causal_lm for decoder models"
        )


class _SeededMasking:
    """The masking collator with a generator re-seeded from each batch's token ids.

    The same rows always get the same mask, so eval loss compares across evaluations.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seed = 0
        for r in rows:
            seed = zlib.crc32(torch.tensor(r["input_ids"], dtype=torch.int64).numpy().tobytes(), seed)
        self.inner.generator = torch.Generator().manual_seed(seed)
        return self.inner(rows)


class MaskedLM(Objective):
    """Predict masked tokens; eval perplexity is the pseudo-perplexity exp(mean NLL) over the
    masked positions of the validation set (not comparable to a causal LM's perplexity)."""

    name = "masked_lm"
    auto_class = "AutoModelForMaskedLM"
    peft_task_type = None  # peft has no masked-LM task type; adapters wrap the plain model
    formats = ("text",)
    reports_perplexity = True

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        require_mask_token(tokenizer)
        enc, truncated = tokenize_truncated(tokenizer, data, record["text"], return_special_tokens_mask=True)
        if enc is None:
            return None, False
        row = {"input_ids": enc["input_ids"], "special_tokens_mask": enc["special_tokens_mask"]}
        if sum(1 for s in row["special_tokens_mask"] if not s) == 0:
            return None, truncated  # nothing that could be masked
        return row, truncated

    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool) -> Callable:
        from transformers import DataCollatorForLanguageModeling

        require_mask_token(tokenizer)
        inner = DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=cfg.mlm_probability,
            mask_replace_prob=MASK_REPLACE, random_replace_prob=RANDOM_REPLACE,
        )
        return inner if train else _SeededMasking(inner)

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        model = ctx.policy
        labels = batch["labels"]
        mask = labels != IGNORE
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        loss_sum = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
        return LossOutput(loss_sum, int(mask.sum()))
