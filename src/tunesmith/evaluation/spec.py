"""What an evaluation is made of: models, tasks (data + settings) and reference sets.

Pydantic schemas, so a compare YAML fails with the key path before any model is loaded, and
so the settings that decide a score have one canonical JSON form to hash for the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import ReferenceSet
from ..errors import ConfigError
from .extract import DEFAULT_NORMALIZE, EXTRACTORS, NORMALIZERS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EvalSettings(_Section):
    """Everything besides the model and the data that changes a score (hashed for the cache)."""

    metrics: list[str] = Field(default_factory=lambda: ["perplexity", "exact_match"])
    extract: str = Field("none", description=f"Answer extraction: {', '.join(EXTRACTORS)}.")
    pattern: str | None = Field(None, description="Regex for extract: regex (group 1 if any).")
    normalize: list[str] = Field(default_factory=lambda: list(DEFAULT_NORMALIZE),
                                 description=f"Normalizations: {', '.join(NORMALIZERS)}.")
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(1024, gt=8, description="Longest input (tokens) for perplexity windows.")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    seed: int = 0
    chat_template: bool = Field(True, description="Render prompts with the model's chat template.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        from .metrics import check_metrics

        try:
            return check_metrics(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> "EvalSettings":
        from .extract import check_extraction, check_normalization

        try:
            check_extraction(self.extract, self.pattern)
            check_normalization(self.normalize)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def generation_key(self) -> dict:
        """Only what changes generated text or a perplexity: what the cache key hashes."""
        return self.model_dump(mode="json")


class TaskSpec(_Section):
    """One dataset with the settings it is scored with."""

    name: str | None = None
    data: str = Field(description="Data file (any format tunesmith reads) or hub dataset id.")
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text", "preference"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    system_prompt: str | None = None
    max_samples: int | None = Field(None, gt=0, description="First N records only.")
    settings: EvalSettings = Field(default_factory=EvalSettings)

    @property
    def label(self) -> str:
        return self.name or Path(self.data).stem


class ModelSpec(_Section):
    """A model to evaluate: a hub id, folder, .gguf, pkg:// file, run folder or artifact."""

    name: str | None = None
    model: str
    adapter: str | None = None
    task: str | None = Field(None, description="One task of a multi-task run: its head on the shared backbone.")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        base = Path(self.adapter or self.model.rstrip("/"))
        # A run's artifact folder is called adapter/ or model/: the run's name says more.
        if base.name in ("adapter", "model") and base.parent.name:
            base = base.parent
        return f"{base.stem}/{self.task}" if self.task else base.stem

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """`[NAME=]SOURCE[::ADAPTER]` from the command line."""
        name = None
        if "=" in text and not text.startswith(("/", ".", "~")) and "://" not in text.split("=", 1)[0]:
            name, text = text.split("=", 1)
        source, _, adapter = text.partition("::")
        if not source:
            raise ConfigError(f"model spec '{text}': expected [NAME=]SOURCE[::ADAPTER]")
        return cls(name=name or None, model=source, adapter=adapter or None)


class CompareSpec(_Section):
    """A whole comparison, as written in a compare YAML."""

    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(default_factory=list)
    reference: list[ReferenceSet] = Field(default_factory=lambda: [ReferenceSet()])
    forgetting: bool = Field(True, description="Measure the reference sets on every model.")
    baseline: str | None = Field(None, description="Model name deltas are relative to (default: the first).")
    reference_max_length: int = Field(512, gt=8)
    reference_batch_size: int = Field(8, gt=0)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"
    output: str | None = None
    cache: bool = True
    show_examples: int = Field(10, ge=0, description="Differing examples per task in report.md.")

    @model_validator(mode="after")
    def _check(self) -> "CompareSpec":
        labels = [m.label for m in self.models]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"models: duplicate names {sorted(dup)}; give each a distinct 'name'")
        tasks = [t.label for t in self.tasks]
        dup = {x for x in tasks if tasks.count(x) > 1}
        if dup:
            raise ValueError(f"tasks: duplicate names {sorted(dup)}; give each a distinct 'name'")
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(f"baseline: '{self.baseline}' is not a model name (models: {labels})")
        return self

    @property
    def baseline_label(self) -> str:
        return self.baseline or self.models[0].label


def load_compare_spec(path: str | Path) -> CompareSpec:
    from ..config import read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path, "compare config", "a mapping with 'models' and 'tasks'")
    spec = validate_spec(data, where=str(path))
    _resolve_paths(spec, path.parent)
    return spec


def validate_spec(data: dict, where: str = "compare config") -> CompareSpec:
    try:
        return CompareSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(root)"
            lines.append(f"{loc}: {str(e['msg']).removeprefix('Value error, ')}")
        raise ConfigError(f"{where}: invalid:\n  " + "\n  ".join(lines)) from None


def _resolve_paths(spec: CompareSpec, base: Path) -> None:
    """Files named relative to the YAML resolve against its folder when they exist there."""

    from ..config import resolve_against

    def fix(p: str | None) -> str | None:
        return p if p == "default" else resolve_against(p, base)

    for t in spec.tasks:
        t.data = fix(t.data)
    for m in spec.models:
        m.model, m.adapter = fix(m.model), fix(m.adapter)
    for r in spec.reference:
        r.path = fix(r.path)
