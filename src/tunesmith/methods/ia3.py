"""IA3 through peft: learned rescaling of keys, values and feed-forward activations."""

from __future__ import annotations

from torch import nn

from ..config import MethodConfig
from .base import Method, MethodContext

class IA3(Method):
    """Learned rescaling vectors."""

    name = "ia3"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("ia3: being implemented")
