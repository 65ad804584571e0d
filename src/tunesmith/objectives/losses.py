"""Pure loss functions for preference alignment and knowledge distillation.

Tensors in, tensors out: no models, tokenizers or config objects. Each function returns
*per-example* (or per-position) losses; the caller reduces them (TRL takes the plain mean,
KTO `nanmean`), so gradient accumulation and multi-process reduction stay the caller's choice.

Preference losses (TRL 1.16 definitions, file:line from the 1.16.0 wheel):
  `dpo_loss`        DPO sigmoid / hinge / ipo / robust   trl/trainer/dpo_trainer.py:1387-1431
  `reward_loss`     Bradley-Terry reward modelling        trl/trainer/reward_trainer.py:788-795
  `kto_loss`        KTO (+ `kto_kl_estimate` for z)       trl/trainer/kto_trainer.py:1441-1475
  `orpo_loss`       ORPO odds-ratio loss + NLL            trl/experimental/orpo/orpo_trainer.py:87,670-702,848
  `simpo_loss`      SimPO (CPO loss_type="simpo")         trl/experimental/cpo/cpo_trainer.py:715-722

Distillation losses:
  `distill_loss`        forward KL / reverse KL / generalized JSD (TRL GKD
                        `generalized_jsd_loss`, trl/experimental/gkd/gkd_trainer.py:238-321)
  `hidden_cosine_loss`  DistilBERT's cosine embedding loss on hidden states
                        (transformers examples/research_projects/distillation/distiller.py)

Everything is computed in at least float32: low-precision inputs are upcast, float64 is kept
(so `torch.autograd.gradcheck` works).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DPO_LOSS_TYPES",
    "DISTILL_KINDS",
    "distill_loss",
    "dpo_loss",
    "hidden_cosine_loss",
    "kto_kl_estimate",
    "kto_loss",
    "orpo_loss",
    "reward_loss",
    "simpo_loss",
]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _f32(x: Tensor) -> Tensor:
    # bf16/fp16 log-probs lose the small differences these losses are made of; fp64 is kept for gradcheck.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


# --------------------------------------------------------------------------- preference


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and the implicit rewards, as TRL 1.16 `DPOTrainer` (f_divergence "reverse_kl").

    Inputs are per-sequence log-probs **summed** over completion tokens, shape (B,).
    With Δc = policy_chosen − ref_chosen, Δr = policy_rejected − ref_rejected, Δ = Δc − Δr:

    - ``sigmoid`` (dpo_trainer.py:1387): −log σ(βΔ). No label smoothing in TRL 1.16.
    - ``hinge``   (:1390): relu(1 − βΔ).
    - ``ipo``     (:1393): (Δc/nc − Δr/nr − 1/(2β))², log-ratios averaged per completion token;
      nc, nr = `chosen_len`, `rejected_len` (clamped to ≥ 1, as TRL clamps the mask sum). β is IPO's τ.
    - ``robust``  (:1428): [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1−2ε),
      ε = `label_smoothing` ∈ [0, 0.5).

    `label_smoothing` is only read by ``robust`` in TRL; a non-zero value with another loss type
    raises instead of being silently ignored.

    Returns ``(losses, chosen_rewards, rejected_rewards)``: losses (B,), rewards βΔc and βΔr, detached
    (TRL's ``rewards/chosen`` and ``rewards/rejected``, dpo_trainer.py ~1580).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    _check_beta(beta)
    if loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing (ε) must lie in [0, 0.5) for the robust loss, got {label_smoothing}")
    elif label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect on the {loss_type!r} DPO loss in TRL 1.16 "
            "(only 'robust' uses it); set it to 0.0"
        )
    _check_same_shape(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )

    chosen_logratios = _f32(policy_chosen) - _f32(ref_chosen)
    rejected_logratios = _f32(policy_rejected) - _f32(ref_rejected)
    delta = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        for name, value in (("chosen_len", chosen_len), ("rejected_len", rejected_len)):
            if value is None:
                raise ValueError(
                    f"loss_type='ipo' averages log-ratios per token and needs {name} (completion token counts)"
                )
        # Summed log-ratios make the squared loss grow with length; TRL divides by the token count
        # (confirmed with the IPO authors, per the code comment), clamped so empty completions don't divide by 0.
        nc = torch.as_tensor(chosen_len, device=delta.device).to(delta.dtype).clamp(min=1.0)
        nr = torch.as_tensor(rejected_len, device=delta.device).to(delta.dtype).clamp(min=1.0)
        ipo_delta = chosen_logratios / nc - rejected_logratios / nr
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:  # robust
        eps = label_smoothing
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)

    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> Tensor:
    """Per-pair Bradley-Terry reward-model loss, as TRL 1.16 `RewardTrainer.compute_loss` (reward_trainer.py:788-795).

    loss_i = −log σ(r_c,i − r_r,i − m_i) + c·(r_c,i + r_r,i)²

    TRL adds the centering term once to the batch loss as c·mean((r_c + r_r)²) (arXiv 2312.09244 Eq. 2).
    Here it is spread per pair, so ``reward_loss(...).mean()`` equals TRL's loss exactly
    (mean(a) + c·mean(b) = mean(a + c·b)), and so do its gradients.

    `margin`: optional per-pair (or scalar) margin m (TRL's ``margin`` column); None means 0.
    `center_coefficient`: c ≥ 0 (TRL's ``center_rewards_coefficient``; None there ≡ 0.0 here).
    """
    if not (center_coefficient >= 0 and math.isfinite(center_coefficient)):
        raise ValueError(f"center_coefficient must be a finite number >= 0, got {center_coefficient!r}")
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    rc, rr = _f32(chosen_rewards), _f32(rejected_rewards)
    logits = rc - rr
    if margin is not None:
        logits = logits - (_f32(margin) if isinstance(margin, Tensor) else margin)
    losses = -F.logsigmoid(logits)
    if center_coefficient:
        losses = losses + center_coefficient * (rc + rr) ** 2
    return losses


def kto_kl_estimate(policy_mismatched_logps: Tensor, ref_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point z = max(0, mean(log π(y'|x) − log π_ref(y'|x))), detached (kto_trainer.py:1441-1443).

    Inputs are summed log-probs of *mismatched* pairs (each prompt with the completion of the previous
    row in the batch). Returns a 0-d tensor.

    Multi-process: TRL gathers the per-process means and clamps the global mean. To reproduce that,
    gather ``(policy - ref).mean()`` yourself and pass it to `kto_loss`, which clamps again.
    """
    _check_same_shape(policy_mismatched_logps=policy_mismatched_logps, ref_mismatched_logps=ref_mismatched_logps)
    if policy_mismatched_logps.numel() == 0:
        raise ValueError("kto_kl_estimate needs at least one mismatched pair (KTO needs a batch size > 1)")
    kl = (_f32(policy_mismatched_logps) - _f32(ref_mismatched_logps)).mean().detach()
    return kl.clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO losses and rewards, as TRL 1.16 `KTOTrainer` loss_type "kto" (kto_trainer.py:1444-1475).

    With Δ = policy_logps − ref_logps (summed log-probs) and z = max(0, kl) detached:
      desirable:    w_d · (1 − σ(β(Δ − z)))
      undesirable:  w_u · (1 − σ(β(z − Δ)))

    Returns ``(losses, rewards)``, both (B,) in **input order**, rewards = βΔ detached. TRL concatenates
    the desirable losses before the undesirable ones; its loss is ``losses.nanmean()``, which is
    order-independent, so ``kto_loss(...)[0].nanmean()`` is TRL's loss.
    """
    _check_beta(beta)
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got dtype {desirable.dtype}")
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)

    logratios = _f32(policy_logps) - _f32(ref_logps)
    # z is a baseline, not a training signal: TRL detaches it and clamps it at 0.
    z = _f32(torch.as_tensor(kl, device=logratios.device)).detach().clamp(min=0)
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios)))
    return torch.where(desirable, chosen, rejected), beta * logratios.detach()


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 − e^x) for x < 0, TRL's `log1mexp` (orpo_trainer.py:87): branch at −ln 2 where each
    # form avoids cancellation (Mächler 2012).
    # Each branch gets inputs on its own side only, so the branch torch.where discards stays finite
    # (its inf would turn the zero gradient it receives into NaN), and x is kept below 0: an average
    # log-prob that rounds to 0 (every token certain) would otherwise give log 0.
    x = x.clamp(max=-1e-7)
    cut = -math.log(2)
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))), torch.log(-torch.expm1(x.clamp(min=cut))))


def orpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    chosen_nll: Tensor | float,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair ORPO loss, as TRL 1.16 `ORPOTrainer.odds_ratio_loss` + `get_batch_loss_metrics`.

    Source: trl/experimental/orpo/orpo_trainer.py:87 (log1mexp), 670-702, 848.

    ℓ = length-**averaged** completion log-probs (must be < 0); no reference model.
      L      = (ℓc − ℓr) − (log(1 − e^ℓc) − log(1 − e^ℓr))      log odds ratio
      loss_i = NLL_chosen − β·log σ(L_i)

    `chosen_nll`: the chosen SFT loss, scalar or (B,). TRL uses one token-mean cross-entropy over the
    chosen rows (prompt *and* completion tokens); with that scalar, ``orpo_loss(...)[0].mean()`` equals
    TRL's ``nll − β·mean(log σ(L))``.

    Returns ``(losses, log_odds_ratio, log_odds_chosen)``, all per pair; the last two are detached
    metrics, named as TRL logs them: ``log_odds_ratio`` = log σ(L) and ``log_odds_chosen`` = L (TRL logs their means).
    """
    _check_beta(beta)
    _check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    lc, lr = _f32(chosen_avg_logps), _f32(rejected_avg_logps)
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))
    ratio = F.logsigmoid(log_odds)
    nll = _f32(chosen_nll) if isinstance(chosen_nll, Tensor) else float(chosen_nll)
    losses = nll - beta * ratio
    return losses, ratio.detach(), log_odds.detach()


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair SimPO loss, as TRL 1.16 `CPOTrainer.cpo_loss` with loss_type "simpo" (cpo_trainer.py:715-722).

    ℓ = length-**averaged** completion log-probs; no reference model. TRL 1.16 divides γ by β and
    multiplies back, so γ is the margin on the β-scaled reward (the SimPO paper's γ):
      x      = β·((ℓc − ℓr) − γ/β)                    (= β(ℓc − ℓr) − γ)
      loss_i = −(1 − ls)·log σ(x) − ls·log σ(−x)

    SimPO proper is this loss with CPO's NLL term off (``cpo_alpha=0``); add an NLL term yourself for
    CPO-SimPO. Chosen/rejected rewards, if wanted for logging, are β·ℓ (TRL's CPO metrics).
    `label_smoothing` ∈ [0, 0.5] (TRL does not check it; above 0.5 would flip the preference).
    """
    _check_beta(beta)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    _check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    # TRL's operation order (γ/β subtracted, then scaled by β), so fp32 rounding matches TRL's too.
    logits = (_f32(chosen_avg_logps) - _f32(rejected_avg_logps)) - gamma / beta
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


# --------------------------------------------------------------------------- distillation


def _select(x: Tensor, mask: Tensor | None, name: str) -> Tensor:
    if mask is None:
        return x
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} positions {tuple(x.shape[:-1])}")
    # Select before any vocab-sized arithmetic: padding and prompt positions never cost memory.
    return x[mask.bool()]


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: Tensor | None = None,
    scale_by_t2: bool = False,
) -> Tensor:
    """Per-position distillation loss between student and teacher token distributions.

    p_S = softmax(student_logits/T), p_T = softmax(teacher_logits/T), computed as log-softmax in ≥ fp32.

    - ``forward_kl``: KL(p_T‖p_S) (the teacher-weighted KL; DistilBERT's L_ce and torchtune's
      ForwardKLLoss up to the teacher entropy, which has no gradient).
    - ``reverse_kl``: KL(p_S‖p_T).
    - ``jsd``: TRL GKD's generalized JSD (`generalized_jsd_loss`, gkd_trainer.py:238-296), exactly:
      β = 0 → KL(p_T‖p_S); β = 1 → KL(p_S‖p_T); otherwise β·KL(p_T‖M) + (1−β)·KL(p_S‖M) with
      M = β·p_T + (1−β)·p_S. As in TRL the endpoints are special-cased: the mixture form itself tends
      to 0 as β → 0 or 1, so the loss is not continuous in β there. `beta` is ignored by the other kinds.

    `mask`: optional, shape ``logits.shape[:-1]``; truthy = position counts (e.g. ``labels != -100``).
    Returns a 1-D tensor over the selected positions when a mask is given, otherwise a tensor of shape
    ``logits.shape[:-1]``. TRL's "batchmean" reduction is ``out.sum() / max(out.numel(), 1)``.

    Note: TRL's `GKDTrainer.compute_loss` calls `generalized_jsd_loss` without a temperature, so GKD
    trains at T = 1 (its config temperature only affects generation); `DistillationTrainer` passes T.

    `scale_by_t2`: multiply by T² (Hinton et al.; DistilBERT's ``alpha_ce`` term), which keeps gradient
    magnitudes comparable across temperatures. Off by default because TRL (GKD, DistillationTrainer)
    does not scale; at T = 1 it makes no difference.
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}; expected one of {DISTILL_KINDS}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student vocab size {student_logits.shape[-1]} != teacher vocab size {teacher_logits.shape[-1]}: "
            "logit distillation needs one shared vocabulary (truncate padded vocabularies to the common size, "
            "or use sequence-level distillation for different tokenizers)"
        )
    _check_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)

    s = _f32(_select(student_logits, mask, "student_logits")) / temperature
    t = _f32(_select(teacher_logits, mask, "teacher_logits")) / temperature
    s_lp, t_lp = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)

    # F.kl_div(input, target, log_target=True) = Σ p_target·(log p_target − input) = KL(target‖input).
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        per_vocab = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        per_vocab = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_lp.dtype, device=s_lp.device)
        # log M via logsumexp: never leaves log space, so tiny probabilities don't underflow.
        m_lp = torch.logsumexp(torch.stack([s_lp + torch.log1p(-b), t_lp + torch.log(b)]), dim=0)
        per_vocab = b * F.kl_div(m_lp, t_lp, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            m_lp, s_lp, reduction="none", log_target=True
        )
    loss = per_vocab.sum(dim=-1)
    return loss * temperature**2 if scale_by_t2 else loss


def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Per-position 1 − cos(h_S, h_T), DistilBERT's ``CosineEmbeddingLoss`` with target 1 (distiller.py `step()`).

    Hidden states (..., H) must have the same width (DistilBERT copies teacher layers into the student).
    `mask` (shape ``hidden.shape[:-1]``, truthy = real token, e.g. the attention mask) selects positions;
    returns a 1-D tensor over them (or shape ``hidden.shape[:-1]`` when `mask` is None).
    DistilBERT's L_cos is the mean of this.
    """
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"student hidden size {student_hidden.shape[-1]} != teacher hidden size {teacher_hidden.shape[-1]}"
        )
    _check_same_shape(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    s = _f32(_select(student_hidden, mask, "student_hidden"))
    t = _f32(_select(teacher_hidden, mask, "teacher_hidden"))
    lead = s.shape[:-1]
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    # cosine_embedding_loss (not cosine_similarity) for DistilBERT's exact eps handling.
    target = torch.ones(s.shape[0], dtype=s.dtype, device=s.device)
    return F.cosine_embedding_loss(s, t, target, reduction="none").reshape(lead)
