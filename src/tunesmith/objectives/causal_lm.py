"""Next-token prediction: instruction SFT (loss on answers) and continued pretraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.templates import IGNORE
from .base import LossOutput, Objective

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
            logits = model(**inputs, use_cache=False).logits[:, :-1][mask]
        loss_sum = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
        return LossOutput(loss_sum, n)


class SFT(CausalLM):
    """Instruction tuning: the data pipeline masks prompts, the loss is the same."""

    name = "sft"
