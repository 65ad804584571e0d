"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainingConfig

# Parameter-name parts of multiplicative scales kept out of weight decay (peft's IA3 and DoRA names).
SCALE_NAMES = {"ia3_l", "lora_magnitude_vector"}


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. On CUDA its fused kernel: one launch per step and no
    foreach temporaries the size of the parameters (what full fine-tuning of a large model cannot
    spare); elsewhere torch's default implementation."""
    from ..methods.base import task_heads

    head = ({id(p) for _, m in task_heads(model) for p in m.parameters()}
            if cfg.head_learning_rate is not None else set())
    # (is a head weight, decays) -> params. Biases and scales are not regularised (standard AdamW practice):
    # norm weights and, by name, the learned scales stored as matrices (IA3's vectors, DoRA's magnitudes),
    # which start at 1 and which decay would pull toward 0.
    split: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = any(part in SCALE_NAMES for part in name.split("."))
            split.setdefault((id(p) in head, p.ndim >= 2 and not scale), []).append(p)
    if not split:
        raise ValueError("no trainable parameters: the method froze everything")
    # The body's decayed group comes first even when empty, as in checkpoints saved before heads had a group.
    groups = [{"params": split.get((False, True), []), "weight_decay": cfg.weight_decay}]
    for is_head, decays in ((False, False), (True, True), (True, False)):
        if split.get((is_head, decays)):
            group = {"params": split[is_head, decays], "weight_decay": cfg.weight_decay if decays else 0.0}
            groups.append({**group, "lr": cfg.head_learning_rate} if is_head else group)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas),
                             **({"fused": True} if device_type == "cuda" else {}))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
