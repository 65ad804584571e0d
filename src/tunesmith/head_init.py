"""LP-FT: start a fine-tuning run's task head from a linear-probe run's trained head.

A fresh head is random while the body is pretrained, so the first steps of fine-tuning push
gradients from a meaningless head into the body (Kumar et al. 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution"). Training a linear probe first
(`method.type: linear_probe`, features cached, cheap epochs) and fine-tuning from its head avoids
that. The probe's features must be what the fine-tuned head reads: the last token's final
hidden state for a decoder's sequence head, every token's for token classification. A BERT-style
sequence classifier reads the pooler (dense + tanh over [CLS]) instead, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

FIELD = "model.head_from"


@dataclass
class ProbeHead:
    path: Path
    weight: torch.Tensor  # (labels, hidden)
    bias: torch.Tensor | None


def read_probe_head(head_from: str, *, objective: str, labels: list[str], base: tuple[str, str | None],
                    base_source: str, model_config) -> ProbeHead:
    """The probe's head, refused (naming model.head_from) when it cannot seed this run's head.

    Runs before the model loads: the files are small and every mismatch is known from them and the
    model's config. `base` is the run's (model.name_or_path, model.gguf_file); `base_source` the folder
    it resolved to (a GGUF's cached conversion moves when the cache format changes, the name does not).
    """
    from .artifacts import MANIFEST, _artifact_in, read_manifest
    from .methods.linear_probe import WEIGHTS, is_decoder_only, read_saved_probe

    folder = Path(head_from).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{FIELD}: {head_from} is not a folder (give a linear_probe run folder)")
    found = _artifact_in(folder)
    if found is None:
        raise ConfigError(f"{FIELD}: {head_from} holds no trained artifact ({MANIFEST} not found in it or in its "
                          "adapter/ or model/ folder)")
    manifest = read_manifest(found)
    if manifest.get("method") != "linear_probe":
        raise ConfigError(f"{FIELD}: {found} was trained with method.type '{manifest.get('method')}'; a head "
                          "to start from comes from a method.type linear_probe run")
    if manifest.get("objective") != objective:
        raise ConfigError(f"{FIELD}: the probe in {found} was trained for objective.type "
                          f"'{manifest.get('objective')}', this run is '{objective}'")
    if list(manifest.get("labels") or []) != list(labels or []):
        raise ConfigError(f"{FIELD}: the probe's labels {manifest.get('labels')} differ from this run's {labels} "
                          "(same names in the same order needed)")
    named = (manifest.get("base_model"), manifest.get("base_gguf_file"))
    if manifest.get("base_source") != base_source and named != base:
        raise ConfigError(f"{FIELD}: the probe in {found} read features of {named[0]}, this run trains {base[0]}; "
                          "a head only fits the features it was trained on")
    spec, weights = read_saved_probe(found)
    if spec.get("head") != "linear":
        raise ConfigError(f"{FIELD}: the probe in {found} has a '{spec.get('head')}' head; only a linear head "
                          "(probe_head: linear) has the task head's shape")
    if not spec.get("per_token"):
        if not is_decoder_only(model_config):
            raise ConfigError(f"{FIELD}: {getattr(model_config, 'model_type', '?')} is an encoder, whose sequence "
                              "classifier reads the pooler (dense + tanh over [CLS]), not the features a probe "
                              "trains on; LP-FT is for decoders' sequence heads and for token classification")
        if spec.get("pooling") != "last":
            raise ConfigError(f"{FIELD}: the probe in {found} pooled '{spec.get('pooling')}' features; a decoder's "
                              "sequence head reads the last token (train the probe with pooling: last or auto)")
    weight = weights.get("weight")
    hidden = getattr(model_config, "hidden_size", None)
    if weight is None or weight.ndim != 2 or (hidden is not None and weight.shape[1] != hidden):
        raise ConfigError(f"{FIELD}: {found / WEIGHTS} holds no (labels, {hidden}) weight matrix "
                          f"(found {None if weight is None else tuple(weight.shape)})")
    return ProbeHead(found, weight, weights.get("bias"))


def apply_probe_head(model: nn.Module, probe: ProbeHead) -> str:
    """Copy the probe's head into the model's fresh task head (before the method wraps it); the log line."""
    from .methods.base import head_modules

    heads = [(n, m) for n, m in head_modules(model) if isinstance(m, nn.Linear)]
    if len(heads) != 1:
        raise ConfigError(f"{FIELD}: {type(model).__name__} has {len(heads)} linear task heads "
                          f"({', '.join(n for n, _ in heads) or 'none'}); one is needed to start from the probe")
    name, head = heads[0]
    if tuple(head.weight.shape) != tuple(probe.weight.shape):
        raise ConfigError(f"{FIELD}: the probe's head is {tuple(probe.weight.shape)}, {type(model).__name__}.{name} "
                          f"is {tuple(head.weight.shape)}")
    note = ""
    with torch.no_grad():
        head.weight.copy_(probe.weight.to(head.weight.dtype))
        if head.bias is not None and probe.bias is not None:
            head.bias.copy_(probe.bias.to(head.bias.dtype))
        elif probe.bias is not None:
            # A decoder's score layer has no bias. Bradley-Terry rewards only ever differ, so a reward head
            # loses nothing; class logits lose the shift until fine-tuning adapts.
            note = f"; its bias (max |b| {probe.bias.abs().max().item():.3g}) dropped, {name} has none"
    return f"head: {name} starts from the linear probe in {probe.path} (LP-FT){note}"
