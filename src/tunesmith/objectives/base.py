"""What an objective is: it maps (model, batch) to a summed loss and the count it sums over.

The engine divides by the count of the whole accumulation window, so every loss token
weighs the same however the tokens fall into micro-batches and rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    n_tokens: int


class Objective(ABC):
    name: str = ""
    # Whether packing several examples into one row makes sense for this objective.
    packs: bool = False

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The loss summed over the batch and the number of items it sums over."""
