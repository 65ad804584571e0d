from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import MethodConfig
from ..errors import ConfigError
from .base import Method, MethodContext


class Lora(Method):
    """Low-rank adapters on the chosen linear layers, through peft."""

    name = "lora"
    artifact = "adapter"  # Method.save on a peft model writes adapter weights + config only

    def peft_config(self, cfg: MethodConfig, ctx: MethodContext):
        from peft import LoraConfig

        return LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            task_type=ctx.objective.peft_task_type,
        )

    def apply(self, model: nn.Module, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        # peft keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype).
        try:
            return get_peft_model(model, self.peft_config(cfg, ctx))
        except ValueError as exc:
            # Mostly target_modules matching nothing (peft's NoMatchingPeftModuleError is a
            # ValueError): a config mistake, so report it as one instead of a traceback.
            raise ConfigError(f"method ({self.name}, target_modules={cfg.target_modules!r}): {exc}") from exc

    def load(self, base: nn.Module, artifact: Path, cfg: MethodConfig, ctx: MethodContext) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(artifact))
