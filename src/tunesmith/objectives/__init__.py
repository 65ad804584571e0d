"""The objective registry: how a batch becomes a loss. One module per objective family."""

from __future__ import annotations

from .base import LossOutput, Objective, TaskInfo
from .causal_lm import SFT, CausalLM
from .classification import SequenceClassification, TokenClassification
from .masked_lm import MaskedLM
from .seq2seq import Seq2Seq

OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (SFT(), CausalLM(), MaskedLM(), Seq2Seq(), SequenceClassification(), TokenClassification())
}

__all__ = ["OBJECTIVES", "LossOutput", "Objective", "TaskInfo"]
