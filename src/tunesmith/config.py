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
from .objective_config import ALL_SECTIONS as OBJECTIVE_SECTIONS
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
    head_from: str | None = Field(
        None, description="LP-FT: a method.type linear_probe run (folder) whose trained head the task head starts "
        "from instead of random weights (classification, token_classification, reward).")


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
    store: Literal["memory", "arrow"] = Field(
        "memory", description="arrow: stream the sources chunk by chunk into a tokenized, memory-mapped Arrow "
        "file, reused by later runs with the same data and settings (docs/data_scale.md).")
    streaming: bool = Field(False, description="Hub datasets: read as a stream (nothing downloaded whole), into "
                                               "the Arrow store (needs store: arrow).")

    @model_validator(mode="after")
    def _store(self) -> "DataConfig":
        if self.streaming and self.store != "arrow":
            raise ValueError("data.streaming: true writes the stream into the tokenized Arrow store, which is what "
                             "a resumed run reads again; set data.store: arrow as well")
        return self


# Objectives whose rows depend on no statistic of the whole data set: what data.store: arrow can stream.
STREAMABLE_OBJECTIVES = ("sft", "causal_lm", "masked_lm", "seq2seq")


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
    head_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the fresh task head (classification, token classification, "
                                "reward score; a BERT pooler with it); default training.learning_rate. Follows the "
                                "same schedule.")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32", "int8"] = Field(
        "auto", description="auto: bf16 or fp32, whichever trains fastest here (timed, cached). int8 (CPU, LoRA, "
                            "rsLoRA, LoRA-FA; objectives without a reference or sampling): fp32, with the frozen base "
                            "layers' matmuls in int8 while training.")
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


# Objectives a task of a multi-task run may have: they need no second model and write no rows of
# their own. Their model family: a task of family None (a classification head) sits on any backbone.
TASK_FAMILIES: dict[str, str | None] = {"sft": "decoder", "causal_lm": "decoder", "masked_lm": "encoder",
                                        "seq2seq": "seq2seq", "classification": None, "token_classification": None}


class TaskConfig(Section):
    """One task of a multi-task run: its own data, objective and (for classification) head."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Names the task in metrics, cards and load_trained.")
    data: DataConfig
    objective: ObjectiveConfigUnion = Field(default_factory=objective_config)
    loss_weight: float = Field(1.0, gt=0, description="Multiplies the task's loss in every step that draws it.")
    weight: float | None = Field(None, gt=0, description="Sampling weight (multitask.sampling: weights only).")

    @model_validator(mode="before")
    @classmethod
    def _task_objective(cls, data: Any) -> Any:
        section = data.get("objective") if isinstance(data, dict) else None
        kind = section.get("type", "sft") if isinstance(section, dict) else None
        if kind is not None and kind not in TASK_FAMILIES:
            raise ValueError(f"objective.type '{kind}' cannot be a task of a multi-task run (it needs a second model "
                             f"or writes its own rows); allowed: {', '.join(TASK_FAMILIES)}")
        return data


class MultiTaskConfig(Section):
    """How a multi-task run draws its micro-batches and weighs the tasks' losses."""

    sampling: Literal["proportional", "temperature", "equal", "weights"] = Field(
        "proportional", description="proportional: every task's batches once per epoch, in a seeded order; "
        "temperature: task t drawn with probability ~ rows_t^(1/T); equal: round-robin; weights: ~ tasks[i].weight.")
    temperature: float = Field(2.0, gt=0, description="T of temperature sampling (1 = proportional, large = equal).")
    uncertainty_weighting: bool = Field(
        False, description="Learn one log-variance s_t per task; the loss is exp(-s_t) L_t + s_t (Kendall et al. 2018).")
    shared: bool = Field(
        True, description="LoRA-family, IA3 and bottleneck-adapter methods: one set of adapter weights trained by "
        "every task (true), or each task its own adapter on the shared frozen base (false).")


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    method: MethodConfigUnion = Field(default_factory=method_config)
    objective: ObjectiveConfigUnion = Field(default_factory=objective_config)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tasks: list[TaskConfig] | None = Field(None, min_length=1, description="A multi-task run (docs/multitask.md).")
    multitask: MultiTaskConfig = Field(default_factory=MultiTaskConfig)

    @model_validator(mode="before")
    @classmethod
    def _tasks_fill(cls, data: Any) -> Any:
        """A multi-task run names data and objective per task: the run's own `data` is the first task's and its
        objective is `multitask` (what every run-level reader of cfg.data and cfg.objective then sees)."""
        if not isinstance(data, dict) or not data.get("tasks"):
            return data
        for key, allowed in (("data", None), ("objective", {"type": "multitask"})):
            if data.get(key) not in (None, allowed):
                raise ValueError(f"{key}: a multi-task run takes its {key} from each task (tasks[i].{key}); "
                                 f"remove the top-level {key} section")
        first = data["tasks"][0]
        return {**data, "data": first.get("data") if isinstance(first, dict) else None,
                "objective": {"type": "multitask"}}

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
        if self.tasks:
            return self._check_tasks()
        if self.objective.type == "multitask":
            raise ValueError("objective.type multitask: list the tasks under `tasks:` (docs/multitask.md)")
        # Torch-free: the sections say what each method and objective refuses.
        why = support(self.method.type, self.objective.type)
        if why:
            raise ValueError(
                f"method.type '{self.method.type}' cannot train objective.type '{self.objective.type}': {why} "
                f"(see `tunesmith methods`)"
            )
        if self.data.store == "arrow" and self.objective.type not in STREAMABLE_OBJECTIVES:
            raise ValueError(f"data.store: arrow streams rows for objective.type {', '.join(STREAMABLE_OBJECTIVES)}; "
                             f"'{self.objective.type}' needs the whole data set first (labels, pairs, prompts): "
                             "use data.store: memory")
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
        problems = (self.method.check(self) + self.objective.check(self) + self._head_lr_problems()
                    + self._head_from_problems())
        if problems:
            raise ValueError("\n  ".join(problems))
        if self.eval.early_stopping_patience and not (self.eval.every and self.has_validation):
            raise ValueError(
                "eval.early_stopping_patience needs eval.every and a validation split "
                "(data.split.validation_ratio or data.split.validation_file)"
            )
        if self.training.precision == "int8" and not self.method.int8_base:
            raise ValueError(
                f"training.precision: int8 runs the frozen fp32 base layers under tunesmith's fused LoRA layer as "
                f"int8 matmuls; method.type '{self.method.type}' trains without that layer (int8 works with lora, "
                "rslora and lora_fa); use auto, bf16 or fp32"
            )
        if self.training.precision == "int8" and self.model.dtype not in ("auto", "fp32"):
            raise ValueError(
                f"training.precision: int8 quantizes fp32 base weights; model.dtype {self.model.dtype} stores them "
                "in another dtype — leave model.dtype at auto"
            )
        if self.training.precision == "fp16" and self.method.type == "full":
            raise ValueError(
                "training.precision: fp16 with full fine-tuning needs fp32 master weights; "
                "use bf16 or fp32"
            )
        return self

    def _no_head(self, field: str, purpose: str, verb: str) -> str:
        """`field` set for an objective without a task head: which objectives have one."""
        *first, last = [name for name, section in OBJECTIVE_SECTIONS.items() if section.adds_head]
        return (f"{field}: objective.type '{self.objective.type}' adds no task head{purpose}; only "
                f"{', '.join(first)} and {last} {verb}")

    def _head_lr_problems(self) -> list[str]:
        if self.training.head_learning_rate is None:
            return []
        if not self.objective.adds_head:
            return [self._no_head("training.head_learning_rate", "", "train a fresh head")]
        if self.method.type == "lora_fa" or getattr(self.method, "loraplus_lr_ratio", None) is not None:
            return ["training.head_learning_rate: LoRA-FA and LoRA+ (method.loraplus_lr_ratio) build their own "
                    "optimizer groups; use one or the other"]
        return []

    def _head_from_problems(self) -> list[str]:
        if self.model.head_from is None:
            return []
        if not self.objective.adds_head:
            return [self._no_head("model.head_from", " to start from a probe", "do")]
        if self.method.type == "linear_probe":
            return ["model.head_from starts fine-tuning from a linear probe's head; this run is the probe itself "
                    "(use another method.type, e.g. lora or full)"]
        return []

    def _check_tasks(self) -> "RunConfig":
        """A multi-task run: each task checked as its own run would be, then what the tasks must share."""
        tasks, problems = self.tasks, []
        names = [t.name for t in tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(f"tasks: the task name {', '.join(map(repr, twice))} is used twice; each task needs its "
                            "own name")
        if self.training.head_learning_rate is not None:
            problems.append("training.head_learning_rate is for single-task runs for now: a multi-task run's heads "
                            "learn at training.learning_rate")
        if self.model.head_from is not None:
            problems.append("model.head_from is for single-task runs: a multi-task run has one head per task")
        arrow = [t.name for t in tasks if t.data.store == "arrow"]
        if arrow:
            problems.append(f"tasks: data.store: arrow is for single-task runs for now (set on {', '.join(arrow)})")
        families = {t.name: TASK_FAMILIES[t.objective.type] for t in tasks if TASK_FAMILIES[t.objective.type]}
        if len(set(families.values())) > 1:
            shown = ", ".join(f"{n} ({t.objective.type}: {families[n]})" for n, t in zip(names, tasks) if n in families)
            problems.append(f"tasks: the objectives cannot share one model (one backbone for every task): {shown}; "
                            "encoder, decoder and encoder-decoder objectives need different model families")
        if self.method.no_multitask and len(tasks) > 1:
            problems.append(f"method.type {self.method.type} {self.method.no_multitask}; use a LoRA-family, "
                            "adapter, bitfit, freeze or full method for a multi-task run")
        elif not self.multitask.shared and self.method.no_task_adapters:
            problems.append(f"multitask.shared: false gives each task its own adapter, which method.type "
                            f"{self.method.type} cannot: {self.method.no_task_adapters}; use lora, dora, rslora, "
                            "qlora, ia3 or adapter, or multitask.shared: true")
        weighted = [t.name for t in tasks if t.weight is not None]
        if self.multitask.sampling == "weights" and len(weighted) != len(tasks):
            missing = [n for n in names if n not in weighted]
            problems.append(f"multitask.sampling: weights needs a weight on every task; missing on {', '.join(missing)}")
        elif self.multitask.sampling != "weights" and weighted:
            problems.append(f"tasks[].weight is read only with multitask.sampling: weights (set on "
                            f"{', '.join(weighted)}, sampling is {self.multitask.sampling})")
        for i, task in enumerate(tasks):
            # Each task is checked as the single-task run it would be, its messages prefixed with where it is.
            alone = self.model_copy(update={"tasks": None, "data": task.data, "objective": task.objective,
                                            "training": self.training.model_copy(update={"head_learning_rate": None}),
                                            "model": self.model.model_copy(update={"head_from": None}),
                                            "eval": self.eval.model_copy(update={"early_stopping_patience": None})})
            try:
                alone._check_combination()
            except ValueError as exc:
                problems += [f"tasks[{i}] ({task.name}): {line.strip()}" for line in str(exc).splitlines()]
        if problems:
            raise ValueError("\n  ".join(problems))
        if self.eval.early_stopping_patience and not (self.eval.every and self.has_validation):
            raise ValueError("eval.early_stopping_patience needs eval.every and a validation split on a task "
                             "(tasks[i].data.split)")
        return self

    @property
    def has_validation(self) -> bool:
        datas = [t.data for t in self.tasks] if self.tasks else [self.data]
        return any(d.split.validation_ratio > 0 or d.split.validation_file is not None for d in datas)

    @property
    def run_name(self) -> str:
        if self.output.name:
            return self.output.name
        base = Path(self.model.gguf_file or self.model.name_or_path).stem.split("/")[-1]
        return f"{base}-{self.method.type}-{self.objective.type}"

    @property
    def packing_enabled(self) -> bool:
        return self.packs(self.data, self.objective)

    def packs(self, data: DataConfig, objective: ObjectiveSection) -> bool:
        """Whether rows of `data` for `objective` are packed (a multi-task run decides per task)."""
        if data.packing is not None:
            return data.packing
        return objective.packs and self.method.packs

    def plain(self) -> dict:
        """The config as the user writes it: a multi-task run without the data and objective filled from its tasks."""
        return self.model_dump(mode="json", exclude={"data", "objective"} if self.tasks else None)


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
        # The union's tag is not a key of the YAML: drop it (also inside a task: tasks.1.objective).
        at = next((j for j, p in enumerate(e["loc"][:-1]) if p in unions and e["loc"][j + 1] in unions[p]), None)
        head = e["loc"][at] if at is not None else (e["loc"][0] if e["loc"] else None)
        if at is not None:
            section = unions[head][e["loc"][at + 1]]
            e = {**e, "loc": (*e["loc"][:at + 1], *e["loc"][at + 2:])}
        loc = tuple(p for p in e["loc"][at or 0:] if not isinstance(p, int))
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
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            msg = f"{path}: {msg}" if e["loc"] else msg
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
        source = source.plain()
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
    for task in cfg.tasks or []:
        task.data.train = fix_all(task.data.train)
        if task.data.split.validation_file:
            task.data.split.validation_file = fix(task.data.split.validation_file)
    if cfg.tasks:
        cfg.data = cfg.tasks[0].data  # validated as its own copy: follow the first task's resolved paths
    cfg.model.head_from = fix(cfg.model.head_from)
    for key in ("teacher", "unlabeled", "reward_model"):
        if getattr(cfg.objective, key, None):
            setattr(cfg.objective, key, fix_all(getattr(cfg.objective, key)))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.plain(), sort_keys=False)
