"""Result cache keyed by (model fingerprint, dataset fingerprint, settings).

Fingerprints are computed without loading anything, so a compare whose models, data and
settings did not change answers from the cache in milliseconds. Weight files are
fingerprinted by path, size and modification time (hashing gigabytes on every compare would
cost more than it saves); small files (configs, tokenizers, adapters' JSON) by content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..files import write_text_atomic
from ..models import cache_dir

# Bumped when what a cached result means changes (a metric's definition, the JSON layout).
CACHE_VERSION = 1
_SMALL = 1 << 20
_SKIP_FILES = {"README.md", "metrics.jsonl"}


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    if st.st_size <= _SMALL:
        return f"{path.name}:{_sha(path.read_bytes())}"
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def folder_fingerprint(folder: Path) -> str:
    """Of the files directly in the folder: Hugging Face model and adapter folders are flat,
    and a user's outputs kept next to the weights (eval folders, notes) must not count."""
    parts = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name not in _SKIP_FILES and not p.name.startswith("."):
            parts.append(f"{p.name}={file_fingerprint(p)}")
    return _sha("\n".join(parts))


def artifact_in(folder: Path) -> Path:
    """The folder that holds the weights: a run folder's adapter/ or model/, else itself."""
    for sub in ("adapter", "model"):
        if (folder / sub).is_dir() and any((folder / sub).iterdir()):
            return folder / sub
    return folder


def adapter_base(folder: Path) -> str | None:
    """The base model an adapter was trained on, as its run or its peft config names it."""
    import yaml

    manifest = folder / "tunesmith.json"  # written by tunesmith.artifacts next to the weights
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            if m.get("base_model"):
                gguf = m.get("base_gguf_file")
                return str(Path(m["base_model"]) / gguf) if gguf else m["base_model"]
        except (json.JSONDecodeError, OSError):
            pass
    for cfg in (folder / "config.yaml", folder.parent / "config.yaml"):
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text()) or {}
                return data["model"]["name_or_path"]
            except (yaml.YAMLError, KeyError, TypeError):
                pass
    pc = folder / "adapter_config.json"
    if pc.is_file():
        return json.loads(pc.read_text()).get("base_model_name_or_path")
    return None


def _hub_revision(repo_id: str) -> str:
    """The snapshot the local Hugging Face cache resolves 'main' to, when it has one."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")
               ) / ("" if os.environ.get("HF_HUB_CACHE") else "hub")
    ref = hub / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else "unresolved"


def source_fingerprint(source: str, _depth: int = 0) -> str:
    """Fingerprint of a model source as load_trained would read it (hub id, path, pkg://, run)."""
    from ..config import ModelConfig
    from ..models import PKG_SCHEME, resolve_source

    if source.startswith(PKG_SCHEME) or source.endswith(".gguf"):
        folder, gguf = resolve_source(ModelConfig(name_or_path=source))
        return "gguf:" + file_fingerprint(Path(folder) / gguf)
    path = Path(source).expanduser()
    if path.is_file():
        return "file:" + file_fingerprint(path)
    if path.is_dir():
        art = artifact_in(path)
        fp = "dir:" + folder_fingerprint(art)
        if (art / "adapter_config.json").is_file() and _depth < 3:
            base = adapter_base(art)
            fp += "|base:" + (source_fingerprint(base, _depth + 1) if base else "unknown")
        return _sha(fp)
    return f"hub:{source}@{_hub_revision(source)}"


def model_fingerprint(model: str, adapter: str | None = None, task: str | None = None,
                      dtype: str | None = None) -> str:
    """What decides a model's scores: its weights, the adapter's files (a run folder's adapter artifact,
    as it is loaded), the task head, and the dtype it runs in (given when not the fp32 default)."""
    fp = source_fingerprint(model)
    if adapter:
        fp += "|adapter:" + folder_fingerprint(artifact_in(Path(adapter).expanduser()))
    if task:
        fp += "|task:" + task
    if dtype not in (None, "auto", "fp32"):  # auto evaluates in fp32; keys of fp32 runs stay as they were
        fp += "|dtype:" + dtype
    return _sha(fp)


def records_fingerprint(records: list[dict]) -> str:
    """Of the records actually scored, so a format mapping or max_samples change shows."""
    return _sha(json.dumps(records, sort_keys=True, ensure_ascii=False))


def settings_fingerprint(settings: dict) -> str:
    return _sha(json.dumps(settings, sort_keys=True))


class EvalCache:
    """One JSON file per key under `<cache_dir>/eval`; writes are atomic (temp + rename)."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_dir() / "eval"
        self.enabled = enabled

    @staticmethod
    def key(model_fp: str, data_fp: str, settings: dict) -> str:
        return _sha(json.dumps({"v": CACHE_VERSION, "model": model_fp, "data": data_fp,
                                "settings": settings_fingerprint(settings)}, sort_keys=True))

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            return None  # a damaged entry is a miss, and the fresh result replaces it

    def put(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(value, ensure_ascii=False))
