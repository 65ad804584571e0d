"""Load a model to evaluate from anything a user may point at, through `artifacts.load_trained`."""

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


def load_model(source: str, adapter: str | None = None, dtype: str | None = "fp32",
               task: str | None = None) -> LoadedModel:
    from ..artifacts import load_trained

    check_source(source, adapter)
    loaded = load_trained(source, adapter=adapter, dtype=torch_dtype(dtype), task=task)
    return LoadedModel(loaded.model, loaded.tokenizer, dict(loaded.manifest))


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
