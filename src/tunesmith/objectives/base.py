"""What an objective is: how records become rows, which model head it trains, and its loss.

The loss is a sum with the number of items it sums over; the engine divides by the count
of the whole accumulation window, so every loss item weighs the same however the items
fall into micro-batches and rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import DataConfig, ObjectiveConfig
from ..data.templates import IGNORE


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    n_tokens: int
    # Optional per-item predictions and references, for metrics such as accuracy.
    predictions: torch.Tensor | None = None
    references: torch.Tensor | None = None


@dataclass
class TaskInfo:
    """What the data told the objective (label names); saved with the artifact."""

    labels: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


class Objective(ABC):
    name: str = ""
    # Whether packing several examples into one row makes sense for this objective.
    packs: bool = False
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

    def prepare(self, records: list[dict], cfg: ObjectiveConfig) -> TaskInfo:
        """Inspect the training records once (e.g. collect label names)."""
        return TaskInfo()

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
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The loss summed over the batch and the number of items it sums over."""

    def metrics(self, predictions: torch.Tensor, references: torch.Tensor,
                label_names: list[str] | None = None) -> dict[str, float]:
        """Eval metrics from the predictions gathered over the validation set.

        `label_names` are the model's class names by id (config.id2label) when it has them.
        """
        return {}
