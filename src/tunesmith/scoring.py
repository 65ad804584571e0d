"""The numerical core for token log-likelihoods: the LM head on labelled positions only.

With a 49k vocabulary and labels on a fraction of each row, running the LM head on every
position would be the largest matmul of a step and the largest tensor in memory. Training
(the causal-LM objectives) and evaluation (perplexity, forgetting) both score tokens through
`labelled_logits`, so a loss or a perplexity means the same thing wherever it appears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data.templates import IGNORE

# Configs whose logits are post-processed in forward(); they take the plain forward path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Positions scored at once without gradients: bounds the fp32 logits of an evaluation batch.
EVAL_CHUNK = 1024


def head_and_backbone(model: nn.Module):
    """(backbone, lm_head) when the LM head can be applied to selected positions only."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None  # DDP must see forward() to synchronise gradients
    cfg = getattr(model, "active_peft_config", None)
    if getattr(getattr(cfg, "peft_type", None), "value", None) not in (None, "LORA"):
        return None  # prompt-style peft methods rewrite the inputs inside forward()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(lm, "config", None)
    if cfg is None or any(getattr(cfg, k, None) for k in _LOGIT_TRANSFORMS):
        return None
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is lm:
        return None
    return backbone, head


def labelled_logits(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the positions that predict a label, those labels), both flat over the batch.

    labels[:, t] is predicted from position t - 1; IGNORE labels are not scored.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    parts = head_and_backbone(model)
    if parts is not None:
        backbone, head = parts
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
        return head(hidden[mask]), targets[mask]
    logits = model(**inputs, use_cache=False).logits
    # Prompt tuning / p-tuning prepend virtual tokens to the logits; keep the real ones.
    return logits[:, -inputs["input_ids"].shape[1]:][:, :-1][mask], targets[mask]


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32; without gradients, in chunks so fp32 logits stay small."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], EVAL_CHUNK):
        total += F.cross_entropy(logits[start : start + EVAL_CHUNK].float(), targets[start : start + EVAL_CHUNK],
                                 reduction="sum")
    return total
