"""The second models of a run: a distillation teacher, PPO's reward model; loaded once, frozen, and
checked against the trained model before training.

The teacher is anything tunesmith loads: a run folder or artifact (any method: a LoRA teacher
is its base with the adapter on), a peft adapter folder, a transformers model folder, a hub id
or a GGUF file. Plain models (no tunesmith manifest) are loaded with the head the distilled
task needs (masked LM, sequence classification, causal LM), not `load_trained`'s causal-LM
default.

Logit distillation compares two distributions over the same items, and the teacher reads the
student's token ids, so teacher and student must share one tokenizer (and, for token tasks,
one output vocabulary; for classification, the same labels in the same order). A mismatch is
refused here, before the student is loaded, with both sizes in the message; computing a KL over
mismatched token ids or labels would train on a meaningless signal. The same holds for a
reward model, which scores the policy's token ids.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ConfigError

# Tasks whose KD compares distributions over the vocabulary (as opposed to class logits).
TOKEN_TASKS = ("sft", "causal_lm", "masked_lm")


def _tunesmith_folder(source: str) -> bool:
    from .artifacts import _artifact_in

    path = Path(source).expanduser()
    return path.is_dir() and (_artifact_in(path) is not None or (path / "adapter_config.json").is_file())


def source_model(source: str):
    """The model a second model's source stands on: a full run's saved model, an adapter's base (a tunesmith
    run or artifact, or a peft adapter folder), or the source itself."""
    import json

    from .artifacts import _artifact_in, _base_config, read_manifest
    from .config import ModelConfig

    path = Path(source).expanduser()
    if path.is_dir():
        found = _artifact_in(path)
        if found is not None:
            manifest = read_manifest(found)
            return ModelConfig(name_or_path=str(found)) if manifest["artifact"] == "model" else _base_config(manifest)
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if base:
                return ModelConfig(name_or_path=base)
    return ModelConfig(name_or_path=source)


def check_source(source: str, field: str) -> None:
    """Refuse, naming `field`, a teacher or reward model source that is missing or no model (before any loading)."""
    from .models import resolve_source

    resolve_source(source_model(source), field)


def load_teacher(source: str, *, auto_class: str, dtype: torch.dtype, field: str = "objective.teacher",
                 kwargs: dict | None = None) -> tuple[nn.Module, Any]:
    """(teacher in eval mode with no parameter that learns, its tokenizer); `field` names it in errors,
    `kwargs` go to from_pretrained for a plain model."""
    from .artifacts import load_trained

    if _tunesmith_folder(source):
        loaded = load_trained(source, dtype=dtype)
        model, tokenizer = loaded.model, loaded.tokenizer
        found = loaded.manifest.get("auto_class")
        if found and found != auto_class:
            raise ConfigError(
                f"{field}: {source} is a {found} model (objective '{loaded.manifest.get('objective')}'); "
                f"{'the distilled task needs' if field == 'objective.teacher' else 'it must be'} a {auto_class} "
                f"model{' with the same head' if field == 'objective.teacher' else ''}"
            )
    else:
        from .config import ModelConfig
        from .models import load_model, load_tokenizer, materialize

        from .methods.base import HEAD_NAMES

        model_cfg = ModelConfig(name_or_path=source)
        folder = materialize(model_cfg)
        tokenizer = load_tokenizer(model_cfg, folder)
        info: dict = {}
        model = load_model(model_cfg, dtype, folder, auto_class=auto_class, tokenizer=tokenizer, loading_info=info,
                           **(kwargs or {}))
        # A checkpoint without this head gets a random one: distilling from it (or rewarding by it) teaches noise.
        fresh = sorted(k for k in (info.get("missing_keys") or ())
                       if set(k.split(".")) & {*HEAD_NAMES, "pooler"})
        if fresh:
            raise ConfigError(
                f"{field}: {source} has no trained {auto_class} head (the checkpoint lacks "
                f"{', '.join(fresh[:3])}{' ...' if len(fresh) > 3 else ''}), so it would be drawn at random; "
                f"give a model trained for this task (a tunesmith run of it, or a checkpoint with that head)")
    model.eval().requires_grad_(False)
    return model, tokenizer


def _config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vocab_size(model_or_config: Any) -> int | None:
    return getattr(_config(model_or_config), "vocab_size", None)


def _label_names(config: Any) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label, key=int)]
    # transformers' placeholder names carry no meaning: only the number of labels can be compared.
    return None if all(re.fullmatch(r"LABEL_\d+", str(n)) for n in names) else names


def same_tokenizer(theirs_tokenizer: Any, tokenizer: Any, field: str, purpose: str) -> None:
    """Refuse a second model (teacher, reward model) whose tokenizer maps tokens to other ids than the run's:
    it reads the run's token ids."""
    whose = "teacher" if field == "objective.teacher" else "reward model"
    ours_name = "student" if field == "objective.teacher" else "policy"
    if len(theirs_tokenizer) != len(tokenizer):
        hint = (" (a teacher with another tokenizer needs sequence-level distillation: train on its generations "
                "with sft)" if field == "objective.teacher" else "")
        raise ConfigError(
            f"{field}: the {whose}'s tokenizer has {len(theirs_tokenizer)} tokens, the {ours_name}'s "
            f"{len(tokenizer)}; {purpose} needs both to share one tokenizer{hint}"
        )
    theirs, ours = theirs_tokenizer.get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[:1]
        example = f" (e.g. token id {differ[0][1]})" if differ else ""
        raise ConfigError(
            f"{field}: the {whose}'s tokenizer ({len(theirs)} tokens) and the {ours_name}'s "
            f"({len(ours)} tokens) map tokens to different ids{example}; {purpose} needs one shared tokenizer"
        )


def check_teacher(teacher: Any, student: Any, *, task: str, labels: list[str] | None = None,
                  hidden: bool = False, teacher_tokenizer=None, tokenizer=None) -> None:
    """Refuse a teacher whose vocabulary, labels or (for the hidden-state loss) width differ from the student's.

    `teacher` and `student` are models or their configs; tokenizers are compared when both are given.
    """
    if teacher_tokenizer is not None and tokenizer is not None:
        same_tokenizer(teacher_tokenizer, tokenizer, "objective.teacher", "distillation")
    t_cfg, s_cfg = _config(teacher), _config(student)
    if task in TOKEN_TASKS:
        t_vocab, s_vocab = _vocab_size(t_cfg), _vocab_size(s_cfg)
        if t_vocab is not None and s_vocab is not None and t_vocab != s_vocab:
            raise ConfigError(
                f"objective.teacher: the teacher predicts over a vocabulary of {t_vocab} tokens, the student over "
                f"{s_vocab}; logit distillation needs the same vocabulary (same tokenizer and vocabulary size)"
            )
    else:
        t_n = getattr(t_cfg, "num_labels", None)
        s_n = len(labels) if labels else getattr(s_cfg, "num_labels", None)
        if t_n is not None and s_n is not None and t_n != s_n:
            raise ConfigError(
                f"objective.teacher: the teacher classifies into {t_n} labels, the student into {s_n} "
                f"({labels or 'from its config'}); distillation needs the same labels in the same order"
            )
        t_names = _label_names(t_cfg)
        if labels and t_names is not None and t_names != list(labels):
            raise ConfigError(
                f"objective.teacher: the teacher's labels {t_names} are not the student's {list(labels)} "
                "(same names in the same order); set objective.labels to the teacher's order"
            )
    if hidden:
        t_h, s_h = getattr(t_cfg, "hidden_size", None), getattr(s_cfg, "hidden_size", None)
        if t_h != s_h:
            raise ConfigError(
                f"objective.hidden_weight: the hidden-state cosine loss needs the same hidden size; the teacher's "
                f"is {t_h}, the student's {s_h} (set hidden_weight to 0, or use model.init_from_teacher_every)"
            )


def prepare_teacher(section, *, auto_class: str, tokenizer, labels: list[str], dtype: torch.dtype,
                    student_config: Any | None, echo: Callable[[str], None]) -> nn.Module:
    """The run's teacher, loaded once and checked against the student's tokenizer and config.

    `student_config` is None when the student is built from the teacher (nothing to compare
    but the tokenizer).
    """
    teacher, teacher_tokenizer = load_teacher(section.teacher, auto_class=auto_class, dtype=dtype)
    check_teacher(teacher, student_config if student_config is not None else teacher, task=section.task,
                  labels=labels, hidden=section.hidden_weight > 0, teacher_tokenizer=teacher_tokenizer,
                  tokenizer=tokenizer)
    n = sum(p.numel() for p in teacher.parameters())
    echo(f"teacher: {section.teacher} ({type(teacher).__name__}, {n:,} parameters, frozen, "
         f"{str(dtype).split('.')[-1]})")
    return teacher


def prepare_reward_model(source: str, *, tokenizer, dtype: torch.dtype, echo: Callable[[str], None]) -> nn.Module:
    """PPO's reward model: loaded once with a one-output sequence-classification head, frozen, and checked
    against the policy's tokenizer (it scores the policy's token ids) before the policy loads."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model, model_tokenizer = load_teacher(source, auto_class="AutoModelForSequenceClassification", dtype=dtype,
                                          field="objective.reward_model", kwargs={"pad_token_id": pad})
    labels = getattr(_config(model), "num_labels", None)
    if labels != 1:
        raise ConfigError(f"objective.reward_model: {source} has {labels} outputs per sequence; a reward model has "
                          "one (train one with objective type reward)")
    if model_tokenizer is not None:
        same_tokenizer(model_tokenizer, tokenizer, "objective.reward_model", "PPO")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad  # its head reads each right-padded row's last non-pad token
    n = sum(p.numel() for p in model.parameters())
    echo(f"reward model: {source} ({type(model).__name__}, {n:,} parameters, frozen, {str(dtype).split('.')[-1]})")
    return model
