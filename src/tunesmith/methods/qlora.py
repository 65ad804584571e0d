"""QLoRA: LoRA on a 4-bit or 8-bit quantized base (bitsandbytes)."""

from __future__ import annotations

from torch import nn

from ..config import MethodConfig
from .base import Method, MethodContext

class QLora(Method):
    """LoRA on a k-bit base."""

    name = "qlora"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("qlora: being implemented")
