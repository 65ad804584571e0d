"""What an objective is: how records become rows, which model head it trains, and its loss.

An objective is a per-run instance built from its own config section (objective_config.py).
The loss is a sum with the number of items it sums over; the engine divides by the count
of the whole accumulation window, so every loss item weighs the same however the items
fall into micro-batches and rows.

What an objective may need besides the policy (a frozen reference, a teacher, the tokenizer,
generation) it gets from the StepContext the engine lends to every call; it never calls
backward or an optimizer step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import DataConfig, ObjectiveConfig
from ..objective_config import ObjectiveSection, objective_config
from ..data.templates import IGNORE


def disable_dropout(model: nn.Module) -> None:
    """Every dropout module of `model` (the base's and LoRA's) at p = 0, as TRL's preference and PPO
    trainers do: log-probs compared with a reference's or with old ones then carry no dropout noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    n_tokens: int
    # Optional per-item predictions and references, for metrics such as accuracy.
    predictions: torch.Tensor | None = None
    references: torch.Tensor | None = None
    # name -> (sum, count): the engine sums both over a log window (or an evaluation) and
    # reports sum / count, so a mean over pairs stays a mean however pairs fall into batches.
    logs: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class StepContext:
    """What the engine lends an objective for one call.

    `reference()` is a context manager that yields the frozen reference policy: the policy
    itself with its adapter switched off when the method can do that (no second copy in
    memory), else a frozen copy made before training. It is None unless the objective
    declared `needs_reference`.
    """

    policy: nn.Module
    tokenizer: Any = None
    reference: Callable[[], AbstractContextManager[nn.Module]] | None = None
    teacher: nn.Module | None = None
    generate: Callable | None = None  # the generation helper (online objectives)
    reward_model: nn.Module | None = None  # frozen, scores completions (PPO)


@dataclass
class TaskInfo:
    """What the data told the objective (label names); saved with the artifact."""

    labels: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


class Objective(ABC):
    """One objective, configured for one run: `Objective(section)`; class attributes say what it needs."""

    name: str = ""
    # Which transformers Auto class carries the objective's head.
    auto_class: str = "AutoModelForCausalLM"
    # peft's task type for this head (None: peft has none, e.g. masked LM).
    peft_task_type: str | None = "CAUSAL_LM"
    # Canonical record formats the objective learns from (see data/formats.py).
    formats: tuple[str, ...] = ()
    # Whether the trained model generates text (evaluation by generation, forgetting).
    generative: bool = False
    # Whether eval loss is a per-token NLL whose exp is a perplexity.
    reports_perplexity: bool = False
    # Whether the step context must carry a frozen reference policy / a teacher.
    needs_reference: bool = False
    needs_teacher: bool = False
    # Whether training rows are prompts whose completions the objective writes itself in `window`
    # (online RL): no collated training row can stand in for a step.
    online: bool = False

    @property
    def ddp_forward(self) -> bool:
        """Whether every forward of a step runs through the policy as the engine hands it over. When not (a
        multi-task run's extra heads call the shared backbone themselves), a multi-process run cannot use
        DDP's gradient hooks: the engine averages every trainable gradient over processes itself."""
        return True

    def __init__(self, cfg: ObjectiveSection | None = None):
        self.cfg = cfg if cfg is not None else objective_config(type=self.name)

    def setup(self, ctx: StepContext, train_rows: list[dict], val_rows: list[dict]) -> None:
        """Once before the first step (and again on resume): e.g. score every row with the reference."""

    def check_rows(self, rows: list[dict]) -> None:
        """Refuse training rows this objective cannot learn from, naming what is missing; called when
        the data is built, before the model loads (e.g. a reward function's reference column)."""

    @property
    def steps_per_window(self) -> int:
        """Optimizer steps each window of rows serves (GRPO's num_iterations reuses a rollout); the engine
        moves on to the next rows after that many calls of `window` with the same rows."""
        return 1

    def epoch_batches(self, n_rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
        """Row indices of each micro-batch of an epoch, a pure function of (seed, epoch) so a resume redraws
        them (a multi-task run draws each batch from one task, by its sampler)."""
        from ..sampling import epoch_batches

        return epoch_batches(n_rows, batch_size, seed, epoch, shuffle)

    def batches_per_epoch(self, n_rows: int, batch_size: int) -> int:
        """How many micro-batches `epoch_batches` gives (known without drawing them)."""
        return -(-n_rows // batch_size)

    def own_parameters(self, ctx: StepContext, device: torch.device) -> list[dict]:
        """Parameters the objective trains besides the model's (PPO's value head), as optimizer param
        groups, created on `device` before the optimizer is built; their weights travel in `state_dict`."""
        return []

    def window(self, ctx: StepContext, rows: list[list[dict]], collate: Callable) -> list[dict]:
        """The batches of one optimizer step from its micro-batches of rows. Online objectives
        generate and score here; offline ones collate."""
        return [collate(r) for r in rows]

    def state_dict(self) -> dict:
        """What must survive a resume (adaptive coefficients, buffers); saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def prepare(self, records: list[dict], cfg: ObjectiveConfig) -> TaskInfo:
        """Inspect the training records once (e.g. collect label names)."""
        return TaskInfo()

    def evaluate(self, ctx: StepContext, rows: list[dict], batch_size: int) -> dict[str, float] | None:
        """The objective's own evaluation ("eval_..." metrics), or None for the engine's loss-based one."""
        return None

    def unlabeled_records(self, data: DataConfig) -> list[dict]:
        """Records beyond data.train that the objective adds to the training split (distillation's
        transfer set); encoded by `encode` like the others."""
        return []

    @abstractmethod
    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        """(row, truncated): one record as a training row; row None drops the record."""

    @abstractmethod
    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool) -> Callable:
        """Rows -> padded tensors. Eval collators must be deterministic."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss items a collated batch holds (tokens whose label is not ignored)."""
        return int((batch["labels"] != IGNORE).sum())

    def model_kwargs(self, cfg: ObjectiveConfig, task: TaskInfo, tokenizer) -> dict:
        """Extra from_pretrained arguments for the head (number of labels, label names)."""
        return {}

    @abstractmethod
    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The loss summed over the batch, the number of items it sums over, and logs."""

    def metrics(self, predictions: torch.Tensor, references: torch.Tensor,
                label_names: list[str] | None = None) -> dict[str, float]:
        """Eval metrics from the predictions gathered over the validation set.

        `label_names` are the model's class names by id (config.id2label) when it has them.
        """
        return {}
