"""Load a model to evaluate from anything a user may point at.

`tunesmith.artifacts.load_trained` is the one loader of trained outputs; this module defers to
it and only fills in when it is not available (older checkouts) with the same rules: a run
folder's adapter/ or model/, a peft adapter on its recorded base, or a plain model source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .cache import adapter_base, artifact_in

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    manifest: dict = field(default_factory=dict)


def check_source(source: str, adapter: str | None = None) -> None:
    """Fail on a missing local path before anything is loaded."""
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(f"model not found: {source}")
    if source.endswith(".gguf") and not source.startswith("pkg://") and not Path(source).is_file():
        raise ConfigError(f"model: GGUF file not found: {source}")
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise ConfigError(f"adapter folder not found: {adapter}")


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return torch.float32  # CPU evaluation in fp32: scores that do not depend on the device
    return _DTYPES[name]


def load_model(source: str, adapter: str | None = None, dtype: str | None = "fp32") -> LoadedModel:
    check_source(source, adapter)
    try:
        from ..artifacts import load_trained  # type: ignore[attr-defined]
    except ImportError:
        load_trained = None
    if load_trained is not None:
        loaded = load_trained(source, adapter=adapter, dtype=torch_dtype(dtype))
        return LoadedModel(loaded.model, loaded.tokenizer, dict(getattr(loaded, "manifest", {}) or {}))
    return _load_fallback(source, adapter, torch_dtype(dtype))


def _plain(source: str, dtype: torch.dtype):
    from ..config import ModelConfig
    from ..models import load_causal_lm, load_tokenizer, materialize

    cfg = ModelConfig(name_or_path=source)
    path = materialize(cfg)
    tokenizer = load_tokenizer(cfg, path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype), tokenizer, "seq2seq"
    return load_causal_lm(cfg, dtype, path), tokenizer, "causal_lm"


def _load_fallback(source: str, adapter: str | None, dtype: torch.dtype) -> LoadedModel:
    from peft import PeftModel

    path = Path(source).expanduser()
    folder = artifact_in(path) if path.is_dir() else None
    if folder is not None and (folder / "adapter_config.json").is_file():
        base = adapter_base(folder)
        if base is None:
            raise ConfigError(f"{folder}: an adapter that names no base model")
        model, _, kind = _plain(base, dtype)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() \
            else _plain(base, dtype)[1]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model = PeftModel.from_pretrained(model, str(folder))
        manifest = {"base_model": base, "model_kind": kind, "method": "adapter"}
    else:
        model, tokenizer, kind = _plain(str(folder) if folder is not None else source, dtype)
        manifest = {"base_model": source, "model_kind": kind}
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        manifest["adapter"] = adapter
    model.eval()
    return LoadedModel(model, tokenizer, manifest)


def base_of(source: str, adapter: str | None = None) -> str | None:
    """The base model of an adapter (given, or inside a run folder); None for a full model."""
    if adapter is not None:
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        folder = artifact_in(path)
        if (folder / "adapter_config.json").is_file():
            return adapter_base(folder)
        # A full fine-tune's run folder names its base in config.yaml.
        if folder != path or (path.parent / "config.yaml").is_file():
            return adapter_base(folder)
    return None
