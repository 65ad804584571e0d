"""Reward modelling: a scalar head trained on (prompt, chosen, rejected) pairs (Bradley-Terry).

The model is the base with a sequence-classification head of one output (num_labels=1): its
score of a whole conversation is the reward. Pairs are encoded exactly as for DPO
(data/preference.py: prompt+chosen and prompt+rejected rendered as whole conversations with the
chat template, no added special tokens) and collated chosen-then-rejected, so one forward
scores both answers of every pair. This is what TRL 1.16's RewardTrainer tokenises for
conversational data: `apply_chat_template(prompt + chosen, tokenize=True)` with no EOS
appended (the template carries its own end-of-turn tokens); the shared-prompt split of
`encode_pair` leaves `prompt_ids + chosen_ids` equal to that whole conversation. Rows are
right-padded and the head reads each row's last non-pad token, which transformers finds from
`config.pad_token_id`; `model_kwargs` sets it to the tokenizer's pad id (as TRL does), so the
two always agree. (peft's prompt tuning and P-tuning feed the model embeddings without input_ids,
so a decoder's head would read the last position, padding for all but the longest row.)

Plain-string records differ from TRL on purpose: the preference format turns them into a user
turn and an assistant turn (data/formats.py), so they are rendered with the chat template like
conversations, where TRL tokenises the raw text prompt + answer with an EOS appended. The
reward is then read at the same kind of position (the end of the assistant turn) for both kinds
of data, as DPO scores them.

Loss per pair (objectives/losses.py `reward_loss`): −log σ(r_c − r_r − m) + c·(r_c + r_r)², with m
the record's `margin` column (a record without one has m = 0, whatever the other rows of its batch
hold) and c `objective.center_rewards_coefficient`;
summed over pairs and divided by the window's pair count, so the step loss equals TRL's
`compute_loss` (the mean over a batch, centering term included).

Logs, TRL's names: `accuracy` (share of pairs with r_c > r_r, ties count as wrong), `margin`
(mean r_c − r_r), `mean_reward` (mean over every scored sequence, chosen and rejected).
`min_reward` / `max_reward` are extremes, which a (sum, count) log cannot average into an extreme
over a whole window; each micro-batch contributes its own min (max) with a count of 1, so the
reported value is the mean over the window's micro-batches of each micro-batch's min (max) —
exactly TRL's definition (RewardTrainer appends the batch min per `compute_loss` call and `log()`
averages the list), and likewise for the eval_ values (the mean of per-eval-batch extremes).
They therefore depend on the batch size; `mean_reward` and `accuracy` do not.

Truncation follows `data.truncation` as for DPO ('right' cuts the answers' ends so the pair fits
max_length; 'drop' drops over-long pairs, which is what TRL's `max_length` filter does).
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..data.preference import collate_pairs
from ..errors import ConfigError
from .base import LossOutput, Objective, StepContext, TaskInfo
from .classification import model_logits
from .losses import reward_loss
from .preference import encode_preference_row


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ConfigError("a reward model needs a tokenizer with a pad token (models.load_tokenizer sets one)")
    return tokenizer.pad_token_id


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards) of a pair batch (every chosen row, then every rejected one), fp32.

    The one place a reward is read from a model: training, evaluation and `tunesmith eval` use it.
    """
    logits = model_logits(model, batch)
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model has one output per sequence (num_labels=1); its logits have shape "
                         f"{tuple(logits.shape)}")
    rewards = logits.squeeze(-1).float()
    return rewards.chunk(2)


def collate_reward_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_pairs`, with a margin for every pair as soon as one row has one (0.0 = no margin)."""
    batch = collate_pairs(rows, pad_id)
    if any(r.get("margin") is not None for r in rows):
        batch["margin"] = torch.tensor([float(r.get("margin") or 0.0) for r in rows], dtype=torch.float32)
    return batch


class RewardModel(Objective):
    """Bradley-Terry reward model on preference pairs (TRL 1.16 RewardTrainer's loss and logs)."""

    name = "reward"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    formats = ("preference",)

    def model_kwargs(self, cfg, task: TaskInfo, tokenizer) -> dict:
        # One output: the reward. The pad id lets the head find each right-padded row's last token.
        return {"num_labels": 1, "pad_token_id": _pad_id(tokenizer)}

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        return encode_preference_row(tokenizer, record, data)

    def collator(self, tokenizer, cfg, task: TaskInfo, *, train: bool):
        pad_id = _pad_id(tokenizer)
        return lambda rows: collate_reward_pairs(rows, pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        chosen, rejected = pair_rewards(ctx.policy, batch)
        n = chosen.shape[0]
        losses = reward_loss(chosen, rejected, margin=batch.get("margin"),
                             center_coefficient=self.cfg.center_rewards_coefficient)
        with torch.no_grad():
            both = torch.cat([chosen, rejected])
            logs = {
                "accuracy": (float((chosen > rejected).float().sum()), n),
                "margin": (float((chosen - rejected).sum()), n),
                "mean_reward": (float(both.sum()), 2 * n),
                # Per micro-batch extremes, averaged over the log window (TRL's definition; see above).
                "min_reward": (float(both.min()), 1),
                "max_reward": (float(both.max()), 1),
            }
        return LossOutput(losses.sum(), n, logs=logs)
