"""The LoRA family through peft: LoRA, DoRA, rsLoRA, LoRA-FA, LoRA+ learning rates.

Target-module presets (`attention`, `mlp`, `all-linear`) are resolved by looking at the
model's module names, so they work on any family whose blocks sit in a numbered stack
(Llama `model.layers.N`, BERT `encoder.layer.N`, T5 `encoder.block.N`, GPT-2 `h.N`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..method_config import MethodSection
from ..errors import ConfigError
from .base import MethodContext, PeftMethod, backbone_heads

if TYPE_CHECKING:
    from ..config import TrainingConfig

PRESETS = ("all-linear", "attention", "mlp")
# A path component naming an attention sub-module in transformers families:
# self_attn (Llama), attention (BERT), SelfAttention/EncDecAttention (T5), attn (GPT-2).
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
# Where the model keeps the method config, for build_optimizer (which only sees the model).
def _is_linear(module: nn.Module) -> bool:
    # nn.Linear covers bitsandbytes' Linear4bit / Linear8bitLt; GPT-2 uses transformers' Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def block_linears(model: nn.Module) -> dict[str, tuple[str, int, str]]:
    """Linear layers inside numbered transformer blocks: name -> (stack path, block index, path in block).

    The stack is the part of the name before its first numeric component, so heads, poolers
    and output embeddings (no block index) are never included.
    """
    found = {}
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None or idx == 0 or idx == len(parts) - 1:
            continue
        found[name] = (".".join(parts[:idx]), int(parts[idx]), ".".join(parts[idx + 1:]))
    return found


def is_attention(path_in_block: str) -> bool:
    return any(_ATTENTION.search(p) for p in path_in_block.split(".")[:-1])


def preset_modules(model: nn.Module, preset: str) -> list[str]:
    """Full names of the linear layers a preset picks (attention, mlp = the rest of a block, all-linear)."""
    picked = []
    for name, (_, _, rel) in block_linears(model).items():
        attention = is_attention(rel)
        if preset == "all-linear" or (preset == "attention") == attention:
            picked.append(name)
    return picked


def modules_regex(model: nn.Module, names: list[str], layers: list[int] | None = None) -> str:
    """One regex (peft full-matches a string target) covering these block linears in every block.

    Written per block position rather than per name so the adapter config stays short;
    `layers` narrows it to those block indices (for peft methods without layers_to_transform).
    """
    info = block_linears(model)
    stacks = sorted({info[n][0] for n in names})
    rels = sorted({info[n][2] for n in names})
    alt = lambda xs: "|".join(re.escape(str(x)) for x in xs)  # noqa: E731
    index = rf"(?:{alt(sorted(set(layers)))})" if layers else r"\d+"
    return rf"(?:{alt(stacks)})\.{index}\.(?:{alt(rels)})"


def resolve_targets(model: nn.Module, spec: str | list[str], method: str,
                    layers: list[int] | None = None) -> str | list[str]:
    """What peft's target_modules gets for `method.target_modules`: a preset becomes a regex
    (naming only `layers` when given); names pass through."""
    if isinstance(spec, list):
        return spec
    if spec not in PRESETS:
        raise ConfigError(
            f"method.target_modules: '{spec}' is not a preset ({', '.join(PRESETS)}); "
            f"give module names as a list, e.g. [q_proj, v_proj]"
        )
    names = preset_modules(model, spec)
    if not names:
        raise ConfigError(
            f"method ({method}): target_modules '{spec}' matches no linear layer inside the model's "
            f"transformer blocks; list the module names instead"
        )
    return modules_regex(model, names, layers)


def check_layers(model: nn.Module, layers: list[int] | None) -> None:
    if not layers:
        return
    indices = {i for _, i, _ in block_linears(model).values()}
    n = max(indices) + 1 if indices else 0
    bad = [i for i in layers if i < 0 or i >= n]
    if bad:
        raise ConfigError(f"method.layers_to_transform: {bad} out of range; the model has blocks 0..{n - 1}")


class Lora(PeftMethod):
    """Low-rank adapters (B @ A, scaled by alpha / r) on the chosen linear layers, through peft."""

    name = "lora"
    use_dora = False
    use_rslora = False
    # Plain nn.Linear targets get the fused LoRA layer (methods/fused_lora.py); quantized
    # bases keep peft's own layers.
    fused = True

    def peft_config(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext):
        from peft import LoraConfig

        targets = resolve_targets(model, cfg.target_modules, self.name, cfg.layers_to_transform)
        config = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            # peft takes layers_to_transform with a list of names only; a preset regex names the layers itself.
            layers_to_transform=cfg.layers_to_transform if isinstance(targets, list) else None,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            task_type=ctx.objective.peft_task_type,
            modules_to_save=backbone_heads(model),
        )
        if self.fused:
            from .fused_lora import FusedLoraLinear

            config._register_custom_module({nn.Linear: FusedLoraLinear})
        return config

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        check_layers(model, cfg.layers_to_transform)
        # peft keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype).
        try:
            peft_model = get_peft_model(model, self.peft_config(model, cfg, ctx))
        except ValueError as exc:
            # Mostly target_modules matching nothing (peft's NoMatchingPeftModuleError is a
            # ValueError): a config mistake, so report it as one instead of a traceback.
            raise ConfigError(f"method ({self.name}, target_modules={cfg.target_modules!r}): {exc}") from exc
        return peft_model

    def build_optimizer(self, model: nn.Module, cfg: "TrainingConfig",
                        method_cfg: MethodSection) -> torch.optim.Optimizer | None:
        if method_cfg.loraplus_lr_ratio is None:
            return None
        from peft.optimizers import create_loraplus_optimizer

        # LoRA+: B (and 1-d adapter weights such as DoRA magnitudes) learn ratio x faster than A.
        return create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=cfg.learning_rate, loraplus_lr_ratio=method_cfg.loraplus_lr_ratio,
            loraplus_weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas),
        )


class Dora(Lora):
    """DoRA: LoRA on the direction of each weight plus a trainable magnitude vector per output."""

    name = "dora"
    use_dora = True


class RsLora(Lora):
    """rsLoRA: LoRA scaled by alpha / sqrt(r), which keeps high ranks learning."""

    name = "rslora"
    use_rslora = True


class LoraFA(Lora):
    """LoRA-FA: A stays at its random init, only B learns, with peft's LoRA-FA optimizer.

    Halves the adapter's trainable weights and optimizer state; the optimizer projects B's
    gradient so the update approximates full LoRA's.
    """

    name = "lora_fa"

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        peft_model = super().apply(model, cfg, ctx)
        # Frozen here (the optimizer would do it too) so the trainable count printed is honest.
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
        return peft_model

    def build_optimizer(self, model: nn.Module, cfg: "TrainingConfig",
                        method_cfg: MethodSection) -> torch.optim.Optimizer | None:
        from peft.optimizers import create_lorafa_optimizer

        optimizer = create_lorafa_optimizer(model, r=method_cfg.r, lora_alpha=method_cfg.alpha,
                                            lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        for group in optimizer.param_groups:
            group["betas"] = tuple(cfg.adam_betas)
        return optimizer
