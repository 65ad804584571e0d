"""The objective registry: name -> objective class; a run builds its own instance from its section."""

from __future__ import annotations

from ..objective_config import ObjectiveSection
from .base import LossOutput, Objective, StepContext, TaskInfo
from .causal_lm import SFT, CausalLM
from .classification import SequenceClassification, TokenClassification
from .distill import Distill
from .grpo import GRPO
from .masked_lm import MaskedLM
from .kto import KTO
from .ppo import PPO
from .preference import DPO
from .reference_free import ORPO, SimPO
from .reward import RewardModel
from .rloo import RLOO
from .seq2seq import Seq2Seq

OBJECTIVES: dict[str, type[Objective]] = {
    o.name: o for o in (SFT, CausalLM, MaskedLM, Seq2Seq, SequenceClassification, TokenClassification, DPO, RewardModel,
                        KTO, ORPO, SimPO, Distill, GRPO, RLOO, PPO)
}


def build_objective(cfg: ObjectiveSection) -> Objective:
    """An objective instance, configured by its own section."""
    if cfg.type == "multitask":
        raise ValueError("a multi-task objective is built from the whole run config: use run_objective(cfg)")
    return OBJECTIVES[cfg.type](cfg)


def run_objective(run) -> Objective:
    """The run's objective instance: its section's, or a multi-task run's dispatcher over its tasks."""
    if run.tasks:
        from .multitask import MultiTask

        return MultiTask(run)
    return build_objective(run.objective)


__all__ = ["OBJECTIVES", "LossOutput", "Objective", "StepContext", "TaskInfo", "build_objective", "run_objective"]
