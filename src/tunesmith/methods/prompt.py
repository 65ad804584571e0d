"""The prompt family through peft: prefix tuning, prompt tuning, P-tuning."""

from __future__ import annotations

from torch import nn

from ..config import MethodConfig
from .base import Method, MethodContext

class PrefixTuning(Method):
    """Trainable key/value prefixes in every layer."""

    name = "prefix_tuning"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("prefix_tuning: being implemented")


class PromptTuning(Method):
    """Trainable soft-prompt embeddings."""

    name = "prompt_tuning"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("prompt_tuning: being implemented")


class PTuning(Method):
    """Soft prompts produced by a small prompt encoder."""

    name = "p_tuning"

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError("p_tuning: being implemented")
