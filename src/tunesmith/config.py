"""The run configuration: a pydantic schema, YAML loading and dotted overrides.

Every key of a run lives here so that a bad config fails before any model or data is
loaded, with the key path in the message.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .objective_config import SECTIONS as OBJECTIVE_SECTIONS
from .objective_config import ObjectiveConfigUnion, ObjectiveSection, objective_config
from .method_config import SECTIONS as METHOD_SECTIONS
from .method_config import MethodConfigUnion, MethodSection, method_config, support  # noqa: F401 (re-exported)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Section):
    name_or_path: str = Field(description="Hub id, local folder, or a .gguf file.")
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path.")
    tokenizer: str | None = Field(None, description="Tokenizer source when it differs from the model.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None
    init_from_teacher_every: int | None = Field(
        None, ge=1, description="Distillation: build the student from objective.teacher, keeping every k-th "
        "transformer block (ceil(n/k) blocks evenly spaced from the first to the last, DistilBERT's "
        "initialisation); name_or_path still supplies the tokenizer.")


class SplitConfig(Section):
    validation_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    validation_file: str | None = None


class DataConfig(Section):
    train: str | list[str] = Field(description="File path(s) or a hub dataset id.")
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text", "text_label", "tokens",
                    "preference", "unpaired_preference"] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map canonical field -> column in your data."
    )
    column_names: list[str] | None = Field(
        None, min_length=1, description="Header for CSV/TSV files without a header row, e.g. [text, label]."
    )
    hub_split: str = "train"
    hub_config: str | None = None
    max_length: int = Field(1024, gt=8)
    truncation: Literal["right", "left", "drop"] = "right"
    packing: bool | None = None  # None: on for objectives that benefit (sft, causal_lm)
    train_on_prompt: bool = False
    system_prompt: str | None = None
    skip_invalid: bool = False
    shuffle: bool = True
    max_samples: int | None = Field(None, gt=0, description=(
        "Keep this many rows: taken after the seeded shuffle (training.seed), so a random sample of the "
        "file, not its first rows (with shuffle: false, the first rows); the validation split comes from them."))
    split: SplitConfig = Field(default_factory=SplitConfig)


# Each method owns its section (method_config.py); `MethodConfig(type=..., ...)` builds one.
MethodConfig = method_config

# Each objective owns its section (objective_config.py); `ObjectiveConfig(type=..., ...)` builds one.
ObjectiveConfig = objective_config


class TrainingConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_minutes: float | None = Field(
        None, gt=0, description="A wall-clock budget (training and evaluation): the run stops after the step that "
                                "spends it, then ends as usual (final evaluation, saved model). The schedule still "
                                "spans max_steps / epochs; a resumed run gets a new budget.")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, ge=1)
    # SIGINT/SIGTERM: finish the step, write a checkpoint there, exit non-zero with how to resume.
    checkpoint_on_interrupt: bool = True
    progress: bool = True


class ReferenceSet(Section):
    """What the model knew before tuning, measured before and after to show forgetting."""

    path: str = Field("default", description="'default' (shipped general text) or a data file.")
    name: str | None = None
    kind: Literal["perplexity", "task"] = "perplexity"
    metrics: list[str] = Field(default_factory=lambda: ["exact_match"], description="For kind 'task'.")
    max_samples: int | None = Field(None, gt=0)


class EvalConfig(Section):
    every: int | None = Field(None, gt=0, description="Evaluate every N optimizer steps.")
    at_end: bool = True
    batch_size: int | None = Field(None, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    metric: str = "eval_loss"
    greater_is_better: bool = False
    forgetting: bool = Field(True, description="Measure reference sets before and after training.")
    reference: list[ReferenceSet] = Field(default_factory=lambda: [ReferenceSet()])
    reference_every_eval: bool = False


class WandbSection(Section):
    project: str = "tunesmith"
    entity: str | None = None
    name: str | None = None  # default: the run's name
    tags: list[str] = Field(default_factory=list)
    # offline by default: nothing leaves the machine until `wandb sync`.
    mode: Literal["offline", "online", "disabled"] = "offline"


class MlflowSection(Section):
    tracking_uri: str | None = None  # default: sqlite:///<run folder>/mlflow.db
    experiment: str = "tunesmith"


class TrackioSection(Section):
    project: str = "tunesmith"


class TrackingConfig(Section):
    tensorboard: bool = False
    wandb: WandbSection | None = None
    mlflow: MlflowSection | None = None
    trackio: TrackioSection | None = None

    @model_validator(mode="before")
    @classmethod
    def _switches(cls, data):
        """`wandb: true` (or mlflow / trackio) turns one on with its defaults; false turns it off."""
        if isinstance(data, dict):
            data = {k: ({} if v is True else None if v is False else v) if k in ("wandb", "mlflow", "trackio") else v
                    for k, v in data.items()}
        return data


class OutputConfig(Section):
    dir: str = "runs/{name}"
    name: str | None = None
    overwrite: bool = False
    save_model: bool = True
    model_card: bool = True
    card_base_model: str | None = Field(
        None, description="Hub id written as base_model in the card (default: model.name_or_path)."
    )
    license: str = Field("other", description="License written into the model card.")


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    method: MethodConfigUnion = Field(default_factory=method_config)
    objective: ObjectiveConfigUnion = Field(default_factory=objective_config)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _known_types(cls, data: Any) -> Any:
        for name, known, default in (("method", METHOD_SECTIONS, "lora"), ("objective", OBJECTIVE_SECTIONS, "sft")):
            section = data.get(name) if isinstance(data, dict) else None
            kind = section.get("type", default) if isinstance(section, dict) else None
            if kind is not None and kind not in known:
                raise ValueError(_unknown(f"{name}.type", str(kind), known))
        return data

    @model_validator(mode="after")
    def _check_combination(self) -> "RunConfig":
        # Torch-free: the sections say what each method and objective refuses.
        why = support(self.method.type, self.objective.type)
        if why:
            raise ValueError(
                f"method.type '{self.method.type}' cannot train objective.type '{self.objective.type}': {why} "
                f"(see `tunesmith methods`)"
            )
        if self.data.packing and not self.objective.can_pack:  # a method that cannot pack says so in its check
            raise ValueError(f"data.packing: objective.type {self.objective.type} does not pack rows (each row "
                             "must stay one example); remove data.packing or set it to false")
        names = self.data.column_names or []
        if len(set(names)) != len(names):
            raise ValueError(f"data.column_names repeats a name: {names}")
        if self.model.init_from_teacher_every is not None:
            if self.objective.type != "distill":
                raise ValueError("model.init_from_teacher_every builds the student from objective.teacher; "
                                 f"it needs objective.type distill, not '{self.objective.type}'")
            if self.method.artifact != "model":
                raise ValueError(
                    f"model.init_from_teacher_every: method.type '{self.method.type}' saves weights that reload "
                    "onto model.name_or_path, not onto the thinned student; use method.type full or freeze")
        problems = self.method.check(self) + self.objective.check(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        if self.eval.early_stopping_patience and not (self.eval.every and self.has_validation):
            raise ValueError(
                "eval.early_stopping_patience needs eval.every and a validation split "
                "(data.split.validation_ratio or data.split.validation_file)"
            )
        if self.training.precision == "fp16" and self.method.type == "full":
            raise ValueError(
                "training.precision: fp16 with full fine-tuning needs fp32 master weights; "
                "use bf16 or fp32"
            )
        return self

    @property
    def has_validation(self) -> bool:
        return self.data.split.validation_ratio > 0 or self.data.split.validation_file is not None

    @property
    def run_name(self) -> str:
        if self.output.name:
            return self.output.name
        base = Path(self.model.gguf_file or self.model.name_or_path).stem.split("/")[-1]
        return f"{base}-{self.method.type}-{self.objective.type}"

    @property
    def packing_enabled(self) -> bool:
        if self.data.packing is not None:
            return self.data.packing
        return self.objective.packs and self.method.packs


def _unknown(path: str, value: str, known: Any) -> str:
    names = sorted(known)
    hint = difflib.get_close_matches(value, names, n=1)
    suggestion = f" — did you mean '{hint[0]}'?" if hint else ""
    return f"{path}: unknown value '{value}'{suggestion} (known: {', '.join(names)})"


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names allowed at a location, to suggest the right key for a typo."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _owned_by(head: str, key: str, sections: dict) -> str:
    """Which types a misplaced key belongs to: 'loraplus_lr_ratio' under ia3 is a LoRA-family setting."""
    types = [name for name, s in sections.items() if key in s.model_fields]
    if not types:
        return ""
    families = sorted({getattr(sections[t], "family", "") for t in types} - {""})
    where = f"{head}.type {', '.join(types)}"
    return f"; it is a setting of {' and '.join(families)} ({where})" if families else f"; it is a setting of {where}"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        section = None
        unions = {"objective": OBJECTIVE_SECTIONS, "method": METHOD_SECTIONS}
        head = e["loc"][0] if e["loc"] else None
        if head in unions and len(e["loc"]) > 1 and e["loc"][1] in unions[head]:
            section = unions[head][e["loc"][1]]
            e = {**e, "loc": (head, *e["loc"][2:])}  # the union's tag is not a key of the YAML
        loc = tuple(p for p in e["loc"] if not isinstance(p, int))
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            allowed = list(section.model_fields) if section and len(loc) == 2 else _fields_of(RunConfig, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"{path}: unknown key" + (f" — did you mean '{hint[0]}'?" if hint else "")
            if allowed:
                msg += f" (allowed: {', '.join(allowed)}"
                msg += f" for {head}.type {section.model_fields['type'].default})" if section else ")"
            if section is not None and len(loc) == 2:
                msg += _owned_by(head, str(loc[-1]), unions[head])
        elif e["type"] == "value_error" and not e["loc"]:
            msg = str(e["msg"]).removeprefix("Value error, ")
        else:
            msg = f"{path}: {e['msg']}"
            if "input" in e and e["type"] != "missing":
                msg += f" (got {e['input']!r})"
        lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def flat_keys(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as {"section.key": value}."""
    out: dict[str, Any] = {}
    for k, v in (data or {}).items():
        if isinstance(v, dict):
            out |= flat_keys(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_yaml_mapping(path: Path, what: str, expected: str) -> dict:
    """A YAML file's top-level mapping, or a ConfigError naming the file and what is wrong."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                          f"{exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected section.key=value (e.g. training.max_steps=100)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}  # absent, or a YAML section left empty
            if not isinstance(node[k], dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def load_config(
    source: str | Path | dict | RunConfig, overrides: list[str] | None = None
) -> RunConfig:
    """Load and validate a run config from a YAML path, a dict or a RunConfig."""
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        source = source.model_dump(mode="json")
    if isinstance(source, (str, Path)):
        path = Path(source)
        data = read_yaml_mapping(path, "config file", "a mapping of sections at the top level")
        # A section whose keys are all commented out reads as null: it means "defaults".
        data = {k: v for k, v in data.items() if v is not None}
        base_dir = path.parent
    else:
        data, base_dir = dict(source), None
    data = apply_overrides(data, overrides or [])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    if base_dir is not None:
        _resolve_relative_paths(cfg, base_dir)
    return cfg


def resolve_against(p: str | None, base_dir: Path) -> str | None:
    """A path a YAML names: against the YAML's folder when it exists there and not from here
    (hub ids, pkg:// sources and names like 'default' pass through)."""
    if p is None or "://" in p or Path(p).exists():
        return p
    candidate = base_dir / p
    return str(candidate) if candidate.exists() else p


def _resolve_relative_paths(cfg: RunConfig, base_dir: Path) -> None:
    """Data files named relative to the YAML resolve against the YAML's folder when they exist there."""

    def fix(p: str) -> str:
        return resolve_against(p, base_dir)

    def fix_all(value: str | list[str]) -> str | list[str]:
        return [fix(p) for p in value] if isinstance(value, list) else fix(value)

    cfg.data.train = fix_all(cfg.data.train)
    if cfg.data.split.validation_file:
        cfg.data.split.validation_file = fix(cfg.data.split.validation_file)
    for key in ("teacher", "unlabeled", "reward_model"):
        if getattr(cfg.objective, key, None):
            setattr(cfg.objective, key, fix_all(getattr(cfg.objective, key)))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
