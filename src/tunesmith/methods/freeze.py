from __future__ import annotations

import fnmatch

from torch import nn

from ..method_config import MethodSection
from ..errors import ConfigError
from .base import Method, MethodContext, decoder_layers, task_heads


class Freeze(Method):
    """Train the last N transformer blocks and/or named modules; freeze everything else."""

    name = "freeze"
    frozen_base = False

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.train_last_n_layers:
            _, layers = decoder_layers(model)
            if cfg.train_last_n_layers > len(layers):
                raise ConfigError(
                    f"method.train_last_n_layers={cfg.train_last_n_layers} but the model has "
                    f"only {len(layers)} blocks"
                )
            for block in list(layers)[-cfg.train_last_n_layers:]:
                block.requires_grad_(True)
        for pattern in cfg.trainable_modules:
            # A bare name ("lm_head", "norm") matches that module anywhere; globs work too.
            hits = [
                m for n, m in model.named_modules()
                if n and (fnmatch.fnmatch(n, pattern) or n.split(".")[-1] == pattern)
            ]
            if not hits:
                raise ConfigError(f"method.trainable_modules: no module matches '{pattern}'")
            for m in hits:
                m.requires_grad_(True)
        for _, head in task_heads(model):
            head.requires_grad_(True)  # a fresh task head (and the pooler feeding it) always learns
        # train_last_n_layers=0 with no trainable_modules passes validation but trains
        # nothing; say so here, before a run folder exists, rather than fail in the optimizer.
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(
                "method: freeze leaves no parameter trainable; set method.train_last_n_layers > 0 "
                "or method.trainable_modules"
            )
        return model
