from __future__ import annotations

from torch import nn

from ..method_config import MethodSection
from .base import Method, MethodContext


class Full(Method):
    """Every weight learns."""

    name = "full"
    frozen_base = False

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
