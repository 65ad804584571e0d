"""Preference objectives without a reference model: ORPO and SimPO (TRL 1.16 definitions).

Rows and batches are DPO's (preference.py: every prompt+chosen, then every prompt+rejected, one
forward). Both losses compare **length-averaged** completion log-probs ℓ = (sum over completion
tokens) / (their count), as TRL's `get_batch_logps(average_log_prob=True)`
(trl/experimental/orpo/orpo_trainer.py:705-743; cpo_trainer.py:752-790, 850 for ipo/simpo).

ORPO (`ORPOTrainer.get_batch_loss_metrics`, orpo_trainer.py:824-877; loss at :848):
  loss = NLL − β·mean log σ(L),  L = (ℓc − ℓr) − (log(1 − e^ℓc) − log(1 − e^ℓr))   (`losses.orpo_loss`)
  NLL is TRL's `chosen_nll_loss` (:779-800, "orpo chosen nll loss is computed over the full prompt
  and response"): one token-mean cross-entropy over every real token of the chosen rows after the
  first — prompt tokens included — labels = input_ids where attention_mask is 1 (:796-798).
  So the chosen rows are scored here on their prompt tokens too (one forward; the LM head
  runs on the prompt positions of the chosen rows as well).

SimPO (`CPOTrainer` with loss_type="simpo", cpo_trainer.py:715-722, 890):
  loss = mean −(1 − ls)·log σ(β(ℓc − ℓr) − γ) − ls·log σ(−β(ℓc − ℓr) + γ) + α·NLL   (`losses.simpo_loss`)
  α = the section's sft_weight (TRL's cpo_alpha; SimPO proper is α = 0). CPO's NLL, unlike ORPO's,
  is over the chosen *completion* tokens only (labels = `concatenated_labels`, :840-845), one
  token-mean over the batch.

The batch NLL is a token mean over the micro-batch, as in TRL; the loss sum carries it once per
pair (B·NLL), so the engine's mean over pairs gives TRL's `NLL − β·mean(...)` per micro-batch.

Logs, with TRL's names (orpo_trainer.py:856-872, cpo_trainer.py:894-912): `rewards/chosen`,
`rewards/rejected` (β·ℓ — no reference, so the rewards are β times the averaged log-probs),
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected` (the **length-averaged**
log-probs, as TRL logs them here — unlike DPO's summed ones), `nll_loss`, and for ORPO
`log_odds_ratio` (mean log σ(L)) and `log_odds_chosen` (mean L). TRL's `logits/*` (a mean over the
full logits tensor) are left out: the scoring core does not build full-vocabulary logits. SimPO
logs `nll_loss` only when sft_weight > 0 (TRL logs a constant 0 otherwise).
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..data.preference import collate_pairs
from ..data.templates import IGNORE
from ..scoring import labelled_nll, sum_by_row
from .base import LossOutput, Objective, StepContext, TaskInfo, disable_dropout
from .losses import orpo_loss, simpo_loss
from .preference import encode_preference_row


def pair_scores(model, batch: dict[str, torch.Tensor], *, whole_chosen: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(completion log-prob sums (2B), completion token counts (2B), chosen-row token-mean NLL or None).

    One forward over the 2B rows. With `whole_chosen`, the chosen rows are also scored on their
    prompt tokens (every real token after the first), and the third value is the token-mean NLL
    over those positions of all chosen rows — ORPO's NLL as TRL computes it.
    """
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    n = ids.shape[0] // 2
    scored = completion.bool()
    if whole_chosen:
        scored = scored.clone()
        scored[:n] = attention[:n].bool()
    labels = ids.masked_fill(~scored, IGNORE)
    nll = labelled_nll(model, {"input_ids": ids, "attention_mask": attention}, labels, share_prompts=True)
    positions = labels[:, 1:] != IGNORE
    in_completion = completion[:, 1:][positions].bool()
    sums = sum_by_row(-nll.masked_fill(~in_completion, 0.0), positions)
    counts = completion[:, 1:].sum(1)
    chosen_nll = None
    if whole_chosen:
        chosen = positions[:n].sum()  # row-major: the chosen rows' tokens come first
        chosen_nll = nll[:chosen].sum() / max(int(chosen), 1)
    return sums, counts, chosen_nll


class _ReferenceFree(Objective):
    formats = ("preference",)
    generative = True
    needs_reference = False

    def setup(self, ctx: StepContext, train_rows: list[dict], val_rows: list[dict]) -> None:
        if self.cfg.disable_dropout:
            disable_dropout(ctx.policy)

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        return encode_preference_row(tokenizer, record, data)

    def collator(self, tokenizer, cfg, task: TaskInfo, *, train: bool):
        pad_id = tokenizer.pad_token_id
        return lambda rows: collate_pairs(rows, pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    @staticmethod
    def _pair_logs(beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        """TRL's reward logs from length-averaged log-probs: rewards are β·ℓ (no reference)."""
        chosen, rejected = chosen.detach(), rejected.detach()
        rc, rr = beta * chosen, beta * rejected
        return {
            "rewards/chosen": rc.sum(),
            "rewards/rejected": rr.sum(),
            "rewards/accuracies": (rc > rr).float().sum(),
            "rewards/margins": (rc - rr).sum(),
            "logps/chosen": chosen.sum(),
            "logps/rejected": rejected.sum(),
        }


class ORPO(_ReferenceFree):
    name = "orpo"

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        beta = self.cfg.beta
        sums, counts, nll = pair_scores(ctx.policy, batch, whole_chosen=True)
        avg = sums / counts.clamp(min=1)
        n = avg.shape[0] // 2
        losses, ratio, log_odds = orpo_loss(avg[:n], avg[n:], nll, beta=beta)
        logs = self._pair_logs(beta, avg[:n], avg[n:])
        logs["nll_loss"] = nll.detach() * n
        logs["log_odds_ratio"] = ratio.sum()
        logs["log_odds_chosen"] = log_odds.sum()
        return LossOutput(losses.sum(), n, logs={k: (float(v), n) for k, v in logs.items()})


class SimPO(_ReferenceFree):
    name = "simpo"

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.cfg
        sums, counts, _ = pair_scores(ctx.policy, batch)
        avg = sums / counts.clamp(min=1)
        n = avg.shape[0] // 2
        losses = simpo_loss(avg[:n], avg[n:], beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)
        logs = self._pair_logs(cfg.beta, avg[:n], avg[n:])
        if cfg.sft_weight:
            # CPO's NLL: one token mean over the chosen completions of the batch (prompt not included).
            nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
            losses = losses + cfg.sft_weight * nll
            logs["nll_loss"] = nll.detach() * n
        return LossOutput(losses.sum(), n, logs={k: (float(v), n) for k, v in logs.items()})
