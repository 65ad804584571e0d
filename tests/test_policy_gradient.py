"""Online RL's pure functions against hand-computed numbers (and TRL's nanstd where it exists)."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.objectives.policy_gradient import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    grpo_loss_sum,
    k3_kl,
    kl_penalised_rewards,
    nanstd,
    whiten,
)

SQRT_THIRD = math.sqrt(1 / 3)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_group_advantages_normalise_within_each_prompt_group():
    out = group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]), 4, "group")
    a = 0.5 / (SQRT_THIRD + 1e-4)
    assert out.advantages.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], rel=1e-6)
    assert out.std_is_zero.tolist() == [False] * 4 + [True] * 4


def test_scale_none_only_centres_and_batch_uses_the_batch_std():
    rewards = torch.tensor([1.0, 0, 3, 3])
    assert group_advantages(rewards, 2, "none").advantages.tolist() == [0.5, -0.5, 0, 0]
    std = torch.tensor([1.0, 0, 3, 3]).std().item()  # unbiased, over the whole batch
    got = group_advantages(rewards, 2, "batch").advantages
    assert got.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0, 0], rel=1e-6)


def test_an_unscored_completion_is_left_out_of_its_group_and_gets_no_advantage():
    out = group_advantages(torch.tensor([1.0, float("nan"), 0, 1]), 4, "group")
    a = 1 / 3 / (SQRT_THIRD + 1e-4)  # mean 2/3 and std sqrt(1/3) of [1, 0, 1]
    assert out.advantages.tolist() == pytest.approx([a, 0, -2 * a, a], rel=1e-6)


def test_group_advantages_refuse_bad_settings():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "mean")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_nanstd_matches_trl():
    utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed")
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    x[1, 2] = x[4, 0] = float("nan")
    assert torch.allclose(nanstd(x, dim=1), utils.nanstd(x, dim=1), equal_nan=True)
    assert torch.allclose(nanstd(x), utils.nanstd(x))


def test_clipped_policy_loss_by_hand():
    logps = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    out = clipped_policy_loss(logps, torch.zeros(1, 4), torch.tensor([[1.0, -1.0, -1.0, 1.0]]), epsilon_low=0.2)
    # ratio 1.5, A 1: min(1.5, 1.2) -> -1.2 (clipped); A -1: min(-1.5, -1.2) -> 1.5; ratio 0.5, A -1: min(-0.5, -0.8)
    # -> 0.8 (clipped); A 1: min(0.5, 0.8) -> -0.5.
    close(out.per_token, [[-1.2, 1.5, 0.8, -0.5]])
    assert out.high_clipped.tolist() == [[True, False, False, False]]
    assert out.low_clipped.tolist() == [[False, False, True, False]]
    wider = clipped_policy_loss(logps, torch.zeros(1, 4), torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.6)
    assert wider.per_token[0, 0].item() == pytest.approx(-1.5)  # ratio 1.5 inside 1 + 0.6


def test_first_step_ratio_is_one_and_the_gradient_is_minus_the_advantage():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = clipped_policy_loss(logps, logps.detach(), torch.tensor([0.7]))
    assert out.ratio.tolist() == [[1.0, 1.0]]
    out.per_token.sum().backward()
    close(logps.grad, [[-0.7, -0.7]])


def test_k3_kl_is_zero_at_the_reference_and_adds_beta_times_it():
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    assert k3_kl(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(1 - math.log(2))
    out = clipped_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1.0]),
                              ref_logps=torch.tensor([[math.log(2)]]), beta=0.1)
    assert out.per_token.item() == pytest.approx(-1 + 0.1 * (1 - math.log(2)))


def test_each_loss_type_normalises_as_trl():
    per_token = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    total, n = grpo_loss_sum(per_token, mask, "grpo", 4)
    assert (total.item(), n) == (pytest.approx(1.5 + 5.0), 2)  # mean of per-sequence means, times 2
    total, n = grpo_loss_sum(per_token, mask, "bnpo", 4)
    assert (total.item(), n) == (pytest.approx(18 / 5 * 2), 2)
    total, n = grpo_loss_sum(per_token, mask, "dr_grpo", 4)
    assert (total.item() / n) == pytest.approx(18 / (2 * 4))
    total, n = grpo_loss_sum(per_token, mask, "dapo", 4)
    assert (total.item(), n) == (pytest.approx(18.0), 5)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss_sum(per_token, mask, "ppo", 4)


def test_gae_by_hand_and_against_its_closed_form():
    adv, ret = gae(torch.tensor([[0.0, 0, 1]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), gamma=1, lam=1)
    close(adv, [[0.5, 0.5, 0.5]])  # deltas 0, 0, 0.5 summed forward
    close(ret, [[1.0, 1.0, 1.0]])

    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    gamma, lam = 0.9, 0.8
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b in range(2):
        n = int(mask[b].sum())
        v = values[b, :n].tolist() + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            closed = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(closed, rel=1e-5, abs=1e-6)
        assert adv[b, n:].abs().sum().item() == 0


def test_whiten_over_the_mask():
    x = torch.tensor([[1.0, 2, 3, 100]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = whiten(x, mask)
    assert out[0, :3].tolist() == pytest.approx([-1, 0, 1], abs=1e-4)  # mean 2, unbiased std 1
    assert whiten(x, mask, shift_mean=False)[0, :3].tolist() == pytest.approx([1, 2, 3], abs=1e-4)
    # One counted entry (a one-token completion in a batch of one): no spread, a 0 advantage, not NaN.
    one = whiten(torch.tensor([[4.0, 7.0]]), torch.tensor([[1, 0]]))
    assert torch.isfinite(one).all() and one[0, 0].item() == 0.0
    assert whiten(torch.tensor([[4.0]]), torch.tensor([[1]]), shift_mean=False).item() == pytest.approx(4.0)


def test_value_loss_is_clipped_around_the_old_values():
    loss, fraction = clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]),
                                        torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (2 - 0.7) ** 2)  # clipped value 0.7 is further from the return
    assert fraction.item() == 1.0


def test_ppo_rewards_put_the_score_on_the_last_token_and_kl_everywhere():
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, 0, 0], [0, -0.5, 0]])
    close(rewards, [[-0.05, 0, 2.0], [0, 0.05 - 1.0, 0]])
    zero, _ = kl_penalised_rewards(torch.zeros(2), logps, logps, mask, kl_coef=0.1, estimator="k3")
    assert zero.abs().sum().item() == 0
    # Completions after their prompt's positions (the layout of a prompt + completion row): the score lands on
    # each row's last counted position, not at index length - 1.
    shifted = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]])
    placed, _ = kl_penalised_rewards(torch.tensor([2.0, -1.0]), torch.zeros(2, 4), torch.zeros(2, 4), shifted,
                                     kl_coef=0.1)
    close(placed, [[0, 0, 2.0, 0], [0, 0, -1.0, 0]])


def test_kl_bias_correction_keeps_the_value_and_adds_kl_times_the_score_to_the_gradient():
    ref = torch.tensor([[math.log(2)]])
    grads = {}
    for corrected in (False, True):
        logps = torch.zeros(1, 1, requires_grad=True)
        out = clipped_policy_loss(logps, logps.detach(), torch.tensor([0.0]), ref_logps=ref, beta=1.0,
                                  kl_bias_correction=corrected)
        assert out.per_token.item() == pytest.approx(1 - math.log(2))  # ρ = 1 in value
        out.per_token.sum().backward()
        grads[corrected] = logps.grad.item()
    # d k3 / d θ = 1 − e^(ref − θ) = −1 at θ = 0; the correction adds k3 · d ρ / d θ = k3.
    assert grads[False] == pytest.approx(-1.0)
    assert grads[True] == pytest.approx(-1.0 + (1 - math.log(2)))
