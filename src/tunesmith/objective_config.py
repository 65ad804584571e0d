"""Each objective's own config section: a light pydantic class per objective, no torch.

`RunConfig.objective` is the union of these, told apart by `type` (sft when absent), so a key
that belongs to another objective is refused with the allowed keys of the chosen one. The
objective classes (objectives/) take their section as a per-run instance; this module stays
import-light so that validating a config never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

from .reward_functions import RewardSpec

if TYPE_CHECKING:
    from .config import RunConfig


class ObjectiveSection(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    type: str

    # Whether packing several examples into one row makes sense for this objective (the default
    # of data.packing). Distillation: off, whatever its task, unless data.packing asks for it
    # (packing a masked_lm or classification task would pack rows that must not be).
    packs: ClassVar[bool] = False
    # Whether the objective trains a fresh task head on the model (training.head_learning_rate).
    adds_head: ClassVar[bool] = False

    @property
    def can_pack(self) -> bool:
        """Whether data.packing: true is allowed (each packed example keeps its own targets)."""
        return self.packs

    def check(self, run: "RunConfig") -> list[str]:
        """Run settings this objective refuses (read at config validation, before anything loads)."""
        return []


class SFTSection(ObjectiveSection):
    type: Literal["sft"] = "sft"
    packs: ClassVar[bool] = True


class CausalLMSection(ObjectiveSection):
    type: Literal["causal_lm"] = "causal_lm"
    packs: ClassVar[bool] = True


class MaskedLMSection(ObjectiveSection):
    type: Literal["masked_lm"] = "masked_lm"
    mlm_probability: float = Field(0.15, gt=0, lt=1)


class Seq2SeqSection(ObjectiveSection):
    type: Literal["seq2seq"] = "seq2seq"
    max_target_length: int = Field(128, gt=0)


class _Labelled(ObjectiveSection):
    labels: list[str] | None = Field(
        None, description="Label names in id order (default: sorted labels found in the data)."
    )
    class_weights: Literal["balanced"] | list[float] | None = None
    adds_head: ClassVar[bool] = True


class ClassificationSection(_Labelled):
    type: Literal["classification"] = "classification"


class TokenClassificationSection(_Labelled):
    type: Literal["token_classification"] = "token_classification"


class _DropoutOff(ObjectiveSection):
    disable_dropout: bool = Field(
        True, description="Set every dropout of the model (LoRA's too) to 0 before training, as TRL's DPO, KTO, "
                          "ORPO and CPO trainers do by default: log-probs compared across two forwards (policy and "
                          "reference, chosen and rejected) then differ by the weights, not by dropout noise.")


class DPOSection(_DropoutOff):
    """Direct preference optimisation against a frozen reference (TRL 1.16 definitions)."""

    type: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference.")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust DPO's epsilon.")
    precompute_ref_logps: bool = Field(
        False, description="Score every pair with the reference once before training instead of every step."
    )
    sft_weight: float = Field(0.0, ge=0, description="Add this times the NLL of the chosen answer (RPO).")


class RewardSection(ObjectiveSection):
    """Bradley-Terry reward modelling on preference pairs (a scalar head)."""

    type: Literal["reward"] = "reward"
    adds_head: ClassVar[bool] = True
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="Adds c * mean((r_chosen + r_rejected)^2); 0.01 is the usual choice."
    )


class KTOSection(_DropoutOff):
    """KTO on unpaired desirable / undesirable answers (TRL 1.16 definitions)."""

    type: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    precompute_ref_logps: bool = False

    def check(self, run: "RunConfig") -> list[str]:
        if run.training.batch_size < 2:
            return ["training.batch_size: objective 'kto' needs at least 2 examples per micro-batch: its reference "
                    "point z pairs each prompt with another example's completion in the same micro-batch (a batch "
                    "of one would make z its own reward; TRL refuses it too). Raise training.batch_size and lower "
                    "training.grad_accum to keep the effective batch."]
        return []


class ORPOSection(_DropoutOff):
    """ORPO: NLL of the chosen answer plus an odds-ratio term; no reference model."""

    type: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (the paper's lambda).")


class SimPOSection(_DropoutOff):
    """SimPO: length-averaged log-probs with a target margin; no reference model."""

    type: Literal["simpo"] = "simpo"
    beta: float = Field(0.1, gt=0)
    gamma: float = Field(0.5, ge=0, description="Target reward margin (simpo_gamma).")
    label_smoothing: float = Field(0.0, ge=0, le=0.5)
    sft_weight: float = Field(0.0, ge=0, description="Adds this times the chosen NLL (CPO's alpha).")


class DistillSection(ObjectiveSection):
    """Knowledge distillation from a teacher, mixed with the student's own task loss."""

    type: Literal["distill"] = "distill"
    teacher: str = Field(description="Anything tunesmith loads: a run folder, an artifact, a model folder, a hub id.")
    task: Literal["sft", "causal_lm", "masked_lm", "classification"] = Field(
        "sft", description="The student's own objective, whose loss is mixed in and whose data it reads.")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="Generalized JSD's mixture weight (jsd only).")
    temperature: float = Field(1.0, gt=0)
    kd_ratio: float = Field(0.5, ge=0, le=1, description="(1 - kd_ratio) * task loss + kd_ratio * KD loss.")
    hidden_weight: float = Field(0.0, ge=0, description="Adds this times DistilBERT's hidden-state cosine loss.")
    unlabeled: str | list[str] | None = Field(
        None, description="Texts without labels (files or hub ids of format text, read like data.train) added to "
                          "the training rows with the teacher's distribution as their only target: a transfer set. "
                          "Task classification only.")
    # The task's own settings, as in its section.
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    labels: list[str] | None = None
    class_weights: Literal["balanced"] | list[float] | None = None

    @property
    def can_pack(self) -> bool:
        return self.task in ("sft", "causal_lm")  # the teacher sees the packed rows' position ids too

    def check(self, run: "RunConfig") -> list[str]:
        if not self.unlabeled:
            return []
        if self.task != "classification":
            return [f"objective.unlabeled: unlabeled texts are a transfer set for task classification; task "
                    f"'{self.task}' reads its targets from the text itself, so add the texts to data.train"]
        if self.kd_ratio == 0:
            return ["objective.unlabeled: with kd_ratio 0 the unlabeled texts would have no target; "
                    "raise objective.kd_ratio above 0"]
        return []


class _OnlineSection(ObjectiveSection):
    """What every online objective shares: rollouts, reward functions, the clipped ratio."""

    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward functions and their weights.")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (a group).")
    max_completion_length: int = Field(256, ge=1, description="New tokens per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are scored under it too.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip of the importance ratio: 1 - epsilon.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip 1 + epsilon_high (default epsilon).")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps on each rollout (mu); above 1 the ratio "
                                                     "departs from 1 and the clipping acts.")
    mask_truncated_completions: bool = Field(
        False, description="Completions without an end token add nothing to the loss.")
    generation_batch_size: int | None = Field(
        None, gt=0, description="Completions generated together (default: all of a step's).")
    merged_rollouts: bool = Field(
        True, description="LoRA: generate from merged copies of the adapted weights (one matmul per layer; the "
                          "copies take those weights' memory again while generating). Log-probs are always "
                          "scored by the unmerged policy.")
    dynamic_sampling: bool = Field(
        False, description="grpo: leave out of the update every prompt group whose completions all got the same "
                           "reward (DAPO's filter): they carry no advantage, and the loss is normalised over the "
                           "groups that do.")

    def check(self, run: "RunConfig") -> list[str]:
        problems = []
        if not self.rewards:
            problems.append(f"objective.rewards: {self.type} needs at least one reward function, e.g. "
                            "[{function: correctness}] (tunesmith rewards lists the built-ins)")
        if run.data.max_length <= self.max_completion_length:
            problems.append(f"data.max_length ({run.data.max_length}) must exceed objective.max_completion_length "
                            f"({self.max_completion_length}): a prompt and its completion share it")
        if run.eval.every and run.eval.metric == "eval_loss":
            problems.append(f"eval.metric: {self.type} evaluates by reward, not loss; set eval.metric: eval_reward "
                            "and eval.greater_is_better: true")
        return problems


class GRPOSection(_OnlineSection):
    """Group relative policy optimisation: sampled completions scored by reward functions (TRL 1.16 definitions)."""

    type: Literal["grpo"] = "grpo"
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL to the reference (0: no reference kept).")
    kl_bias_correction: bool = Field(
        True, description="Multiply the KL by the importance ratio (unbiased reverse-KL gradient; TRL's default).")
    delta: float | None = Field(None, gt=1, description="Caps the ratio from above as well (two-sided clipping).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"


class RLOOSection(_OnlineSection):
    """REINFORCE leave-one-out: each completion against the mean of its group's others (TRL 1.16 definitions)."""

    type: Literal["rloo"] = "rloo"
    beta: float = Field(0.05, ge=0, description="Weight of the sequence KL (k1) subtracted from the reward.")
    normalize_advantages: bool = Field(False, description="Whiten the advantages over the rollout.")
    reward_clip_range: tuple[float, float] | None = Field(None, description="Clip rewards to (min, max) first.")

    def check(self, run: "RunConfig") -> list[str]:
        problems = super().check(run)
        if self.dynamic_sampling:
            problems.append("objective.dynamic_sampling: rloo's advantages and KL need every group's log-probs; "
                            "dynamic sampling applies to grpo")
        return problems


class PPOSection(_OnlineSection):
    """PPO with a reward model: per-token KL penalty, GAE, clipped policy and value losses over minibatches
    (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; TRL's former PPOTrainer defaults)."""

    type: Literal["ppo"] = "ppo"
    reward_model: str | None = Field(
        None, description="A sequence-classification model with one label that scores prompt + completion on its "
                          "last token: a `reward` run folder, an artifact, a model folder or a hub id. Shares the "
                          "policy's tokenizer.")
    num_generations: int = Field(1, ge=1, description="Completions sampled per prompt.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; log-probs are scored under it too.")
    max_completion_length: int = Field(53, ge=1, description="New tokens per completion at most.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout.")
    num_mini_batches: int = Field(1, ge=1, description="Optimizer steps per pass: the rollout is shuffled and split.")
    kl_coef: float = Field(0.05, ge=0, description="Weight of the per-token KL penalty in the reward (0: no reference).")
    kl_estimator: Literal["k1", "k3"] = "k1"
    target_kl: float | None = Field(
        None, gt=0, description="Adaptive KL coefficient (Ziegler et al. 2019): kl_coef moves towards this KL per "
                                "completion; None keeps kl_coef fixed.")
    kl_horizon: int = Field(10000, ge=1, description="The adaptive controller's horizon, in completions.")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    cliprange_value: float = Field(0.2, gt=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(
        None, le=0, description="Added to the score of a completion without an end token, so 0 or negative "
                                "(e.g. -1.0; TRL's positive value is subtracted: its 1.0 is -1.0 here).")
    value_head_lr: float | None = Field(
        None, gt=0, description="Learning rate of the value head (default training.learning_rate).")

    def check(self, run: "RunConfig") -> list[str]:
        problems = []
        if not self.rewards and not self.reward_model:
            problems.append("objective: ppo needs a reward: objective.reward_model (a `reward` run or a model with "
                            "one label) and/or objective.rewards (reward functions)")
        if run.data.max_length <= self.max_completion_length:
            problems.append(f"data.max_length ({run.data.max_length}) must exceed objective.max_completion_length "
                            f"({self.max_completion_length}): a prompt and its completion share it")
        if run.eval.every and run.eval.metric == "eval_loss":
            problems.append("eval.metric: ppo evaluates by reward, not loss; set eval.metric: eval_reward "
                            "and eval.greater_is_better: true")
        if self.dynamic_sampling:
            problems.append("objective.dynamic_sampling: ppo scores each completion with a value baseline, not "
                            "against its group; it applies to grpo")
        if self.num_iterations != 1:
            problems.append("objective.num_iterations: ppo reuses each rollout for ppo_epochs x num_mini_batches "
                            "steps; set those instead")
        completions = run.training.batch_size * run.training.grad_accum * self.num_generations
        if completions % self.num_mini_batches:
            problems.append(f"objective.num_mini_batches ({self.num_mini_batches}) must divide the completions of a "
                            f"rollout (training.batch_size x grad_accum x num_generations = {completions})")
        return problems


class MultiTaskSection(ObjectiveSection):
    """The objective of a multi-task run: set from `tasks:` (each task has its own section there)."""

    type: Literal["multitask"] = "multitask"


SECTIONS: dict[str, type[ObjectiveSection]] = {
    s.model_fields["type"].default: s
    for s in (SFTSection, CausalLMSection, MaskedLMSection, Seq2SeqSection, ClassificationSection,
              TokenClassificationSection, DPOSection, RewardSection, KTOSection, ORPOSection, SimPOSection,
              DistillSection, GRPOSection, RLOOSection, PPOSection)
}


def _tag(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", "sft")
    return getattr(value, "type", "sft")


# What `objective.type` may say: every objective, and multitask (set from a run's `tasks:`, not an objective
# of its own: it has no entry in the registry of objectives a method trains).
ALL_SECTIONS: dict[str, type[ObjectiveSection]] = {**SECTIONS, "multitask": MultiTaskSection}

ObjectiveConfigUnion = Annotated[
    Union[tuple(Annotated[s, Tag(name)] for name, s in ALL_SECTIONS.items())],  # noqa: UP007
    Discriminator(_tag),
]
_ADAPTER = TypeAdapter(ObjectiveConfigUnion)


def objective_config(**fields: Any) -> ObjectiveSection:
    """The section of `fields["type"]` (sft when absent), validated."""
    return _ADAPTER.validate_python(fields)


def lenient_objective_config(fields: dict[str, Any]) -> ObjectiveSection:
    """A section from a saved manifest: keys of the older flat schema that this objective does not
    have are dropped (artifacts written before the sections were split stay loadable)."""
    section = SECTIONS[fields.get("type", "sft")]
    return section(**{k: v for k, v in fields.items() if k in section.model_fields})
