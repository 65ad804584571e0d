"""QLoRA: LoRA on a 4-bit (NF4/FP4) or 8-bit quantized base, through bitsandbytes and peft.

The base is quantized as it loads (transformers' BitsAndBytesConfig); LoRA weights stay in
full precision on top. Reloading quantizes the base the same way again, so a reloaded
adapter sees the very weights it was trained against. bitsandbytes has CPU kernels, so this
runs (slowly) without a GPU too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from torch import nn

from ..method_config import MethodSection
from ..errors import ConfigError
from .base import HEAD_NAMES, MethodContext
from .lora import Lora

# Output layers stay unquantized: task heads learn, and LM heads are often tied to the input
# embeddings; a pooler a checkpoint lacks is created fresh. Naming any skip list replaces transformers' default (which skips only the
# output embedding), so the LM heads must be listed too.
SKIP_MODULES = [*HEAD_NAMES, "lm_head", "cls", "embed_out", "pooler", "pooler.dense"]

_EXTRA = "pip install 'tunesmith[qlora]'"


def _need_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"method.type qlora needs bitsandbytes, which is not installed: {_EXTRA}")


def _device_map() -> dict:
    """Quantized weights are placed at load time; put them on this process's device."""
    from accelerate import PartialState

    return {"": str(PartialState().device)}


def keep_4bit_layers_differentiable(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    On CPUs with AVX512-BF16, a Linear4bit's first forward in eval mode without grad repacks
    its weight for a fast inference kernel (gemv_4bit) and keeps using it from then on, in
    training too; that kernel has no backward, so after the first evaluation no gradient
    flows through any quantized layer and QLoRA trains silently wrong (bitsandbytes 0.50).
    The repacking also asserts that out_features is a multiple of 32. The flag it checks is
    per module; turning it off keeps the differentiable matmul everywhere.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


class QLora(Lora):
    """LoRA on a k-bit base (method.bits 4 or 8)."""

    name = "qlora"
    fused = False  # bitsandbytes layers subclass nn.Linear; peft's bnb layers must wrap them

    def load_kwargs(self, cfg: MethodSection, precision: str) -> dict:
        _need_bitsandbytes()
        import torch
        from transformers import BitsAndBytesConfig

        if cfg.bits == 8:
            quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
        else:
            dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
            compute = cfg.compute_dtype if cfg.compute_dtype != "auto" else precision
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=cfg.quant_type,
                bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=dtypes.get(compute, torch.float32),
                # Fresh task heads learn in full precision (and must not be quantized at all).
                llm_int8_skip_modules=SKIP_MODULES,
            )
        return {"quantization_config": quant, "device_map": _device_map()}

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        # Freezes the base and keeps norms/embeddings in fp32 for stable k-bit training.
        # Gradient checkpointing is the engine's job (training.gradient_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return keep_4bit_layers_differentiable(super().apply(model, cfg, ctx))

    def load(self, base: nn.Module, artifact: Path, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        _need_bitsandbytes()
        # A reloaded adapter must compute what the trained one did (and may be trained on).
        return keep_4bit_layers_differentiable(super().load(base, artifact, cfg, ctx))
