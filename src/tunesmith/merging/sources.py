"""Every merge input as a folder of safetensors read one tensor at a time.

A plain model folder is read where it is. A GGUF is dequantized once (the cache `models.py`
keeps). A hub id is downloaded (weights, config and tokenizer only). An adapter — a tunesmith
LoRA/DoRA/IA3/QLoRA run, BitFit biases, or a plain peft adapter folder — is merged into its
full-precision base first (merge_and_unload) and the result cached, keyed by the adapter's
fingerprint, so a search over many candidates merges each adapter once. Quantized checkpoints
and methods that add modules the architecture has no place for are refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model", "sentencepiece.bpe.model")
_HUB_PATTERNS = ["*.json", "model*.safetensors", "*.model", "*.txt", "*.jinja"]
KNOWN_DTYPES = ("F64", "F32", "BF16", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL")


@dataclass
class TensorSource:
    """One model's tensors: name -> file, shape and dtype, read from the safetensors headers only."""

    label: str
    origin: str  # what the user named
    folder: Path
    config: dict
    tensors: dict[str, tuple[Path, list[int], str]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # a tied tensor saved once: dropped name -> kept name
    manifest: dict | None = None  # the tunesmith manifest when the input is a trained artifact

    def locate(self, name: str) -> str | None:
        """The stored name holding `name` (itself, an alias, or a tied embedding), or None."""
        if name in self.tensors:
            return name
        if name in self.aliases and self.aliases[name] in self.tensors:
            return self.aliases[name]
        if self.config.get("tie_word_embeddings", True):
            embed = [n for n in self.tensors if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
            if name == "lm_head.weight" and embed:
                return embed[0]
            if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")) and "lm_head.weight" in self.tensors:
                return "lm_head.weight"
        return None

    def read(self, name: str, device: str = "cpu"):
        from safetensors import safe_open

        stored = self.locate(name)
        path = self.tensors[stored][0]
        # Opened per tensor so no mapping of the whole file stays resident between reads.
        with safe_open(str(path), framework="pt", device=device) as f:
            return f.get_tensor(stored)


def read_headers(folder: Path) -> tuple[dict[str, tuple[Path, list[int], str]], dict[str, str]]:
    """Tensor name -> (file, shape, dtype) and the tied-tensor aliases, from headers alone."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: exactly the files its index names
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():  # not a stray consolidated.safetensors beside it
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no .safetensors weights (a pytorch_model.bin checkpoint: load and "
                          "save_pretrained it once to convert)")
    tensors: dict[str, tuple[Path, list[int], str]] = {}
    aliases: dict[str, str] = {}
    for path in files:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise ConfigError(f"{path}: not a safetensors file (header size {size})")
            try:
                header = json.loads(f.read(size))
            except ValueError as exc:
                raise ConfigError(f"{path}: corrupt safetensors header: {exc}") from None
        for name, meta in header.items():
            if name == "__metadata__":
                aliases.update({k: v for k, v in (meta or {}).items() if k != "format"})
            elif meta["dtype"] not in KNOWN_DTYPES:
                raise ConfigError(f"{path}: tensor {name} is stored as {meta['dtype']}, which merging does not "
                                  f"handle (known: {', '.join(KNOWN_DTYPES)})")
            else:
                tensors[name] = (path, list(meta["shape"]), meta["dtype"])
    return tensors, aliases


def _refuse_quantized(config: dict, label: str, origin: str) -> None:
    quant = config.get("quantization_config")
    if quant:
        kind = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise ConfigError(
            f"{label}: {origin} holds {kind} weights; merging into quantized weights is lossy (each "
            "tensor would be rounded again). Dequantize first — load it in fp16/fp32 and save_pretrained — and "
            "merge that copy")


def _from_folder(label: str, origin: str, folder: Path, manifest: dict | None = None) -> TensorSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{label}: {folder} has no config.json (not a transformers model folder)")
    config = json.loads(config_path.read_text())
    _refuse_quantized(config, label, origin)
    tensors, aliases = read_headers(folder)
    return TensorSource(label, origin, folder, config, tensors, aliases, manifest)


def _adapter_fingerprint(folder: Path) -> str:
    """The adapter's files and its base's: a base changed in place must not reuse a stale fold."""
    from ..evaluation.cache import model_fingerprint

    return model_fingerprint(str(folder))[:16]


def _merged_adapter(label: str, origin: str, found: Path, manifest: dict | None, echo: Callable[[str], None]
                    ) -> TensorSource:
    """The adapter folded into its full-precision base, saved once in the cache."""
    from ..models import cache_dir

    target = cache_dir() / "merge-inputs" / f"{found.parent.name or 'adapter'}-{_adapter_fingerprint(found)}"
    if not (target / "config.json").is_file():
        from ..exporting.merged import fold_into

        echo(f"{label}: folding the adapter into its base ({found})")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fold_into(found, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if manifest is not None:
            (tmp / "tunesmith.json").write_text(json.dumps(manifest, indent=1))
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return _from_folder(label, origin, target, manifest)


def resolve(label: str, origin: str, echo: Callable[[str], None] = print) -> TensorSource:
    """The input named `origin` as a TensorSource, without reading any tensor."""
    from ..artifacts import _artifact_in, read_manifest
    from ..config import ModelConfig
    from ..exporting.merged import check_foldable
    from ..models import materialize

    path = Path(origin).expanduser()
    if origin.startswith(("/", ".", "~")) and not path.exists():
        raise ConfigError(f"{label}: model not found: {origin}")
    if path.is_dir():
        found = _artifact_in(path)
        if found is not None:
            manifest = read_manifest(found)
            if manifest.get("artifact") == "model":
                return _from_folder(label, origin, found, manifest)
            check_foldable(path, label)
            return _merged_adapter(label, origin, found, manifest, echo)
        if (path / "adapter_config.json").is_file():
            adapter_cfg = json.loads((path / "adapter_config.json").read_text())
            peft_type = str(adapter_cfg.get("peft_type", "")).lower()
            if peft_type not in ("lora", "ia3"):
                raise ConfigError(f"{label}: {origin} is a peft {peft_type or 'unknown'} adapter; only LoRA-family "
                                  "and IA3 adapters fold into the base weights")
            return _merged_adapter(label, origin, path, None, echo)
        return _from_folder(label, origin, path)
    if origin.endswith(".gguf") or origin.startswith("pkg://"):
        return _from_folder(label, origin, Path(materialize(ModelConfig(name_or_path=origin))))
    return _from_folder(label, origin, _download(label, origin))


def _download(label: str, repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated: the hub's own message says which
        raise ConfigError(f"{label}: could not get '{repo_id}' from the hub: {exc}") from None


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
