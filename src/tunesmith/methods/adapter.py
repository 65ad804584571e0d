"""Bottleneck adapters (Houlsby, Pfeiffer): tunesmith's own, peft has none."""

from __future__ import annotations

from torch import nn

from ..config import MethodConfig
from .base import Method, MethodContext

class BottleneckAdapter(Method):
    """Bottleneck adapters."""

    name = "adapter"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("adapter: being implemented")
