"""The prompt family through peft: prefix tuning, prompt tuning, P-tuning.

All three leave every model weight frozen and learn a few virtual tokens per row:
- prefix tuning: key/value vectors prepended inside every attention layer (past_key_values);
- prompt tuning: embeddings prepended to the input (random or initialised from a text);
- P-tuning: embeddings produced by a small MLP prompt encoder, prepended to the input.

Virtual tokens are prepended per row, so rows never pack several examples. Prompt and
P-tuning also prepend positions to per-token outputs: causal-LM and token-classification
logits carry `num_virtual_tokens` extra leading positions that the objective drops.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod

from torch import nn

from ..method_config import NO_MASKED_LM, MethodSection
from ..errors import ConfigError
from .base import MethodContext, PeftMethod, backbone_heads


def _takes_past_key_values(model: nn.Module) -> bool:
    return "past_key_values" in inspect.signature(model.forward).parameters


class PromptMethod(PeftMethod):
    """Virtual tokens prepended per row (so rows never pack: see PromptFamily in method_config)."""

    @abstractmethod
    def peft_config(self, cfg: MethodSection, ctx: MethodContext):
        """The peft config of this prompt method."""

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        if ctx.objective.peft_task_type is None:
            raise ConfigError(f"method {self.name} cannot train objective {ctx.objective.name}: {NO_MASKED_LM}")
        if self.name != "prefix_tuning" and ctx.objective.name == "classification" and hasattr(model, "score"):
            # Decoder heads ("score") read each row's last real token, found from input_ids; peft
            # feeds virtual tokens as embeddings only, so the head would read padding instead.
            raise ConfigError(
                f"method {self.name} cannot train sequence classification on a decoder ({type(model).__name__}): "
                "peft passes soft prompts as embeddings, so the head cannot find each row's last token; "
                "use prefix_tuning, lora or ia3"
            )
        config = self.peft_config(cfg, ctx)
        config.modules_to_save = backbone_heads(model)
        return get_peft_model(model, config)


class PrefixTuning(PromptMethod):
    """Trainable key/value prefixes in every layer (optionally through an MLP reparameterisation)."""

    name = "prefix_tuning"

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        # peft hands the prefixes to the model (or, for classification heads, to its backbone)
        # as `past_key_values`; a model that does not take them would fail at the first step.
        if not any(_takes_past_key_values(m) for m in (model, getattr(model, "base_model", model))):
            import peft
            import transformers

            raise ConfigError(
                f"method.type prefix_tuning cannot train {type(model).__name__} with transformers "
                f"{transformers.__version__} and peft {peft.__version__}: neither the model nor its "
                "backbone takes past_key_values, through which peft injects the prefixes (DistilBERT "
                "never did; transformers 5.24 renamed it on BERT-family encoders, which constraints.txt "
                "avoids by pinning transformers<5.24); use prompt_tuning, p_tuning, lora or ia3"
            )
        return super().apply(model, cfg, ctx)

    def peft_config(self, cfg: MethodSection, ctx: MethodContext):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type=ctx.objective.peft_task_type,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection,
            # The reparameterisation MLP's width (used when prefix_projection is on).
            **({"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {}),
        )


class PromptTuning(PromptMethod):
    """Trainable soft-prompt embeddings, random or initialised from `method.prompt_init_text`."""

    name = "prompt_tuning"

    def peft_config(self, cfg: MethodSection, ctx: MethodContext):
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=ctx.objective.peft_task_type, num_virtual_tokens=cfg.num_virtual_tokens)

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        peft_model = super().apply(model, cfg, ctx)
        if cfg.prompt_init == "text":
            init_from_text(peft_model, cfg, ctx)
        return peft_model


def init_from_text(peft_model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> None:
    """Seed the soft prompt with the embeddings of `prompt_init_text`, repeated to fill every virtual token.

    Done here with the run's tokenizer rather than peft's TEXT init, which stores a tokenizer
    path in the adapter config and loads it again on every reload; the saved prompt is the
    trained one either way.
    """
    import torch

    if ctx.tokenizer is None:
        raise ConfigError("method.prompt_init: text needs the run's tokenizer")
    ids = ctx.tokenizer(cfg.prompt_init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"method.prompt_init_text {cfg.prompt_init_text!r} encodes to no tokens")
    n = cfg.num_virtual_tokens
    ids = (ids * (n // len(ids) + 1))[:n]
    embed = peft_model.get_base_model().get_input_embeddings()
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    with torch.no_grad():
        words = embed(torch.tensor(ids, device=embed.weight.device))
        encoder.embedding.weight.copy_(words.to(encoder.embedding.weight.dtype))


class PTuning(PromptMethod):
    """Soft prompts produced by a small MLP prompt encoder (width `method.encoder_hidden_size`)."""

    name = "p_tuning"

    def peft_config(self, cfg: MethodSection, ctx: MethodContext):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(
            task_type=ctx.objective.peft_task_type,
            num_virtual_tokens=cfg.num_virtual_tokens,
            **({"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {}),
        )
