"""The objective registry: how a batch becomes a loss. One module per objective."""

from __future__ import annotations

from .base import LossOutput, Objective
from .causal_lm import SFT, CausalLM

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT(), CausalLM())}

__all__ = ["OBJECTIVES", "LossOutput", "Objective"]
