"""BitFit: only bias terms (and a fresh task head) learn."""

from __future__ import annotations

from torch import nn

from ..config import MethodConfig
from .base import Method, MethodContext

class BitFit(Method):
    """Bias terms only."""

    name = "bitfit"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("bitfit: being implemented")
