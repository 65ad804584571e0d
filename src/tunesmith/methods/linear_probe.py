"""Linear probing: frozen backbone, features computed once and cached, a trained head.

The objective's model is split into its backbone (frozen, always in eval mode) and a new
head: `probe_head: linear` is one Linear layer (multinomial logistic regression on the
features), `mlp` is Linear-ReLU-Linear with `probe_hidden` units. Features of an example are
the backbone's output on that example alone (no padding), pooled for sequence
classification, per token for token classification; they are cached in memory keyed by the
example's token ids, so epochs after the first and evaluation run only the head.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

from ..method_config import MethodSection
from ..errors import ConfigError
from .adapter import load_partial
from .base import Method, MethodContext

WEIGHTS = "probe_head.safetensors"
SPEC = "probe_head.json"


def read_saved_probe(artifact: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved probe's spec and its head's weights."""
    return json.loads((artifact / SPEC).read_text()), load_file(artifact / WEIGHTS)


def is_decoder_only(config) -> bool:
    """A causal decoder (its last token has seen the whole text) rather than a bidirectional encoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def build_head(kind: str, hidden: int, num_labels: int, probe_hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden, num_labels)
    return nn.Sequential(nn.Linear(hidden, probe_hidden), nn.ReLU(), nn.Linear(probe_hidden, num_labels))


class ProbedModel(nn.Module):
    """A frozen backbone feeding a trainable head, with per-example feature caching.

    `forward(input_ids, attention_mask=None, token_type_ids=None, **ignored)` returns an
    output with `.logits`: (batch, labels) pooled, or (batch, tokens, labels) per token.
    """

    def __init__(self, model: nn.Module, spec: dict):
        super().__init__()
        config = model.config
        backbone = model.base_model
        if getattr(config, "is_encoder_decoder", False):
            backbone = backbone.get_encoder()  # features of the input text: the encoder alone
        self.backbone = backbone.requires_grad_(False).eval()
        self.config = config
        self.spec = spec
        self.per_token = spec["per_token"]
        self.pooling = spec["pooling"]
        self.head = build_head(spec["head"], config.hidden_size, config.num_labels, spec["probe_hidden"])
        self.head.to(next(backbone.parameters()).device)
        self._takes_use_cache = "use_cache" in inspect.signature(backbone.forward).parameters
        self.cache: dict[bytes, torch.Tensor] = {}
        self.features_computed = 0  # examples the backbone ran on
        self.features_reused = 0  # examples served from the cache

    def train(self, mode: bool = True) -> "ProbedModel":
        super().train(mode)
        self.backbone.eval()  # no dropout: a cached feature must be what the backbone computes
        return self

    @torch.no_grad()
    def _encode(self, ids: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
        """Features of equally long unpadded examples (batch, tokens): (batch, tokens, hidden) or pooled."""
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if token_types is not None:
            inputs["token_type_ids"] = token_types
        if self._takes_use_cache:
            inputs["use_cache"] = False
        hidden = self.backbone(**inputs).last_hidden_state.float()
        if self.per_token:
            return hidden
        if self.pooling == "mean":
            return hidden.mean(1)
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, -1]

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 token_type_ids: torch.Tensor | None) -> list[torch.Tensor]:
        """One feature tensor per row; the backbone runs only on rows not seen before.

        An example's features are computed on its own tokens without padding (misses of the
        same length run together), so they do not depend on which batch it came in.
        """
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        keys, misses = [], {}
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][mask[row]]
            types = token_type_ids[row][mask[row]] if token_type_ids is not None else None
            key = ids.cpu().numpy().tobytes() + (b"|" + types.cpu().numpy().tobytes() if types is not None else b"")
            keys.append(key)
            if key in self.cache or key in misses:
                self.features_reused += 1
            else:
                misses[key] = (ids, types)
        by_length: dict[int, list[bytes]] = {}
        for key, (ids, _) in misses.items():
            by_length.setdefault(len(ids), []).append(key)
        for group in by_length.values():
            ids = torch.stack([misses[k][0] for k in group])
            types = torch.stack([misses[k][1] for k in group]) if token_type_ids is not None else None
            for key, feature in zip(group, self._encode(ids, types)):
                self.cache[key] = feature
            self.features_computed += len(group)
        return [self.cache[k] for k in keys]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **ignored):
        feats = self.features(input_ids, attention_mask, token_type_ids)
        dtype = next(self.head.parameters()).dtype
        if not self.per_token:
            return SequenceClassifierOutput(logits=self.head(torch.stack(feats).to(dtype)))
        # Per-token features go back to their padded positions; padding gets zeros (no label there).
        grid = torch.zeros(*input_ids.shape, feats[0].shape[-1], device=feats[0].device, dtype=dtype)
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        for row, f in enumerate(feats):
            grid[row][mask[row]] = f.to(dtype)
        return TokenClassifierOutput(logits=self.head(grid))


class LinearProbe(Method):
    """A head on frozen features."""

    name = "linear_probe"
    def spec(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> dict:
        per_token = ctx.objective.name == "token_classification"
        pooling = cfg.pooling
        if pooling == "auto":
            pooling = "last" if is_decoder_only(model.config) else "mean"
        return {"head": cfg.probe_head, "probe_hidden": cfg.probe_hidden, "pooling": pooling,
                "per_token": per_token, "num_labels": model.config.num_labels}

    def apply(self, model: nn.Module, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        if not hasattr(model, "base_model") or model.base_model is model:
            raise ConfigError(f"method (linear_probe): {type(model).__name__} has no separate backbone to probe")
        return ProbedModel(model, self.spec(model, cfg, ctx))

    def save(self, model: nn.Module, out: Path) -> None:
        if not isinstance(model, ProbedModel):
            raise ConfigError("linear_probe: save needs a model prepared by LinearProbe.apply")
        out.mkdir(parents=True, exist_ok=True)
        head = {n: p.detach().to("cpu").contiguous().clone() for n, p in model.head.named_parameters()}
        save_file(head, out / WEIGHTS, metadata={"format": "pt"})
        (out / SPEC).write_text(json.dumps(model.spec, indent=1))

    def load(self, base: nn.Module, artifact: Path, cfg: MethodSection, ctx: MethodContext) -> nn.Module:
        spec, weights = read_saved_probe(artifact)
        probed = ProbedModel(base, spec)
        load_partial(probed.head, weights, artifact / WEIGHTS)
        return probed
