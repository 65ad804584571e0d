"""BitFit: only bias terms (and a fresh task head) learn.

Every bias of the base learns (attention, feed-forward and LayerNorm biases), a small
fraction of a percent of the weights. The artifact holds those tensors only
(`bitfit.safetensors`), put back onto a freshly loaded base on reload.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..method_config import MethodSection
from ..errors import ConfigError
from .adapter import load_partial
from .base import task_heads
from .base import Method, MethodContext

WEIGHTS = "bitfit.safetensors"


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def _set_trainable(model: nn.Module) -> int:
    """Biases and the task head learn; returns how many bias tensors the base (head aside) has."""
    heads = task_heads(model)
    head_params = {id(p) for _, head in heads for p in head.parameters()}
    n_bias = 0
    for name, p in model.named_parameters():
        p.requires_grad_(_is_bias(name))
        n_bias += _is_bias(name) and id(p) not in head_params
    for _, head in heads:
        head.requires_grad_(True)  # a fresh task head always learns
    return n_bias


class BitFit(Method):
    """Bias terms only."""

    name = "bitfit"
    # The biases learn inside the base, so the base loads in fp32 like any learning weight.
    frozen_base = False

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        if _set_trainable(model) == 0:
            raise ConfigError(
                f"method (bitfit): {type(model).__name__} has no bias terms to train "
                f"(Llama and T5 are built without them by default); use method.type lora, ia3 or adapter"
            )
        return model

    def save(self, model: nn.Module, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        # named_parameters lists a tied tensor once, so safetensors sees no shared storage.
        trained = {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters()
                   if p.requires_grad}
        save_file(trained, out / WEIGHTS, metadata={"format": "pt"})

    def load(self, base: nn.Module, artifact: Path, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        _set_trainable(base)
        load_partial(base, load_file(artifact / WEIGHTS), artifact / WEIGHTS)
        return base
