from __future__ import annotations

from torch import nn

from ..config import MethodConfig
from ..errors import ConfigError
from .base import Method


class Lora(Method):
    """Low-rank adapters on the chosen linear layers, through peft."""

    name = "lora"
    artifact = "adapter"  # Method.save on a peft model writes adapter weights + config only

    def peft_config(self, cfg: MethodConfig):
        from peft import LoraConfig

        return LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            task_type="CAUSAL_LM",
        )

    def apply(self, model: nn.Module, cfg: MethodConfig) -> nn.Module:
        from peft import get_peft_model

        # peft keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype).
        try:
            return get_peft_model(model, self.peft_config(cfg))
        except ValueError as exc:
            # Mostly target_modules matching nothing (peft's NoMatchingPeftModuleError is a
            # ValueError): a config mistake, so report it as one instead of a traceback.
            raise ConfigError(f"method (lora, target_modules={cfg.target_modules!r}): {exc}") from exc
