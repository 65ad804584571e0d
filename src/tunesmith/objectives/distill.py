"""Knowledge distillation: the student's own task loss mixed with matching a frozen teacher.

    loss = (1 - kd_ratio) * task loss + kd_ratio * KD loss  [+ hidden_weight * hidden-state cosine loss]

The task (`objective.task`: sft, causal_lm, masked_lm or classification) is a whole objective
that the distill objective wraps: it encodes and collates the data, counts the items, chooses
the model head, and its eval metrics are the run's. The KD loss compares the student's and the
teacher's distributions on exactly the items the task loss sums over, so both terms are sums
over the same items and the engine divides them by the same count:
  - sft / causal_lm: each labelled token's next-token distribution, with the LM head applied to
    the labelled positions only (`scoring.labelled_logits`, the core SFT scores with);
  - masked_lm: the masked positions;
  - classification: the class logits.
The KD term is `losses.distill_loss` (forward KL, reverse KL or TRL GKD's generalized JSD with
`beta`) at `temperature`, scaled by T² (Hinton et al., DistilBERT's L_ce) so that its gradients
keep their size next to the task's cross-entropy whatever the temperature; at the default
T = 1 the scaling is 1. The task loss is the task's own cross-entropy (class weights included)
computed from the same student logits: one student forward per batch.

`hidden_weight` adds DistilBERT's cosine loss between the last hidden states of student and
teacher over the real (non-padding) tokens, for the encoder tasks (masked_lm, classification);
it needs the same hidden size (`model.init_from_teacher_every` gives that). Its batch mean is
counted once per task item, so it keeps its weight next to the per-item terms.

`unlabeled` (classification) adds texts without labels to the training rows — Hinton et al.'s
transfer set: on them the teacher's distribution is the only target (their task term is 0, and
task_loss is logged over the labelled rows), so a student can learn from far more in-domain
text than was ever labelled. Every row still counts as one item, labelled or not.

The teacher (`objective.teacher`, anything tunesmith loads) is loaded once by `api.train`
(teacher.py), frozen, in the run's compute dtype, checked against the student's tokenizer and
labels before training, and lent to every loss call through `StepContext.teacher`; its
forward runs without gradients.

Evaluation reports the task's own numbers: eval_loss is the task loss (so eval_loss, eval
perplexity and accuracy compare with a run of the task alone, and a reloaded student scores
the same without its teacher), plus eval_kd_loss, eval_task_loss (and eval_hidden_loss).
Training logs kd_loss and task_loss (sum, count over the task's items); `loss` is the mix.

Class attributes (auto_class, generative, formats, peft_task_type, reports_perplexity)
follow the task on an instance. Code that reads them from the registry class, before a run
has an instance, sees the default task's (sft) values. Packing stays off unless data.packing
asks for it (DistillSection.packs; it works for sft / causal_lm: the teacher sees the same
position ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig, ObjectiveConfig
from ..data.templates import IGNORE
from ..errors import ConfigError, DataError
from ..objective_config import SECTIONS, DistillSection, ObjectiveSection, objective_config
from ..scoring import labelled_logits
from .base import LossOutput, Objective, StepContext, TaskInfo
from .causal_lm import SFT, CausalLM
from .classification import WEIGHTS_KEY, SequenceClassification, weighted_ce_sum
from .losses import distill_loss, hidden_cosine_loss
from .masked_lm import MaskedLM

TASKS: dict[str, type[Objective]] = {o.name: o for o in (SFT, CausalLM, MaskedLM, SequenceClassification)}
# How each task's items are scored: next-token positions, masked positions, or class logits.
_KIND = {"sft": "causal", "causal_lm": "causal", "masked_lm": "masked", "classification": "classification"}
DEFAULT_TASK = DistillSection.model_fields["task"].default


class _FromTask:
    """An objective attribute that reads the wrapped task on an instance and `default` on the class."""

    def __init__(self, default: Any):
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: "Distill | None", owner: type | None = None) -> Any:
        return self.default if obj is None else getattr(obj.task, self.name)


def task_section(cfg: DistillSection) -> ObjectiveSection:
    """The wrapped task's own section, with the task settings the distill section carries."""
    own, ours = SECTIONS[cfg.task].model_fields, type(cfg).model_fields
    return objective_config(type=cfg.task, **{k: getattr(cfg, k) for k in own if k != "type" and k in ours})


@dataclass
class _Scored:
    logits: torch.Tensor  # (items, vocabulary or classes): what the task's loss and the KD loss compare
    targets: torch.Tensor  # (items,)
    hidden: torch.Tensor | None = None  # (batch, length, hidden): last hidden states, for the cosine loss


_default = TASKS[DEFAULT_TASK]
UNLABELED = "_unlabeled"  # marks a transfer-set record (objective.unlabeled)


class Distill(Objective):
    name = "distill"
    auto_class = _FromTask(_default.auto_class)
    peft_task_type = _FromTask(_default.peft_task_type)
    formats = _FromTask(_default.formats)
    generative = _FromTask(_default.generative)
    reports_perplexity = _FromTask(_default.reports_perplexity)
    needs_teacher = True

    def __init__(self, cfg: DistillSection | None = None):
        # Without a section (an artifact reloaded for evaluation, say), the default task and no
        # teacher: enough to encode, collate and score the student; training refuses it in setup.
        super().__init__(cfg if cfg is not None else objective_config(type=self.name, teacher=""))
        self.task = TASKS[self.cfg.task](task_section(self.cfg))
        self.kind = _KIND[self.cfg.task]
        if self.cfg.hidden_weight > 0 and self.kind == "causal":
            raise ConfigError(
                f"objective.hidden_weight: the hidden-state cosine loss is DistilBERT's recipe for encoders "
                f"(task masked_lm or classification); task '{self.cfg.task}' distils the next-token "
                "distributions only; set hidden_weight to 0"
            )

    # ---------------------------------------------------------------- the task's data and head

    def prepare(self, records: list[dict], cfg: ObjectiveConfig) -> TaskInfo:
        return self.task.prepare(records, self.task.cfg)

    def unlabeled_records(self, data: DataConfig) -> list[dict]:
        if not self.cfg.unlabeled:
            return []
        from ..data.pipeline import load_records

        try:
            records, _, _, _ = load_records(data.model_copy(update={"format": "text"}), self.cfg.unlabeled)
        except DataError as e:
            raise DataError(f"objective.unlabeled: {e}") from None
        return [{"text": r["text"], UNLABELED: True} for r in records]

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        if not record.get(UNLABELED):
            return self.task.encode(tokenizer, record, data, task)
        # Encoded as the task encodes a labelled text; the IGNORE label leaves the teacher as its only target.
        row, truncated = self.task.encode(tokenizer, {**record, "label": task.labels[0]}, data, task)
        if row is not None:
            row["label"] = IGNORE
        return row, truncated

    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool) -> Callable:
        return self.task.collator(tokenizer, self.task.cfg, task, train=train)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return self.task.count(batch)

    def model_kwargs(self, cfg: ObjectiveConfig, task: TaskInfo, tokenizer) -> dict:
        return self.task.model_kwargs(self.task.cfg, task, tokenizer)

    def metrics(self, predictions: torch.Tensor, references: torch.Tensor,
                label_names: list[str] | None = None) -> dict[str, float]:
        return self.task.metrics(predictions, references, label_names)

    def state_dict(self) -> dict:
        return self.task.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.task.load_state_dict(state)

    # ---------------------------------------------------------------- the teacher

    def setup(self, ctx: StepContext, train_rows: list[dict], val_rows: list[dict]) -> None:
        if ctx.teacher is None:
            raise ConfigError(
                "objective 'distill' trains against a teacher, and the step context holds none "
                "(tunesmith.train loads objective.teacher; direct callers of engine.fit pass teacher=...)"
            )
        from ..teacher import check_teacher

        policy = getattr(ctx.policy, "module", ctx.policy)  # DDP keeps the model in .module
        check_teacher(ctx.teacher, policy, task=self.cfg.task, hidden=self.cfg.hidden_weight > 0)
        self.task.setup(ctx, train_rows, val_rows)

    def _scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> _Scored:
        labels = batch["labels"]
        if self.kind == "causal":
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits, targets = labelled_logits(model, inputs, labels)
            return _Scored(logits, targets)
        if self.kind == "masked":
            inputs = {k: v for k, v in batch.items() if k != "labels"}
        else:  # classification: exactly the inputs its own loss passes (probe wrappers rely on it)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = self.cfg.hidden_weight > 0
        out = model(**inputs, output_hidden_states=True) if hidden else model(**inputs)
        length = batch["input_ids"].shape[1]
        # Prompt methods may prepend virtual tokens; keep the real positions.
        states = out.hidden_states[-1][:, -length:] if hidden else None
        if self.kind == "masked":
            mask = labels != IGNORE
            return _Scored(out.logits[:, -length:][mask], labels[mask], states)
        return _Scored(out.logits, labels, states)

    def _task_sum(self, scored: _Scored, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "classification":
            return weighted_ce_sum(scored.logits, scored.targets, batch.get(WEIGHTS_KEY))
        return F.cross_entropy(scored.logits.float(), scored.targets, reduction="sum")

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        if ctx.teacher is None:
            # A reloaded student evaluated on its own, or the precision proxy: the task's loss alone
            # (training without a teacher is refused in setup).
            return self.task.loss(ctx, batch)
        cfg = self.cfg
        student = self._scores(ctx.policy, batch)
        with torch.no_grad():
            teacher = self._scores(ctx.teacher, batch)
        n = int(student.targets.shape[0])
        task_sum = self._task_sum(student, batch)
        kd_sum = distill_loss(student.logits, teacher.logits, temperature=cfg.temperature, kind=cfg.loss,
                              beta=cfg.beta, scale_by_t2=True).sum()
        labelled = int((student.targets != IGNORE).sum())  # fewer than n when transfer-set rows are in the batch
        logs = {"kd_loss": (float(kd_sum.detach()), n), "task_loss": (float(task_sum.detach()), labelled)}
        total = (1 - cfg.kd_ratio) * task_sum + cfg.kd_ratio * kd_sum
        if student.hidden is not None:
            real = batch.get("attention_mask")
            mask = real.bool() if real is not None else torch.ones(student.hidden.shape[:2], dtype=torch.bool,
                                                                   device=student.hidden.device)
            cos = hidden_cosine_loss(student.hidden, teacher.hidden, mask)
            logs["hidden_loss"] = (float(cos.detach().sum()), int(cos.numel()))
            total = total + cfg.hidden_weight * cos.mean() * n
        if not ctx.policy.training:
            total = task_sum  # evaluation: the task's own loss; the KD terms are logged beside it
        predictions = references = None
        if self.kind == "classification":
            predictions, references = student.logits.argmax(-1), student.targets
        return LossOutput(total, n, predictions, references, logs)
