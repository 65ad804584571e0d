"""What a method is: it decides which parameters learn and how the result is saved."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from torch import nn

from ..config import MethodConfig


class Method(ABC):
    name: str = ""
    # True when the base weights stay frozen, so they may be loaded in a low-precision dtype.
    frozen_base: bool = True
    # What the final artifact folder holds: "adapter" (peft) or "model" (transformers).
    artifact: str = "model"

    @abstractmethod
    def apply(self, model: nn.Module, cfg: MethodConfig) -> nn.Module:
        """Set requires_grad (or wrap the model) so that exactly the method's weights learn."""

    def save(self, model: nn.Module, out: Path) -> None:
        model.save_pretrained(out)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the longest ModuleList matching num_hidden_layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if (n is None or len(module) == n) and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError("could not find the model's stack of transformer blocks")
    return best
