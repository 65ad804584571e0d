"""The pure preference and distillation losses in `tunesmith.objectives.losses`.

Expected values are worked out here with the `math` module from the written formulas (TRL 1.16
definitions, /work/shared/reference/alignment.md and distillation.md), never by calling the
function under test. Tensors are tiny: the whole file runs in about a second on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.objectives.losses import (
    distill_loss,
    dpo_loss,
    hidden_cosine_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    reward_loss,
    simpo_loss,
)

LN2 = math.log(2.0)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def close(actual: torch.Tensor, expected, rel=1e-6, abs=1e-6) -> None:
    assert actual.detach().tolist() == pytest.approx(expected, rel=rel, abs=abs)


# --------------------------------------------------------------------------- DPO

# Δc = [1.0, 0.5, -1.0], Δr = [-0.5, -1.5, 1.0], Δ = [1.5, 2.0, -2.0]
PC, PR = [-5.0, -3.0, -4.0], [-7.0, -2.5, -3.0]
RC, RR = [-6.0, -3.5, -3.0], [-6.5, -1.0, -4.0]
DC = [p - r for p, r in zip(PC, RC)]
DR = [p - r for p, r in zip(PR, RR)]
DELTA = [c - r for c, r in zip(DC, DR)]


def dpo(loss_type="sigmoid", beta=0.1, grad=False, **kw):
    return dpo_loss(t(PC, grad=grad), t(PR, grad=grad), t(RC), t(RR), beta=beta, loss_type=loss_type, **kw)


def test_dpo_sigmoid_hand_values_and_rewards():
    losses, rc, rr = dpo("sigmoid", beta=0.1, grad=True)
    close(losses, [-logsig(0.1 * d) for d in DELTA])
    close(rc, [0.1 * d for d in DC])
    close(rr, [0.1 * d for d in DR])
    assert not rc.requires_grad and not rr.requires_grad
    assert losses.requires_grad


def test_dpo_hinge_hand_values():
    losses, _, _ = dpo("hinge", beta=0.6)
    # 1 − 0.6Δ = [0.1, −0.2, 2.2]; the middle pair is past the margin.
    close(losses, [max(0.0, 1 - 0.6 * d) for d in DELTA])
    assert losses[1].item() == 0.0


def test_dpo_ipo_averages_per_token():
    nc, nr = [2, 5, 4], [3, 1, 0]  # a zero count is clamped to 1, as TRL clamps the mask sum
    losses, _, _ = dpo("ipo", beta=0.1, chosen_len=torch.tensor(nc), rejected_len=torch.tensor(nr))
    expected = [(c / n - r / max(m, 1) - 1 / (2 * 0.1)) ** 2 for c, r, n, m in zip(DC, DR, nc, nr)]
    close(losses, expected)
    # Summing instead of averaging would give a different number for the first pair.
    assert expected[0] != pytest.approx((DC[0] - DR[0] - 5.0) ** 2)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_robust_hand_values(eps):
    losses, _, _ = dpo("robust", beta=0.1, label_smoothing=eps)
    expected = [(-(1 - eps) * logsig(0.1 * d) + eps * logsig(-0.1 * d)) / (1 - 2 * eps) for d in DELTA]
    close(losses, expected)


@pytest.mark.parametrize(
    ("loss_type", "kw", "expected"),
    [
        ("sigmoid", {}, LN2),
        ("ipo", {"chosen_len": torch.tensor([3, 7]), "rejected_len": torch.tensor([5, 2])}, 25.0),
        ("hinge", {}, 1.0),
        ("robust", {"label_smoothing": 0.0}, LN2),
        ("robust", {"label_smoothing": 0.1}, LN2),
    ],
)
def test_dpo_policy_equals_reference(loss_type, kw, expected):
    chosen, rejected = t([-12.5, -3.25]), t([-8.0, -20.0])
    losses, rc, rr = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1, loss_type=loss_type, **kw)
    close(losses, [expected, expected], rel=1e-6)
    close(rc, [0.0, 0.0])
    close(rr, [0.0, 0.0])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_gradcheck_float64(loss_type):
    kw = {"chosen_len": torch.tensor([2, 3]), "rejected_len": torch.tensor([4, 1])} if loss_type == "ipo" else {}
    if loss_type == "robust":
        kw["label_smoothing"] = 0.2
    ref_c, ref_r = t([-4.0, -2.0], torch.float64), t([-3.0, -6.0], torch.float64)

    def f(pc, pr):
        return dpo_loss(pc, pr, ref_c, ref_r, beta=0.3, loss_type=loss_type, **kw)[0]

    # Hinge is non-differentiable only at βΔ = 1; these points are well away from it.
    assert torch.autograd.gradcheck(f, (t([-3.5, -2.2], torch.float64, True), t([-3.9, -5.0], torch.float64, True)))


def test_dpo_errors():
    with pytest.raises(ValueError, match="loss_type"):
        dpo("nope")
    for eps in (0.5, -0.1, 0.7):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            dpo("robust", label_smoothing=eps)
    with pytest.raises(ValueError, match="only 'robust'"):
        dpo("sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="chosen_len"):
        dpo("ipo", rejected_len=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="rejected_len"):
        dpo("ipo", chosen_len=torch.tensor([1, 1, 1]))
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            dpo("sigmoid", beta=beta)
    with pytest.raises(ValueError, match="shape mismatch"):
        dpo_loss(t([1.0, 2.0]), t([1.0]), t([1.0, 2.0]), t([1.0, 2.0]), beta=0.1)


def test_dpo_upcasts_bf16():
    x = torch.tensor([-3.0, -4.0], dtype=torch.bfloat16)
    losses, _, _ = dpo_loss(x, x, x, x, beta=0.1)
    assert losses.dtype == torch.float32
    close(losses, [LN2, LN2])


# --------------------------------------------------------------------------- reward model


def test_reward_loss_hand_values_with_margin_and_centering():
    rc, rr, m, c = [1.0, 0.5, -0.2], [0.2, 0.7, -1.0], [0.5, 0.0, 1.0], 0.01
    losses = reward_loss(t(rc), t(rr), margin=t(m), center_coefficient=c)
    close(losses, [-logsig(a - b - mm) + c * (a + b) ** 2 for a, b, mm in zip(rc, rr, m)])
    # TRL adds c·mean((rc + rr)²) once to the mean BT loss; the per-pair spread has the same mean.
    bt = sum(-logsig(a - b - mm) for a, b, mm in zip(rc, rr, m)) / 3
    trl = bt + c * sum((a + b) ** 2 for a, b in zip(rc, rr)) / 3
    assert losses.mean().item() == pytest.approx(trl, rel=1e-6)


def test_reward_loss_equal_rewards_is_ln2_and_scalar_margin():
    close(reward_loss(t([0.3, -2.0]), t([0.3, -2.0])), [LN2, LN2])
    close(reward_loss(t([1.0]), t([0.0]), margin=1.0), [LN2])
    with pytest.raises(ValueError, match="center_coefficient"):
        reward_loss(t([1.0]), t([0.0]), center_coefficient=-0.1)


# --------------------------------------------------------------------------- KTO


def test_kto_hand_values():
    pol, ref = [-3.0, -4.0, -2.0, -5.0], [-3.5, -3.0, -2.5, -4.0]  # Δ = [0.5, −1, 0.5, −1]
    desirable = torch.tensor([True, False, True, False])
    beta, z, wd, wu = 0.5, 0.2, 1.0, 1.5
    kl = torch.tensor(z, requires_grad=True)
    losses, rewards = kto_loss(
        t(pol, grad=True), t(ref), desirable, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    d = [p - r for p, r in zip(pol, ref)]
    expected = [
        wd * (1 - sigmoid(beta * (d[0] - z))),
        wu * (1 - sigmoid(beta * (z - d[1]))),
        wd * (1 - sigmoid(beta * (d[2] - z))),
        wu * (1 - sigmoid(beta * (z - d[3]))),
    ]
    close(losses, expected)
    close(rewards, [beta * x for x in d])
    assert not rewards.requires_grad
    losses.sum().backward()
    assert kl.grad is None  # z is a detached baseline


def test_kto_negative_kl_clamped_and_invariant():
    losses, _ = kto_loss(t([-2.0, -2.0]), t([-3.0, -1.0]), torch.tensor([True, False]), torch.tensor(-0.3), beta=0.1)
    close(losses, [1 - sigmoid(0.1 * 1.0), 1 - sigmoid(0.1 * 1.0)])
    # Δ = z = 0: every example costs exactly 1/2.
    same = t([-4.0, -7.0, -1.0])
    losses, _ = kto_loss(same, same.clone(), torch.tensor([True, False, True]), torch.tensor(0.0), beta=0.1)
    close(losses, [0.5, 0.5, 0.5])


def test_kto_kl_estimate():
    kl = kto_kl_estimate(t([-3.0, -4.0, -5.0], grad=True), t([-3.5, -4.2, -5.5]))
    assert kl.item() == pytest.approx((0.5 + 0.2 + 0.5) / 3, rel=1e-6)
    assert not kl.requires_grad and kl.dim() == 0
    assert kto_kl_estimate(t([-3.0, -4.0]), t([-2.0, -3.5])).item() == 0.0  # mean −0.75 clamped
    with pytest.raises(ValueError, match="batch size > 1"):
        kto_kl_estimate(t([]), t([]))


def test_kto_errors():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t([1.0]), t([1.0]), torch.tensor([1]), torch.tensor(0.0), beta=0.1)
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(t([1.0]), t([1.0]), torch.tensor([True]), torch.tensor(0.0), beta=0.1, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(t([1.0]), t([1.0]), torch.tensor([True]), torch.tensor(0.0), beta=0.0)


# --------------------------------------------------------------------------- ORPO


def log_odds(lc: float, lr: float) -> float:
    return (lc - lr) - (math.log(-math.expm1(lc)) - math.log(-math.expm1(lr)))


def test_orpo_hand_values():
    lc, lr, nll, beta = [-0.5, -1.2], [-1.5, -0.3], 0.8, 0.1
    losses, ratio, odds = orpo_loss(t(lc, grad=True), t(lr), torch.tensor(nll), beta=beta)
    L = [log_odds(a, b) for a, b in zip(lc, lr)]
    close(odds, L)
    close(ratio, [logsig(x) for x in L])
    close(losses, [nll - beta * logsig(x) for x in L])
    assert losses.requires_grad and not ratio.requires_grad and not odds.requires_grad
    # Equal log-probs: odds ratio 1, L = 0, loss = NLL + β·ln 2.
    losses, _, odds = orpo_loss(t([-0.7]), t([-0.7]), 1.5, beta=0.2)
    close(odds, [0.0])
    close(losses, [1.5 + 0.2 * LN2])


def test_orpo_log1mexp_stable_near_zero_in_fp32():
    # A near-certain chosen completion: 1 − e^ℓ cancels catastrophically if computed naively.
    lc, lr = -1e-6, -2.0
    _, _, odds = orpo_loss(t([lc], grad=True), t([lr]), 0.0, beta=0.1)
    assert odds.item() == pytest.approx(log_odds(lc, lr), rel=1e-5)
    x = t([-1e-4, -3.0], grad=True)
    losses, _, _ = orpo_loss(x, t([-2.0, -0.01]), 0.0, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(x.grad).all()
    # An average log-prob that rounds to 0 (every token certain), or just below it in fp32: finite loss and
    # gradients on both sides (log 0 and the discarded branch's inf gave inf and NaN).
    for value in (0.0, -1e-9, -5e-8):
        c, r = t([value], grad=True), t([value], grad=True)
        losses, _, _ = orpo_loss(c, r, 0.0, beta=0.1)
        (losses.sum()).backward()
        assert torch.isfinite(losses).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


# --------------------------------------------------------------------------- SimPO


def test_simpo_hand_values():
    lc, lr, beta, gamma, ls = [-0.8, -1.5], [-1.2, -1.0], 2.0, 0.5, 0.1
    losses = simpo_loss(t(lc), t(lr), beta=beta, gamma=gamma, label_smoothing=ls)
    x = [beta * (a - b) - gamma for a, b in zip(lc, lr)]  # [0.3, −1.5]
    close(losses, [-(1 - ls) * logsig(v) - ls * logsig(-v) for v in x])


def test_simpo_gamma_is_margin_on_scaled_reward():
    # β(ℓc − ℓr) = γ puts the logit at 0 whatever β is: γ is not divided by β in the result.
    for beta in (0.1, 2.5):
        close(simpo_loss(t([-1.0]), t([-1.0 - 0.5 / beta]), beta=beta, gamma=0.5), [LN2])
    close(simpo_loss(t([-0.4, -2.0]), t([-0.4, -2.0]), beta=0.1, gamma=0.0), [LN2, LN2])
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(t([-1.0]), t([-1.0]), beta=0.1, gamma=0.5, label_smoothing=0.6)


# --------------------------------------------------------------------------- distillation

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TCH = [[0.5, 1.5, 1.0], [1.0, 1.0, 1.0]]


def softmax(z: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def jsd(pt: list[float], ps: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


@pytest.mark.parametrize(
    ("kind", "beta", "ref"),
    [
        ("forward_kl", 0.5, lambda pt, ps: kl(pt, ps)),
        ("reverse_kl", 0.5, lambda pt, ps: kl(ps, pt)),
        ("jsd", 0.3, lambda pt, ps: jsd(pt, ps, 0.3)),
        ("jsd", 0.5, lambda pt, ps: jsd(pt, ps, 0.5)),
    ],
)
def test_distill_hand_values(kind, beta, ref):
    temp = 2.0
    expected = [ref(softmax(tt, temp), softmax(ss, temp)) for ss, tt in zip(S, TCH)]
    out = distill_loss(t(S), t(TCH), temperature=temp, kind=kind, beta=beta)
    assert out.shape == (2,)
    close(out, expected, rel=1e-5)
    close(distill_loss(t(S), t(TCH), temperature=temp, kind=kind, beta=beta, scale_by_t2=True),
          [4.0 * e for e in expected], rel=1e-5)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(0)
    s, tt = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    torch.testing.assert_close(distill_loss(s, tt, kind="jsd", beta=0.0), distill_loss(s, tt, kind="forward_kl"))
    torch.testing.assert_close(distill_loss(s, tt, kind="jsd", beta=1.0), distill_loss(s, tt, kind="reverse_kl"))
    # Forward and reverse KL genuinely differ here, so the two checks above are not the same check.
    assert not torch.allclose(distill_loss(s, tt, kind="forward_kl"), distill_loss(s, tt, kind="reverse_kl"))
    # Hand value for one position at β = 0: KL(p_T‖p_S) at T = 1.
    ps, pt = softmax(s[1, 3].tolist(), 1.0), softmax(tt[1, 3].tolist(), 1.0)
    assert distill_loss(s, tt, kind="jsd", beta=0.0)[1, 3].item() == pytest.approx(kl(pt, ps), rel=1e-5)


@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
def test_distill_identical_distributions_is_zero(kind, beta):
    s = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(1))
    # A constant shift of the logits leaves the distribution unchanged.
    out = distill_loss(s, s + 3.0, kind=kind, beta=beta, temperature=0.7)
    torch.testing.assert_close(out, torch.zeros(3, 4), atol=1e-6, rtol=0)


def test_distill_mask_selects_positions():
    s, tt = t([S]), t([TCH])  # (1, 2, 3)
    out = distill_loss(s, tt, kind="forward_kl", mask=torch.tensor([[True, False]]))
    assert out.shape == (1,)
    close(out, [kl(softmax(TCH[0], 1.0), softmax(S[0], 1.0))], rel=1e-5)
    labels = torch.tensor([[-100, 7]])
    out = distill_loss(s, tt, kind="reverse_kl", mask=labels != -100)
    close(out, [kl(softmax(S[1], 1.0), softmax(TCH[1], 1.0))], rel=1e-5)
    with pytest.raises(ValueError, match="mask shape"):
        distill_loss(s, tt, mask=torch.tensor([True, False]))


def test_distill_fp32_and_stable_on_extreme_logits():
    s = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    tt = torch.tensor([[-1000.0, 1000.0, 0.0], [50.0, -50.0, 0.0]], dtype=torch.bfloat16)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        out = distill_loss(s, tt, kind=kind)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all() and (out >= 0).all()
    # Two near one-hot distributions on different tokens: forward KL ≈ 2000 (the logit gap).
    assert distill_loss(s, tt, kind="forward_kl")[0].item() == pytest.approx(2000.0, rel=1e-3)


@pytest.mark.parametrize(("kind", "beta"), [("jsd", 0.3), ("forward_kl", 0.5), ("reverse_kl", 0.5)])
def test_distill_gradcheck_float64(kind, beta):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tt = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(
        lambda a, b: distill_loss(a, b, kind=kind, beta=beta, temperature=1.5, mask=mask), (s, tt)
    )


def test_distill_errors():
    with pytest.raises(ValueError, match=r"student vocab size 5 != teacher vocab size 7"):
        distill_loss(torch.zeros(2, 5), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="kind"):
        distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), kind="kl")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        distill_loss(torch.zeros(2, 5), torch.zeros(3, 5))


def test_hidden_cosine_loss():
    s = t([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]])
    h = t([[[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]]])
    close(hidden_cosine_loss(s, h, torch.tensor([[1, 1, 0]])), [1.0, 0.0])  # orthogonal, parallel; third masked
    full = hidden_cosine_loss(s, h, None)
    assert full.shape == (1, 3)
    close(full[0], [1.0, 0.0, 1 - 24 / 25])
    with pytest.raises(ValueError, match="hidden size 2 != teacher hidden size 3"):
        hidden_cosine_loss(s, torch.zeros(1, 3, 3), None)
