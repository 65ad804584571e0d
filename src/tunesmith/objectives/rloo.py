"""RLOO: REINFORCE leave-one-out, the cheap baseline between GRPO and PPO (TRL 1.16's RLOOTrainer definitions).

Rollouts, reward functions, evaluation, μ-step reuse and resume are GRPO's (grpo.py). What differs:
- The KL to the reference is a penalty on the reward, not a loss term: r − β·Σ_t (log π_old − log π_ref)
  over the completion (k1 per token, summed; Ahmadian et al. 2024), with the policy's log-probs at
  rollout time. `beta` is 0.05 by default, as in TRL; 0 keeps no reference.
- The advantage of a completion is its reward minus the mean reward of the other completions of its
  prompt (scorable ones only), optionally whitened over the rollout (`normalize_advantages`);
  `reward_clip_range` clips rewards first.
- The importance ratio is per sequence, exp(Σ_t log π − Σ_t log π_old), clipped as in PPO; the loss is
  the mean over sequences of −min(ρA, clip(ρ)A).

Logs: GRPO's names; `kl` is the rollout's mean per-token k1, the clip ratios are shares of sequences.
"""

from __future__ import annotations

import torch

from .base import LossOutput, StepContext
from .grpo import GRPO
from .policy_gradient import nanstd


class RLOO(GRPO):
    name = "rloo"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["completion_mask"].shape[0])

    def _needs_old_logps(self) -> bool:
        return self.cfg.beta > 0 or self.cfg.num_iterations > 1

    def _advantages(self, rewards: torch.Tensor, batches: list[dict], logs: dict) -> torch.Tensor:
        cfg = self.cfg
        g = cfg.num_generations
        rewards = rewards.clone()
        if cfg.reward_clip_range is not None:
            rewards = rewards.clamp(*cfg.reward_clip_range)
        if cfg.beta > 0:
            masks = [b["completion_mask"][:, 1:].bool() for b in batches]
            kl = [(b["old_logps"] - b["ref_logps"]) * m for b, m in zip(batches, masks)]
            logs["kl"] = (float(sum(k.sum() for k in kl)), int(sum(m.sum() for m in masks)))
            rewards = rewards - cfg.beta * torch.cat([k.sum(-1) for k in kl]).double()
        grouped = rewards.view(-1, g)
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        others = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
        advantages = rewards - others.view(-1)
        zero_std = torch.isclose(nanstd(grouped, dim=1), torch.zeros(grouped.shape[0], dtype=grouped.dtype))
        logs["frac_reward_zero_std"] = (float(zero_std.sum()), grouped.shape[0])
        if cfg.normalize_advantages:
            advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
        return torch.nan_to_num(advantages, nan=0.0).float()

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.cfg
        logps, entropy, mask = self._token_logps(ctx.policy, batch, entropy=True)
        sequence = (logps * mask).sum(-1)
        old = batch.get("old_logps")
        old_sequence = sequence.detach() if old is None else (old * mask).sum(-1)
        ratio = torch.exp(sequence - old_sequence)
        low, high = 1 - cfg.epsilon, 1 + (cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon)
        advantages = batch["advantages"]
        per_sequence = -torch.min(ratio * advantages, torch.clamp(ratio, low, high) * advantages)
        rows = int(per_sequence.shape[0])
        low_clipped = (ratio < low) & (advantages < 0)
        high_clipped = (ratio > high) & (advantages > 0)
        logs: dict[str, tuple[float, float]] = {
            "entropy": (float(entropy.sum()), len(entropy)),
            "clip_ratio/low_mean": (float(low_clipped.sum()), rows),
            "clip_ratio/high_mean": (float(high_clipped.sum()), rows),
            "clip_ratio/region_mean": (float((low_clipped | high_clipped).sum()), rows),
        }
        if ctx.policy.training and self._pending:
            logs.update(self._pending)
            self._pending = {}
        return LossOutput(per_sequence.sum(), rows, logs=logs)
