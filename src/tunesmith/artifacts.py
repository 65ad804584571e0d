"""Trained artifacts: what a run saves next to its weights, and loading any model back.

Every artifact folder holds `tunesmith.json` (method, objective, base model, labels), so a
trained result reloads with one call whatever the method — a peft adapter, tunesmith's own
bottleneck adapters or probe head, or a complete transformers model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, RunConfig
from .errors import ConfigError

MANIFEST = "tunesmith.json"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    manifest: dict = field(default_factory=dict)


def write_manifest(out: Path, cfg: RunConfig, *, base_source: str, labels: list[str],
                   tasks: list[dict] | None = None) -> None:
    """`tasks`: a multi-task run's tasks (name, objective, labels, head file); the artifact itself is the first
    task's model, so it loads like a single-task one."""
    from .methods import METHODS
    from .objectives import build_objective

    # The run's instance: a distill student's head and generativity are its task's.
    section = cfg.tasks[0].objective if cfg.tasks else cfg.objective
    method, objective = METHODS[cfg.method.type], build_objective(section)
    manifest = {
        "method": method.name,
        "artifact": method.artifact,
        "objective": objective.name,
        "auto_class": objective.auto_class,
        "generative": objective.generative,
        "base_model": cfg.model.name_or_path,
        "base_gguf_file": cfg.model.gguf_file,
        "base_source": base_source,
        # What else names the exact base: a hub revision (a run pinned to one must reload on it, not on main).
        "base_revision": cfg.model.revision,
        "base_trust_remote_code": cfg.model.trust_remote_code,
        "labels": labels,
        "init_seed": cfg.training.seed,
        "method_config": cfg.method.model_dump(mode="json"),
        "objective_config": section.model_dump(mode="json"),
        **({"tasks": tasks} if tasks else {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _artifact_in(folder: Path) -> Path | None:
    """The artifact folder a path names: itself, or the adapter/model folder of a run folder."""
    if (folder / MANIFEST).is_file():
        return folder
    for sub in ("adapter", "model"):
        if (folder / sub / MANIFEST).is_file():
            return folder / sub
    return None


def read_manifest(artifact: Path) -> dict:
    """The manifest of an artifact folder (one `_artifact_in` found)."""
    return json.loads((artifact / MANIFEST).read_text())


def _task_model(model, tokenizer, found: Path, manifest: dict, task: str, dtype: torch.dtype):
    """The model that answers `task`: the first model itself, or the task's saved head on its backbone."""
    from safetensors.torch import load_file

    from .objective_config import lenient_objective_config
    from .objectives import OBJECTIVES, TaskInfo
    from .objectives.multitask import head_model, load_head

    tasks = {t["name"]: t for t in manifest.get("tasks", [])}
    if task not in tasks:
        known = f"its tasks are {', '.join(tasks)}" if tasks else "it was not trained with tasks:"
        raise ConfigError(f"task '{task}': not a task of {found} ({known})")
    entry = tasks[task]
    picked = {**manifest, "task": task, "objective": entry["objective"], "auto_class": entry["auto_class"],
              "labels": entry["labels"], "objective_config": entry["objective_config"]}
    if entry.get("adapter"):  # the task's own adapter (multitask.shared: false) replaces the first task's
        from .methods import METHODS

        METHODS[manifest["method"]].load_task_adapter(model, found / entry["adapter"], entry["adapter_id"])
    if entry.get("head") is None:
        return model, picked
    sub = OBJECTIVES[entry["objective"]](lenient_objective_config(entry["objective_config"]))
    kwargs = sub.model_kwargs(sub.cfg, TaskInfo(entry["labels"]), tokenizer)
    head = head_model(model, entry["auto_class"], kwargs, manifest.get("init_seed", 0))
    load_head(head, load_file(found / entry["head"]))
    if dtype != torch.float32:
        head.to(dtype)
    return head.eval(), picked


def _base_config(manifest: dict) -> ModelConfig:
    source = manifest["base_source"]
    # The materialized source (a GGUF cache folder, say) may be gone; fall back to what the user named.
    pinned = {"revision": manifest.get("base_revision"),
              "trust_remote_code": bool(manifest.get("base_trust_remote_code", False))}
    if not Path(source).exists() and source.startswith(("/", ".", "~")):
        return ModelConfig(name_or_path=manifest["base_model"], gguf_file=manifest.get("base_gguf_file"), **pinned)
    return ModelConfig(name_or_path=source, **pinned)


def load_trained(source: str | Path, *, adapter: str | Path | None = None, dtype: torch.dtype | None = None,
                 full_precision_base: bool = False, task: str | None = None) -> Loaded:
    """A model ready to use: a tunesmith run or artifact folder, a peft adapter folder, or any base model.

    `source` may be a hub id, a local transformers folder, a `.gguf` file or `pkg://` GGUF, a
    tunesmith run folder (its adapter/ or model/ is used) or an artifact folder; `adapter` adds
    a peft adapter on top of a base model. `full_precision_base` puts a QLoRA adapter on the
    unquantized base (for merging it into the weights, which 4-bit storage would round). `task` picks
    one task of a multi-task run: the model with that task's head on the shared backbone (default: the
    first task's).
    """
    from .methods import METHODS, MethodContext
    from .models import load_model, load_tokenizer, materialize
    from .method_config import lenient_method_config
    from .objective_config import lenient_objective_config
    from .objectives import OBJECTIVES, TaskInfo

    dtype = dtype or torch.float32
    path = Path(str(source)).expanduser()
    found = _artifact_in(path) if path.is_dir() else None
    if found is not None:
        manifest = read_manifest(found)
        objective = OBJECTIVES[manifest["objective"]](lenient_objective_config(manifest["objective_config"]))
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(found)), str(found))
        labels = manifest.get("labels") or []
        kwargs = objective.model_kwargs(objective.cfg, TaskInfo(labels),
                                        tokenizer)
        if manifest["artifact"] == "model":
            model = load_model(ModelConfig(name_or_path=str(found)), dtype, str(found),
                               auto_class=manifest["auto_class"], tokenizer=tokenizer, **kwargs)
        else:
            method = METHODS[manifest["method"]]
            method_cfg = lenient_method_config(manifest["method_config"])
            if full_precision_base and manifest["method"] == "qlora":
                method = METHODS["lora"]
            base_cfg = _base_config(manifest)
            base_kwargs = {**kwargs, **method.load_kwargs(method_cfg, "fp32")}
            base = load_model(base_cfg, dtype, materialize(base_cfg), auto_class=manifest["auto_class"],
                              tokenizer=tokenizer, init_seed=manifest.get("init_seed", 0), **base_kwargs)
            model = method.load(base, found, method_cfg, MethodContext(objective, tokenizer, manifest["base_source"]))
        model.eval()
        if adapter is not None:
            raise ConfigError(f"--adapter: {source} is already a trained artifact; pass its base model instead")
        if task is not None:
            model, manifest = _task_model(model, tokenizer, found, manifest, task, dtype)
        return Loaded(model, tokenizer, manifest)
    if task is not None:
        raise ConfigError(f"task '{task}': {source} is not a tunesmith multi-task artifact")

    if path.is_dir() and (path / "adapter_config.json").is_file() and adapter is None:
        # A plain peft adapter folder: its config names the base model.
        adapter_cfg = json.loads((path / "adapter_config.json").read_text())
        base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path}: adapter_config.json names no base model; pass it with --model and --adapter")
        source, adapter = base, path

    model_cfg = ModelConfig(name_or_path=str(source))
    folder = materialize(model_cfg)
    tokenizer = load_tokenizer(model_cfg, folder)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    auto_class = "AutoModelForSeq2SeqLM" if getattr(config, "is_encoder_decoder", False) else "AutoModelForCausalLM"
    model = load_model(model_cfg, dtype, folder, auto_class=auto_class)
    manifest = {"method": None, "objective": "seq2seq" if "Seq2Seq" in auto_class else "causal_lm",
                "auto_class": auto_class, "generative": True, "base_model": str(source), "labels": []}
    if adapter is not None:
        from peft import PeftModel

        apath = Path(str(adapter)).expanduser()
        if not (apath / "adapter_config.json").is_file():
            inner = _artifact_in(apath)
            if inner is None or not (inner / "adapter_config.json").is_file():
                raise ConfigError(f"--adapter: no peft adapter (adapter_config.json) in {apath}")
            apath = inner
        model = PeftModel.from_pretrained(model, str(apath))
        manifest["method"] = "adapter"
        manifest["adapter"] = str(apath)
    model.eval()
    return Loaded(model, tokenizer, manifest)
