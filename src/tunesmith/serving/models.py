"""What a server or chat session serves: one base (a model, or a run folded into its base) and
named peft adapters on it, checked before anything is loaded."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

DTYPES = ("fp32", "bf16")


@dataclass
class AdapterSpec:
    name: str
    path: Path
    peft_type: str
    dora: bool
    base_model: str | None


@dataclass
class Served:
    model: object
    tokenizer: object
    base_name: str
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    context_length: int = 2048
    # The peft adapter the base name answers with: None for a plain (or merged) base; a QLoRA run's
    # own adapter, which stays unmerged on its 4-bit base.
    own_adapter: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    @property
    def mixed(self) -> bool:
        """Whether every adapter can share a batch with the others (peft LoRA without DoRA)."""
        return all(a.peft_type == "LORA" and not a.dora for a in self.adapters.values())

    def adapter_for(self, name: str | None) -> str:
        """The engine's adapter for a requested model name (None or the base name: the base, which is the
        run's own unmerged adapter when there is one)."""
        from .engine import BASE

        return (self.own_adapter or BASE) if name in (None, self.base_name) else name

    def ensure_loaded(self, name: str):
        """Load an adapter named at start but deferred (`lazy`); returns the model (now maybe peft-wrapped)."""
        with self._lock:
            if name not in self.loaded and name in self.adapters:
                self.model = _attach(self.model, self.adapters[name])
                self.loaded.add(name)
            return self.model


def parse_adapters(items: list[str]) -> dict[str, Path]:
    """`NAME=PATH` pairs, refusing repeats and malformed items."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter: '{item}' is not NAME=PATH")
        if name in out:
            raise ConfigError(f"--adapter: the name '{name}' is given twice")
        out[name] = Path(path).expanduser()
    return out


def describe_adapter(name: str, path: Path) -> AdapterSpec:
    """Read an adapter's peft config (a run folder, its adapter/ folder, or a peft folder)."""
    from ..artifacts import _artifact_in, read_manifest

    if not path.exists():
        raise ConfigError(f"--adapter {name}: not found: {path}")
    found = _artifact_in(path) if path.is_dir() else None
    folder = found or path
    if not (folder / "adapter_config.json").is_file():
        method = read_manifest(found).get("method") if found else None
        raise ConfigError(f"--adapter {name}: {path} is not a peft adapter"
                          + (f" (a '{method}' run: serve it as the base model instead, "
                             f"`tunesmith serve {path}`)" if method else ""))
    config = json.loads((folder / "adapter_config.json").read_text())
    peft_type = config.get("peft_type", "")
    if peft_type not in ("LORA", "IA3"):
        raise ConfigError(f"--adapter {name}: a {peft_type} adapter cannot share a base with others; serve it as "
                          f"the base model instead (`tunesmith serve {path}`)")
    base = read_manifest(found).get("base_model") if found else None
    return AdapterSpec(name, folder, peft_type, bool(config.get("use_dora")),
                       base or config.get("base_model_name_or_path"))


def load_served(source: str, adapters: dict[str, Path] | None = None, *, dtype: str = "fp32",
                lazy: bool = False, name: str | None = None) -> Served:
    """Check `source` and `adapters`, then load the base (a run folded into its base) and the adapters."""
    import torch

    from ..artifacts import _artifact_in, read_manifest, load_trained
    from ..quiet import held_load_report, no_progress_bars

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    specs = {n: describe_adapter(n, p) for n, p in (adapters or {}).items()}
    path = Path(source).expanduser()
    found = _artifact_in(path) if path.is_dir() else None
    manifest = read_manifest(found) if found else {}
    if manifest and not manifest.get("generative", True):
        raise ConfigError(f"serve: {source} is a '{manifest.get('objective')}' run; only text generators are served")
    identity = str(source)
    for spec in specs.values():
        if spec.base_model and not _same_model(spec.base_model, identity):
            raise ConfigError(f"--adapter {spec.name}: trained on '{spec.base_model}', but the served model is "
                              f"'{identity}'; serve that base, or export this adapter merged")
    base_name = name or (path.resolve().name if path.exists() else str(source))
    if base_name in specs:
        raise ConfigError(f"--adapter: '{base_name}' is the base model's name; choose another adapter name")
    with no_progress_bars(), held_load_report():
        loaded = load_trained(source, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model = loaded.model
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        # peft prepends the virtual tokens (or prefix states) at every forward, which the server's
        # step-by-step decoding with its own KV cache cannot carry.
        raise ConfigError(f"serve: {source} is a {peft_config.peft_type.value} run (virtual tokens); the server "
                          "and chat decode with their own cache, which prompt-learning methods do not support; "
                          "use `tunesmith evaluate` to generate with it, or train a LoRA")
    own = None
    if hasattr(model, "merge_and_unload") and manifest.get("method") != "qlora":
        model = model.merge_and_unload()  # a run served as the base runs at the speed of a plain model
    elif peft_config is not None:  # QLoRA: a 4-bit base is not merged into; its adapter answers for the base name
        own = model.active_adapter
        if own in specs:
            raise ConfigError(f"--adapter: '{own}' is the served run's own adapter; choose another adapter name")
    if getattr(model.config, "is_encoder_decoder", False) or "CausalLM" not in type(model).__name__:
        raise ConfigError(f"serve: {source} is a {type(model).__name__}; the server runs decoder-only text "
                          "generators")
    served = Served(model.eval(), loaded.tokenizer, base_name, specs,
                    context_length=int(getattr(model.config, "max_position_embeddings", 2048) or 2048),
                    own_adapter=own)
    if not lazy:
        for n in specs:
            served.ensure_loaded(n)
    return served


def _same_model(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        p = Path(s).expanduser()
        return str(p.resolve()) if p.exists() else s.rstrip("/")
    return norm(a) == norm(b)


def _attach(model, spec: AdapterSpec):
    from peft import PeftModel

    from ..quiet import held_load_report

    try:
        with held_load_report():
            if isinstance(model, PeftModel):
                model.load_adapter(str(spec.path), adapter_name=spec.name, is_trainable=False)
                return model
            return PeftModel.from_pretrained(model, str(spec.path), adapter_name=spec.name, is_trainable=False).eval()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"--adapter {spec.name}: {spec.path} does not fit the served model: {exc}") from exc
