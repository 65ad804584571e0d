"""IA3 through peft: learned rescaling of keys, values and feed-forward activations.

Which layers get a scaling vector:
- `target_modules: all-linear` (the default) uses peft's per-architecture choice from the
  IA3 paper where peft has one (keys, values and the feed-forward output: Llama k_proj,
  v_proj, down_proj; BERT key, value, output.dense; T5 k, v, wo; GPT-2 c_attn, mlp.c_proj).
  IA3 on every linear layer is not what the paper tunes, so the literal preset is used only
  for architectures peft does not know (every linear layer in the blocks).
- `attention` / `mlp` resolve like the LoRA presets; a list of names goes to peft as is.

Feed-forward modules (scaled on their input rather than their output) are
`method.feedforward_modules` when given, else peft's default for the architecture, else the
chosen layers that sit outside attention.
"""

from __future__ import annotations

from torch import nn

from ..method_config import MethodSection
from ..errors import ConfigError
from .base import MethodContext, PeftMethod, backbone_heads
from .lora import block_linears, check_layers, is_attention, modules_regex, preset_modules, resolve_targets


def _peft_defaults(model: nn.Module) -> tuple[list[str], list[str]] | None:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TARGETS and model_type in FEEDFORWARD:
        return list(TARGETS[model_type]), list(FEEDFORWARD[model_type])
    return None


def _matching(names: list[str], suffixes: list[str]) -> list[str]:
    return [n for n in names if any(n == f or n.endswith("." + f) for f in suffixes)]


def ia3_modules(model: nn.Module, cfg: MethodSection) -> tuple[str | list[str], str | list[str]]:
    """(target_modules, feedforward_modules) for peft's IA3Config.

    peft's IA3 has no layers_to_transform, so with `method.layers_to_transform` the chosen
    block layers are written as a regex naming those block indices only.
    """
    spec, layers = cfg.target_modules, cfg.layers_to_transform
    info = block_linears(model)
    blocks = list(info)
    defaults = _peft_defaults(model) if spec == "all-linear" else None
    if defaults is not None:
        targets, feedforward = defaults
        feedforward = cfg.feedforward_modules or feedforward
        if not layers:
            return targets, feedforward
        chosen = _matching(blocks, targets)
    elif isinstance(spec, list):
        if not layers:
            feedforward = cfg.feedforward_modules or sorted(
                {t for t in spec for n in _matching(blocks, [t]) if not is_attention(info[n][2])})
            return spec, feedforward
        chosen, feedforward = _matching(blocks, spec), cfg.feedforward_modules
    else:
        resolve_targets(model, spec, "ia3")  # a clear error for an unknown preset or no match
        chosen = preset_modules(model, spec)
        feedforward = cfg.feedforward_modules
    if not chosen:
        raise ConfigError(f"method (ia3): target_modules {spec!r} names no linear layer inside the transformer blocks")
    ff_names = (_matching(chosen, feedforward) if feedforward is not None
                else [n for n in chosen if not is_attention(info[n][2])])
    return modules_regex(model, chosen, layers), (modules_regex(model, ff_names, layers) if ff_names else [])


class IA3(PeftMethod):
    """Learned rescaling vectors (IA3): a few thousand parameters, one vector per chosen layer."""

    name = "ia3"

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        from peft import IA3Config, get_peft_model

        check_layers(model, cfg.layers_to_transform)
        targets, feedforward = ia3_modules(model, cfg)
        config = IA3Config(
            target_modules=targets,
            feedforward_modules=feedforward,
            task_type=ctx.objective.peft_task_type,
            modules_to_save=backbone_heads(model),
        )
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise ConfigError(f"method (ia3, target_modules={cfg.target_modules!r}): {exc}") from exc

