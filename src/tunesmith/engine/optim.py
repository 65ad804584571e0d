"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainingConfig


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    from ..methods.base import task_heads

    head = ({id(p) for _, m in task_heads(model) for p in m.parameters()}
            if cfg.head_learning_rate is not None else set())
    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    for p in model.parameters():
        if p.requires_grad:
            # Biases and norm scales are not regularised (standard AdamW practice).
            if id(p) in head:
                (head_decay if p.ndim >= 2 else head_no_decay).append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
    if not (decay or no_decay or head_decay or head_no_decay):
        raise ValueError("no trainable parameters: the method froze everything")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    for params, wd in ((head_decay, cfg.weight_decay), (head_no_decay, 0.0)):
        if params:
            groups.append({"params": params, "weight_decay": wd, "lr": cfg.head_learning_rate})
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
