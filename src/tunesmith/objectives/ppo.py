"""PPO with a reward model: the classic RLHF recipe (InstructGPT), with the implementation details of
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (TRL's former PPOTrainer defaults).

One rollout (`window`, when the previous one is used up): the step's prompts are completed
`num_generations` times each by the generation helper at `temperature` (0.7), left-padded, the
model in eval mode. Each completion is then scored:
- the reward model (`reward_model`: a sequence-classification model with one label, e.g. a
  tunesmith `reward` run) reads prompt + completion right-padded, its score taken on the last
  token as it was trained; reward functions (`rewards`), if any, add their weighted sum;
  `missing_eos_penalty` is added to completions cut off before their end token;
- per-token rewards are −kl_coef·KL_t (k1 or k3 between the sampling policy and the frozen
  reference, which for adapter methods is the base with the adapter off) plus the score on each
  completion's last token (`whiten_rewards` rescales them over the rollout first);
- values come from a value head (a linear layer on the policy's final hidden state, so the
  trunk is shared and no second model is trained), initialised from the reward model's score
  head when their widths match, else zero; GAE (gamma, lam) gives advantages and returns =
  advantages + values; advantages are whitened over the rollout.
The rollout then serves `ppo_epochs` × `num_mini_batches` optimizer steps: each epoch shuffles
its completions (the permutations are drawn at rollout time and kept with it) and each step
takes one minibatch, split into micro-batches of the training batch's size. The loss per token
is the clipped surrogate (`epsilon`, `epsilon_high`) plus `vf_coef` × the clipped value loss
(`cliprange_value`), averaged over the minibatch's completion tokens. The importance ratio is 1
on the first minibatch of every rollout (the policy has not moved yet).

With `target_kl` the coefficient adapts after every rollout (Ziegler et al. 2019):
kl_coef ← kl_coef · (1 + clip(KL / target − 1, ±0.2) · completions / kl_horizon).

Implementation details, as the reference notes list them: dropout off (every dropout layer of the
policy, a method's such as LoRA's included, gets p = 0 for the run, as TRL's
`disable_dropout_in_model`; otherwise the loss's forward would not score the policy that sampled);
left padding for generation, right padding for the reward model; the end token is kept and
counted; per-token KL with the score on the final token; value head from the reward model;
advantages whitened per rollout; sampling temperature also divides the logits when log-probs are
recomputed; k1 or k3. Not done: normalising the reward model with an SFT baseline (score your
reward model's bias out with `missing_eos_penalty` and `whiten_rewards` instead).

Logs (TRL's names): objective/scores, objective/kl, objective/non_score_reward,
objective/rlhf_reward, kl_coef, reward (the score), rewards/<fn>/mean, completions/mean_length,
completions/clipped_ratio; per step policy/approxkl_avg, policy/clipfrac_avg, val/clipfrac_avg,
loss/policy_avg, loss/value_avg, val/ratio, entropy. Evaluation (greedy, held-out prompts):
eval_reward, eval_score (reward model alone), the reward functions' means and eval_exact_match.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data.preference import answer_labels, pad_completions
from ..data.templates import IGNORE, turn_end_ids
from ..scoring import labelled_scores
from .base import LossOutput, StepContext, disable_dropout
from .grpo import GRPO, _pad_id
from .policy_gradient import gae, kl_penalised_rewards, whiten

_ROLLOUT_KEYS = ("input_ids", "attention_mask", "completion_mask", "old_logps", "old_values", "advantages",
                 "returns")


def score_head(reward_model: nn.Module, width: int) -> nn.Linear | None:
    """The reward model's one-output linear head over `width` features (for a peft model the trained copy,
    which comes after the original in module order), or None."""
    found = None
    for module in reward_model.modules():
        if isinstance(module, nn.Linear) and module.out_features == 1 and module.in_features == width:
            found = module
    return found


@torch.no_grad()
def reward_model_scores(reward_model: nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """The reward model's score of every right-padded sequence, read where it was trained to read it."""
    device = next(reward_model.parameters()).device
    scores = []
    for i in range(0, batch["input_ids"].shape[0], chunk):
        logits = reward_model(input_ids=batch["input_ids"][i:i + chunk].to(device),
                              attention_mask=batch["attention_mask"][i:i + chunk].to(device)).logits
        if logits.dim() != 2 or logits.shape[-1] != 1:
            raise ValueError(f"objective.reward_model must have one output per sequence (num_labels=1); its logits "
                             f"have shape {tuple(logits.shape)}")
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores).double()


def reward_model_sequences(prompts: list[list[int]], completions: list[list[int]], truncated: list[bool],
                           turn_end: list[int]) -> list[list[int]]:
    """Prompt + completion as the reward model saw its training pairs: a completion that stopped at the
    template's end-of-turn token gets the rest of the template's closing (ChatML's `\n` after
    `<|im_end|>`). Its head reads the last non-pad token, which was that `\n` in training; without it the
    read moves onto the end token, or, when pad == eos, back onto the last word of the answer."""
    out = []
    for p, c, cut in zip(prompts, completions, truncated):
        ended = not cut and len(turn_end) > 1 and c and c[-1] == turn_end[0]
        out.append(p + c + (turn_end[1:] if ended else []))
    return out


def adapted_kl_coef(kl_coef: float, kl: float, target: float, completions: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: one update from a rollout's mean KL per completion."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return kl_coef * (1.0 + error * completions / horizon)


class PPO(GRPO):
    name = "ppo"

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.value_head: nn.Linear | None = None
        self.kl_coef = self.cfg.kl_coef
        self._minibatches: list[list[int]] = []  # rollout row indices of each of the rollout's steps
        self._micro = 1  # completions per micro-batch
        self._last_scores: torch.Tensor | None = None  # the reward model's scores of the last completions
        self._turn_end: list[int] = []  # what the chat template writes after an answer (read in setup)

    def _wants_reference(self) -> bool:
        return self.cfg.kl_coef > 0

    @property
    def steps_per_window(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.num_mini_batches

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["completion_mask"][:, 1:].sum())

    def own_parameters(self, ctx: StepContext, device: torch.device) -> list[dict]:
        model = getattr(ctx.policy, "module", ctx.policy)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        width = config.hidden_size
        self.value_head = nn.Linear(width, 1).to(device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        source = score_head(ctx.reward_model, width) if ctx.reward_model is not None else None
        if source is not None:
            with torch.no_grad():
                self.value_head.weight.copy_(source.weight.float())
                if source.bias is not None:
                    self.value_head.bias.copy_(source.bias.float())
        group = {"params": list(self.value_head.parameters()), "weight_decay": 0.0}
        if self.cfg.value_head_lr is not None:
            group["lr"] = self.cfg.value_head_lr
        return [group]

    def setup(self, ctx: StepContext, train_rows: list[dict], val_rows: list[dict]) -> None:
        disable_dropout(ctx.policy)
        self._turn_end = turn_end_ids(ctx.tokenizer)

    def state_dict(self) -> dict:
        state = {"kl_coef": self.kl_coef, "buffer": self._buffer, "uses": self._uses,
                 "minibatches": self._minibatches, "micro": self._micro}
        if self.value_head is not None:
            state["value_head"] = self.value_head.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = state.get("kl_coef", self.cfg.kl_coef)
        self._buffer, self._uses = state.get("buffer", []), state.get("uses", 0)
        self._minibatches, self._micro = state.get("minibatches", []), state.get("micro", 1)
        if self.value_head is not None and "value_head" in state:
            self.value_head.load_state_dict(state["value_head"])  # in place: the optimizer keeps its parameters

    # ---------------------------------------------------------------- scoring

    def _complete(self, ctx: StepContext, prompts: list[dict], *, sample: bool, copies: int,
                  batch_size: int | None = None):
        """GRPO's completions and reward functions, plus the reward model's score and the missing-EOS penalty."""
        out, per_fn, rewards = super()._complete(ctx, prompts, sample=sample, copies=copies, batch_size=batch_size)
        if self.functions:
            rewards = torch.nan_to_num(rewards, nan=0.0)  # a completion no function could score adds nothing
        self._last_scores = None
        if ctx.reward_model is not None:
            sequences = reward_model_sequences(out.prompt_ids, out.completion_ids, out.truncated, self._turn_end)
            batch = pad_completions(sequences, [[1] * len(s) for s in sequences], _pad_id(ctx.tokenizer))
            self._last_scores = reward_model_scores(ctx.reward_model, batch, batch_size or len(sequences))
            rewards = rewards + self._last_scores
        if self.cfg.missing_eos_penalty is not None:
            rewards = rewards + self.cfg.missing_eos_penalty * torch.tensor(out.truncated, dtype=rewards.dtype)
        return out, per_fn, rewards

    def _scores(self, model, batch: dict[str, torch.Tensor], *, entropy: bool = False):
        """(per-token log-probs (B, L-1) at the sampling temperature, values (B, L-1), entropies, mask)."""
        labels = answer_labels(batch["input_ids"], batch["completion_mask"])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        nll, ent, states = labelled_scores(model, inputs, labels, temperature=self.cfg.temperature,
                                           entropy=entropy, hidden=True, share_prompts=True)
        mask = labels[:, 1:] != IGNORE
        logps = torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).masked_scatter(mask, -nll)
        head_values = self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1).float()
        values = torch.zeros(mask.shape, dtype=head_values.dtype, device=nll.device).masked_scatter(mask, head_values)
        return logps, values, ent, mask

    # ---------------------------------------------------------------- rollouts

    def window(self, ctx: StepContext, rows: list[list[dict]], collate: Callable) -> list[dict]:
        if not self._buffer or self._uses >= self.steps_per_window:
            self._buffer, self._minibatches = self._rollout(ctx, rows)
            self._micro = max(1, len(rows[0]) * self.cfg.num_generations)
            self._uses = 0
        rollout = self._buffer[0]
        picked = self._minibatches[self._uses]
        self._uses += 1
        batches = []
        for i in range(0, len(picked), self._micro):
            index = torch.tensor(picked[i:i + self._micro])
            batch = {k: rollout[k][index] for k in _ROLLOUT_KEYS}
            width = int(batch["attention_mask"].sum(1).max())  # drop the columns only other rows needed
            batches.append({k: v[:, :width] if k in ("input_ids", "attention_mask", "completion_mask")
                            else v[:, :width - 1] for k, v in batch.items()})
        return batches

    @torch.no_grad()
    def _rollout(self, ctx: StepContext, rows: list[list[dict]]) -> tuple[list[dict], list[list[int]]]:
        cfg = self.cfg
        prompts = [r for micro in rows for r in micro]
        out, per_fn, scores = self._complete(ctx, prompts, sample=True, copies=cfg.num_generations)
        pad = _pad_id(ctx.tokenizer)
        sequences = [p + c for p, c in zip(out.prompt_ids, out.completion_ids)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(out.prompt_ids, out.completion_ids)]
        if cfg.mask_truncated_completions:
            masks = [[0] * len(m) if cut else m for m, cut in zip(masks, out.truncated)]
        full = pad_completions(sequences, masks, pad)
        device = next(ctx.policy.parameters()).device
        chunk = max(1, len(rows[0]) * cfg.num_generations)
        old_logps, old_values, ref_logps = [], [], []
        for i in range(0, len(sequences), chunk):
            part = {k: v[i:i + chunk].to(device) for k, v in full.items()}
            logps, values, _, _ = self._scores(ctx.policy, part)
            old_logps.append(logps.float().cpu())
            old_values.append(values.float().cpu())
            if self.needs_reference:
                with ctx.reference() as reference:
                    ref_logps.append(self._token_logps(reference, part)[0].float().cpu())
        old_logps, old_values = torch.cat(old_logps), torch.cat(old_values)
        mask = full["completion_mask"][:, 1:].bool()
        reference = torch.cat(ref_logps) if ref_logps else old_logps
        rewards, kl = kl_penalised_rewards(scores.float(), old_logps, reference, mask, kl_coef=self.kl_coef,
                                           estimator=cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = whiten(advantages, mask) * mask
        rollout = {**full, "old_logps": old_logps, "old_values": old_values, "advantages": advantages,
                   "returns": returns}

        n = len(sequences)
        kl_per_completion = kl.sum(-1)
        non_score = -self.kl_coef * kl_per_completion
        lengths = [len(c) for c in out.completion_ids]
        logs = {"objective/scores": (float(scores.sum()), n), "reward": (float(scores.sum()), n),
                "objective/kl": (float(kl_per_completion.sum()), n),
                "objective/non_score_reward": (float(non_score.sum()), n),
                "objective/rlhf_reward": (float((scores.float() + non_score).sum()), n),
                "kl_coef": (self.kl_coef, 1),
                "completions/mean_length": (float(sum(lengths)), n),
                "completions/clipped_ratio": (float(sum(out.truncated)), n)}
        for j, (spec, _) in enumerate(self.functions):
            scored = ~torch.isnan(per_fn[:, j])
            logs[f"rewards/{spec.log_name}/mean"] = (float(per_fn[scored, j].sum()), int(scored.sum()))
        self._pending = logs
        if cfg.target_kl is not None and cfg.kl_coef > 0:
            self.kl_coef = adapted_kl_coef(self.kl_coef, float(kl_per_completion.mean()), cfg.target_kl, n,
                                           cfg.kl_horizon)

        minibatches = []  # an epoch's last window may hold fewer prompts: minibatch sizes then differ by one
        for _ in range(cfg.ppo_epochs):
            minibatches += [part.tolist() for part in torch.randperm(n).tensor_split(cfg.num_mini_batches)]
        return [rollout], minibatches

    # ---------------------------------------------------------------- loss

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.cfg
        logps, values, entropy, mask = self._scores(ctx.policy, batch, entropy=True)
        old_logps, old_values = batch["old_logps"], batch["old_values"]
        advantages, returns = batch["advantages"], batch["returns"]
        log_ratio = logps - old_logps
        ratio = torch.exp(log_ratio)
        high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - cfg.epsilon, 1 + high)
        policy_loss = torch.max(unclipped, clipped)
        values_clipped = old_values + torch.clamp(values - old_values, -cfg.cliprange_value, cfg.cliprange_value)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
        m = mask.to(policy_loss.dtype)
        total = ((policy_loss + cfg.vf_coef * value_loss) * m).sum()
        tokens = float(m.sum())
        with torch.no_grad():
            logs: dict[str, tuple[float, float]] = {
                "policy/approxkl_avg": (float((0.5 * log_ratio**2 * m).sum()), tokens),
                "policy/clipfrac_avg": (float(((clipped > unclipped).to(m.dtype) * m).sum()), tokens),
                "val/clipfrac_avg": (float((((values_clipped - returns) ** 2 > (values - returns) ** 2)
                                             .to(m.dtype) * m).sum()), tokens),
                "loss/policy_avg": (float((policy_loss * m).sum()), tokens),
                "loss/value_avg": (float((value_loss * m).sum()), tokens),
                "val/ratio": (float((ratio * m).sum()), tokens),
                "entropy": (float(entropy.sum()), len(entropy)),
            }
        if ctx.policy.training and self._pending:
            logs.update(self._pending)
            self._pending = {}
        return LossOutput(total, int(tokens), logs=logs)

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, ctx: StepContext, rows: list[dict], batch_size: int) -> dict[str, float] | None:
        metrics = super().evaluate(ctx, rows, batch_size)
        if rows and self._last_scores is not None:
            metrics["eval_score"] = float(self._last_scores.mean())
        return metrics
