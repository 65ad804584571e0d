"""Next-token prediction: instruction SFT (loss on answers) and continued pretraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig, ObjectiveConfig
from ..data.collate import Collator
from ..data.templates import IGNORE, encode_record, truncate
from .base import LossOutput, Objective, TaskInfo

# Configs whose logits are post-processed in forward(); they take the plain forward path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _head_and_backbone(model: nn.Module):
    """(backbone, lm_head) when the LM head can be applied to selected positions only."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None  # DDP must see forward() to synchronise gradients
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(lm, "config", None)
    if cfg is None or any(getattr(cfg, k, None) for k in _LOGIT_TRANSFORMS):
        return None
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is lm:
        return None
    return backbone, head


def _peft_type(model: nn.Module):
    cfg = getattr(model, "active_peft_config", None)
    return getattr(getattr(cfg, "peft_type", None), "value", None)


class CausalLM(Objective):
    """Loss over labelled tokens only.

    The LM head runs on the positions that carry a label, not on the whole sequence: with a
    49k vocabulary and answers that are a fraction of each row, this skips most of the
    largest matmul and most of the logits memory.
    """

    name = "causal_lm"
    packs = True
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

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        n = int(mask.sum())
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        # Prompt-style peft methods rewrite the inputs inside forward(); they need that path.
        parts = _head_and_backbone(model) if _peft_type(model) in (None, "LORA") else None
        if parts is not None:
            backbone, head = parts
            hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
            logits = head(hidden[mask])
        else:
            logits = model(**inputs, use_cache=False).logits
            # Prompt tuning / p-tuning prepend virtual tokens to the logits; keep the real ones.
            logits = logits[:, -batch["input_ids"].shape[1]:][:, :-1][mask]
        loss_sum = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
        return LossOutput(loss_sum, n)


class SFT(CausalLM):
    """Instruction tuning: the data pipeline masks prompts, the loss is the same."""

    name = "sft"
