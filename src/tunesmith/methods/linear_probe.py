"""Linear probing: frozen backbone, features computed once and cached, a trained head."""

from __future__ import annotations

from torch import nn

from ..config import MethodConfig
from .base import Method, MethodContext

class LinearProbe(Method):
    """A head on frozen features."""

    name = "linear_probe"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("linear_probe: being implemented")
