"""The numbers of online RL as pure functions over tensors: advantages, clipped policy losses, KL, GAE.

GRPO follows TRL 1.16's GRPOTrainer (`_generate_and_score_completions` for the advantages,
`_compute_loss` for the loss); PPO follows Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO" (TRL's former PPOTrainer mirrors it). Shapes: B completions, T completion
positions; `mask` (B, T) is 1 on the completion tokens that count.

The engine divides a window's loss sum by the window's item count (summed over micro-batches
and processes), so each GRPO normaliser is written as the (sum, count) pair that reproduces
TRL's number (`grpo_loss_sum`):

| loss_type | TRL | (sum, count) per micro-batch |
|---|---|---|
| grpo | mean over sequences of Σ_t L·m / Σ_t m, ÷ accumulation | Σ_seq (Σ_t L·m / Σ_t m), B |
| bnpo | Σ L·m / Σ m over the micro-batch, ÷ accumulation | B · Σ L·m / Σ m, B |
| dr_grpo | Σ L·m / (B · max_completion_length), ÷ accumulation | Σ L·m / max_completion_length, B |
| dapo | Σ L·m / active tokens of the whole window | Σ L·m, Σ m |

(grpo, bnpo and dr_grpo equal TRL's when a window's micro-batches hold the same number of
completions, which GRPO's rollout windows always do.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than two values), as TRL's."""
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True) if keep else torch.nanmean(x)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keep) if keep else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keep) if keep else (~torch.isnan(x)).sum()
    correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(variance, float("nan")))
    out = torch.sqrt(variance * correction)
    return out.squeeze(dim) if keep else out


@dataclass
class Advantages:
    advantages: Tensor  # (B,)
    std_is_zero: Tensor  # (B,) bool: the completion's group (or the batch) gave every completion one reward


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> Advantages:
    """A = r − mean of the prompt's group, divided by the group's std ("group"), the batch's ("batch"), or not.

    `rewards` (B,) holds the weighted sum of the reward functions per completion, groups of
    `group_size` consecutive completions per prompt; NaN marks a completion no function scored:
    it is left out of its group's mean and std and gets advantage 0.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    rewards = rewards.double()
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = (nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())).expand_as(rewards)
    else:
        std = (nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1
               else torch.zeros_like(rewards))
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return Advantages(torch.nan_to_num(advantages, nan=0.0).float(),
                      torch.isclose(std, torch.zeros_like(std)))


def groups_with_spread(rewards: Tensor, group_size: int) -> Tensor:
    """(groups,) bool: the group's scored completions did not all get one reward (NaN: not scored)."""
    std = nanstd(rewards.double().view(-1, group_size), dim=1)
    return ~torch.isnan(std) & ~torch.isclose(std, torch.zeros_like(std))


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL estimate exp(ref − θ) − (ref − θ) − 1 (Schulman's k3): ≥ 0, and 0 where the two agree."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def k1_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL estimate θ − ref (k1): unbiased, may be negative per token."""
    return logps - ref_logps


@dataclass
class ClippedLoss:
    per_token: Tensor  # (B, T): −min(ρA, clip(ρ)A) [+ β·KL], not yet masked
    ratio: Tensor  # (B, T): ρ = exp(log π − log π_old)
    low_clipped: Tensor  # (B, T) bool: ρ < 1 − ε_low where A < 0
    high_clipped: Tensor  # (B, T) bool: ρ > 1 + ε_high where A > 0
    kl: Tensor | None = None  # (B, T) per-token k3 KL, when a reference was given


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, *, epsilon_low: float = 0.2,
                        epsilon_high: float | None = None, ref_logps: Tensor | None = None, beta: float = 0.0,
                        delta: float | None = None, kl_bias_correction: bool = False) -> ClippedLoss:
    """PPO's clipped surrogate per token, as GRPO uses it (token-level importance sampling).

    `advantages` is (B,) (one per completion, GRPO) or (B, T) (per token, PPO). With one
    optimizer step per rollout `old_logps` is `logps.detach()`, so ρ = 1 in value and only its
    gradient acts. `delta` caps ρ from above as well (two-sided clipping, TRL's `delta`). With
    `beta` > 0 and `ref_logps`, adds β·k3 KL per token; `kl_bias_correction` multiplies that KL by ρ
    (DeepSeek-V3.2's unbiased reverse-KL gradient, TRL's `use_bias_correction_kl`): ρ = 1 in value, but
    its gradient adds KL·∇log π.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    per_token = -torch.min(capped * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None and beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    return ClippedLoss(per_token, ratio, (ratio < 1 - epsilon_low) & (advantages < 0),
                       (ratio > 1 + epsilon_high) & (advantages > 0), kl)


def grpo_loss_sum(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_length: int) -> tuple[Tensor, int]:
    """(loss sum, item count) of one micro-batch for the engine's window normaliser (table above)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    rows = per_token.shape[0]
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), rows
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) * rows, rows
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length, rows
    return masked.sum(), int(mask.sum())


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL's `masked_whiten`);
    `shift_mean=False` rescales but keeps the mean (how PPO whitens rewards)."""
    mean = masked_mean(x, mask)
    centred = x - mean
    n = mask.sum().to(x.dtype)
    # Unbiased over n > 1 entries; one entry has no spread (its whitened value is 0, not 0 * inf = NaN).
    variance = masked_mean(centred**2, mask) * (n / (n - 1).clamp(min=1.0)).clamp(min=1.0)
    out = centred * torch.rsqrt(variance + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each completion: (advantages, returns = advantages + values).

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 past the last counted token; A_t = δ_t + γλ·A_{t+1}.
    Positions outside `mask` get 0. Inputs (B, T).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = torch.where(m > 0, values[:, t], next_value)
    return advantages, advantages + values


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's value loss: ½·max((V − R)², (clip(V, V_old ± c) − R)²), its masked mean, and the clipped fraction."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    fraction = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).to(values.dtype), mask)
    return masked_mean(loss, mask), fraction


def kl_penalised_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, *, kl_coef: float,
                         estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """PPO's per-token rewards: −kl_coef·KL_t at every counted token, plus the reward model's score on each
    completion's last counted token. Returns (rewards (B, T), per-token KL (B, T))."""
    if estimator not in ("k1", "k3"):
        raise ValueError(f"kl estimator must be k1 or k3, got {estimator!r}")
    kl = (k1_kl if estimator == "k1" else k3_kl)(logps, ref_logps) * mask
    rewards = -kl_coef * kl
    # The last counted position of each row (completions may sit after their prompt's positions).
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(-1)
    has = mask.bool().any(-1)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows[has], last[has]] += scores.to(rewards.dtype)[has]
    return rewards, kl
