"""Preference objectives on (prompt, chosen, rejected) pairs: DPO and its loss variants.

Rows hold the shared prompt's and both answers' token ids (data/preference.py); a batch is
every chosen sequence, then every rejected one, so one forward scores both. Log-probs are
sums over answer tokens from the shared numerical core (`scoring.sequence_logps`); the
reference's come from the step context (the policy with its adapter off, or a frozen copy),
or are computed once before training (`precompute_ref_logps`). Logs follow TRL's names and
definitions (rewards are beta times the policy-reference log-ratio).
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..data.preference import answer_labels, collate_pairs, encode_pair, truncation_rule
from ..scoring import sequence_logps
from .base import LossOutput, Objective, StepContext, TaskInfo, disable_dropout
from .losses import dpo_loss

PRECOMPUTE_BATCH = 8


def encode_preference_row(tokenizer, record: dict, data: DataConfig) -> tuple[dict | None, bool]:
    row = encode_pair(tokenizer, record, max_length=data.max_length, truncation=truncation_rule(data.truncation))
    if row is None:
        return None, False
    truncated = row.pop("truncated")
    return row, truncated


def pair_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels on answer tokens only) of a pair batch."""
    labels = answer_labels(batch["input_ids"], batch["completion_mask"])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, labels


class DPO(Objective):
    name = "dpo"
    formats = ("preference",)
    generative = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._precomputed = False

    @property
    def needs_reference(self) -> bool:
        return not self._precomputed

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        return encode_preference_row(tokenizer, record, data)

    def collator(self, tokenizer, cfg, task: TaskInfo, *, train: bool):
        pad_id = tokenizer.pad_token_id

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = collate_pairs(rows, pad_id)
            if all("ref_logps" in r for r in rows):
                batch["ref_logps"] = torch.tensor([r["ref_logps"][0] for r in rows] +
                                                  [r["ref_logps"][1] for r in rows], dtype=torch.float32)
            return batch

        return collate

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    @torch.no_grad()
    def _reference_logps(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].to(batch["input_ids"].device)
        inputs, labels = pair_inputs(batch)
        with ctx.reference() as reference:
            return sequence_logps(reference, inputs, labels)[0]

    def setup(self, ctx: StepContext, train_rows: list[dict], val_rows: list[dict]) -> None:
        """With precompute_ref_logps, score every pair with the reference once (then no reference is kept)."""
        if self.cfg.disable_dropout:
            disable_dropout(ctx.policy)
        if not self.cfg.precompute_ref_logps or self._precomputed:
            return
        pad_id = ctx.tokenizer.pad_token_id
        device = next(ctx.policy.parameters()).device
        rows = train_rows + val_rows
        for i in range(0, len(rows), PRECOMPUTE_BATCH):
            part = rows[i : i + PRECOMPUTE_BATCH]
            batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
            logps = self._reference_logps(ctx, batch).float().cpu().tolist()
            for j, row in enumerate(part):
                row["ref_logps"] = (logps[j], logps[len(part) + j])
        self._precomputed = True

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.cfg
        inputs, labels = pair_inputs(batch)
        logps, lengths = sequence_logps(ctx.policy, inputs, labels)
        ref = self._reference_logps(ctx, batch)
        n = logps.shape[0] // 2
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:n], logps[n:], ref[:n], ref[n:], beta=cfg.beta, loss_type=cfg.loss,
            label_smoothing=cfg.label_smoothing, chosen_len=lengths[:n], rejected_len=lengths[n:])
        logs = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": logps[:n].detach().sum(),
            "logps/rejected": logps[n:].detach().sum(),
        }
        if cfg.sft_weight:
            # RPO: the chosen answer's per-token NLL, averaged over pairs like the DPO term.
            nll = -logps[:n] / lengths[:n].clamp(min=1)
            losses = losses + cfg.sft_weight * nll
            logs["nll_loss"] = nll.detach().sum()
        return LossOutput(losses.sum(), n, logs={k: (float(v), n) for k, v in logs.items()})
