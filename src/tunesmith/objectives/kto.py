"""KTO on unpaired (prompt, completion, desirable?) examples, as TRL 1.16's KTOTrainer (loss_type "kto").

Each example's implied reward is βΔ, Δ = log π(y|x) − log π_ref(y|x) (summed over completion
tokens). KTO compares it with a reference point z, an estimate of KL(π‖π_ref) from *mismatched*
pairs: within each batch, prompt i is paired with the completion of example i − 1 (cyclically,
the first prompt with the last completion), as TRL builds its `KL_completion_ids`
(trl/trainer/kto_trainer.py:1141-1156, `[c[-1]] + c[:-1]` per batch of per_device_train_batch_size).
TRL builds that pairing once over the dataset in chunks of the batch size and therefore requires
sequential sampling (:836-843); here the collator pairs within the batch it is given, so the KL
pairs are always the batch's own completions, shuffled or not. The KL sequences are cut to
`data.max_length` (keep_start), as TRL's collator cuts them (:161-187).

z = max(0, mean(log π(y'|x) − log π_ref(y'|x))) over the batch, detached; the policy's KL
forward runs without gradient, as TRL's `_compute_kl_logps` (:1337-1368). Losses:
desirable w_d·(1 − σ(β(Δ − z))), undesirable w_u·(1 − σ(β(z − Δ))) (:1442-1475, `losses.kto_loss`);
TRL's loss is their mean over the batch (`nanmean`, :1548), here their sum with the example count, so
the engine's mean over an accumulation window weighs every example the same.

Logs, with TRL's names (:1484-1546): `kl` (z of each micro-batch), `rewards/chosen` and
`logps/chosen` (means over the desirable examples), `rewards/rejected` and `logps/rejected` (over the
undesirable ones), `rewards/margins` (the difference of those two means, per micro-batch that
holds both labels). TRL's `logits/*` and `entropy` need full-vocabulary logits, which the scoring
core does not build (as for DPO); its running `num_tokens` is the engine's token count's business.

precompute_ref_logps: TRL scores every example and its KL pair with the reference once, the pairs
taken in dataset order in chunks of the batch size (`_precompute_ref_logps`, :1220-1294). The
objective learns the batch size from the first training window (its setup does not see the run
config), so it scores there, before the first loss, then drops the reference; the pairing is then
fixed per example (dataset order, chunks of the batch size), which is the in-batch pairing when
data.shuffle is off. With shuffle on, an example's KL pair may then sit in another batch: z is
still a mean over mismatched pairs of the same data, only not of the batch's own completions.

Multi-process: TRL averages the per-process KL estimates (gather_for_metrics); here each process
uses its own micro-batch's estimate.
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..data.preference import answer_labels, collate_unpaired, encode_unpaired, truncation_rule
from ..errors import ConfigError
from ..scoring import sequence_logps
from .base import LossOutput, Objective, StepContext, TaskInfo, disable_dropout
from .losses import kto_kl_estimate, kto_loss



def kl_completions(rows: list[dict]) -> list[list[int]]:
    """The mismatched completion of each row: row i gets row i − 1's (row 0 the last row's), TRL's rotation."""
    completions = [r["completion_ids"] for r in rows]
    return completions[-1:] + completions[:-1]


class KTO(Objective):
    name = "kto"
    formats = ("unpaired_preference",)
    generative = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._precomputed = False
        self._batch_size: int | None = None  # rows per micro-batch, from the first training window
        self._max_length: int | None = None  # data.max_length, for the KL sequences
        self._rows: tuple[list[dict], list[dict]] = ([], [])

    @property
    def needs_reference(self) -> bool:
        return not self._precomputed

    # ------------------------------------------------------------------ data

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        rule = truncation_rule(data.truncation)
        self._max_length = data.max_length
        row = encode_unpaired(tokenizer, record, max_length=data.max_length, truncation=rule)
        if row is None:
            return None, False
        truncated = row.pop("truncated")
        return row, truncated

    def collator(self, tokenizer, cfg, task: TaskInfo, *, train: bool):
        pad_id = tokenizer.pad_token_id

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = collate_unpaired(rows, pad_id)
            fixed = all("kl_completion_ids" in r for r in rows)
            partners = [r["kl_completion_ids"] for r in rows] if fixed else kl_completions(rows)
            kl_rows = []
            for r, completion in zip(rows, partners):
                room = len(completion) if self._max_length is None else self._max_length - len(r["prompt_ids"])
                kl_rows.append({"prompt_ids": r["prompt_ids"], "completion_ids": completion[:room], "label": False})
            kl = collate_unpaired(kl_rows, pad_id)
            batch.update({f"kl_{k}": kl[k] for k in ("input_ids", "attention_mask", "completion_mask")})
            if all("ref_logps" in r for r in rows):
                batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
                batch["ref_kl_logps"] = torch.tensor([r["ref_kl_logps"] for r in rows], dtype=torch.float32)
            return batch

        return collate

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])  # examples

    # ------------------------------------------------------------------ reference

    @staticmethod
    def _logps(model, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        ids = batch[f"{prefix}input_ids"]
        inputs = {"input_ids": ids, "attention_mask": batch[f"{prefix}attention_mask"]}
        return sequence_logps(model, inputs, answer_labels(ids, batch[f"{prefix}completion_mask"]))[0]

    @torch.no_grad()
    def _reference_logps(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference log-probs of the completions, of the KL pairs)."""
        if "ref_logps" in batch:
            device = batch["input_ids"].device
            return batch["ref_logps"].to(device), batch["ref_kl_logps"].to(device)
        with ctx.reference() as reference:
            return self._logps(reference, batch), self._logps(reference, batch, "kl_")

    def setup(self, ctx: StepContext, train_rows: list[dict], val_rows: list[dict]) -> None:
        if self.cfg.disable_dropout:
            disable_dropout(ctx.policy)
        # The scoring itself waits for the first window, which tells the batch size (see the module doc).
        self._rows = (train_rows, val_rows)

    def window(self, ctx: StepContext, rows: list[list[dict]], collate) -> list[dict]:
        # The first window of a run tells the batch size; TRL refuses per-device batches of 1 (:844-847). A
        # later micro-batch of one (an epoch's remainder) is kept, as TRL keeps it: its z is its own log-ratio.
        if self._batch_size is None:
            if len(rows[0]) < 2:
                raise ConfigError(
                    f"objective 'kto' needs training.batch_size > 1 (got micro-batches of {len(rows[0])} example): "
                    "its reference point z is estimated from each prompt paired with another example's completion "
                    "in the same micro-batch, and a batch of one would pair an example with its own completion, "
                    "making z its own reward (TRL refuses this too). Raise training.batch_size (and lower "
                    "training.grad_accum to keep the effective batch).")
            self._batch_size = len(rows[0])
        if self.cfg.precompute_ref_logps and not self._precomputed:
            self._precompute(ctx)
            ctx.reference = None  # no reference is needed from here on
        return [collate(r) for r in rows]

    def _precompute(self, ctx: StepContext) -> None:
        """Fix every example's KL pair (dataset order, chunks of the batch size) and score both with the reference."""
        collate = self.collator(ctx.tokenizer, None, TaskInfo(), train=False)
        device = next(ctx.policy.parameters()).device
        for rows in self._rows:
            for i in range(0, len(rows), self._batch_size):
                part = rows[i : i + self._batch_size]
                for row, completion in zip(part, kl_completions(part)):
                    row["kl_completion_ids"] = completion
                batch = {k: v.to(device) for k, v in collate(part).items()}
                ref, ref_kl = self._reference_logps(ctx, batch)
                for row, a, b in zip(part, ref.float().cpu().tolist(), ref_kl.float().cpu().tolist()):
                    row["ref_logps"], row["ref_kl_logps"] = a, b
        self._precomputed = True

    def state_dict(self) -> dict:
        return {"batch_size": self._batch_size}

    def load_state_dict(self, state: dict) -> None:
        self._batch_size = state.get("batch_size", self._batch_size)

    # ------------------------------------------------------------------ loss

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.cfg
        with torch.no_grad():  # z is a detached baseline: TRL scores the KL pairs without gradient
            kl_logps = self._logps(ctx.policy, batch, "kl_")
        logps = self._logps(ctx.policy, batch)
        ref, ref_kl = self._reference_logps(ctx, batch)
        z = kto_kl_estimate(kl_logps, ref_kl)
        desirable = batch["label"].to(device=logps.device, dtype=torch.bool)
        losses, rewards = kto_loss(logps, ref, desirable, z, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                                   undesirable_weight=cfg.undesirable_weight)
        n = int(desirable.numel())
        logs: dict[str, tuple[float, float]] = {"kl": (float(z), 1)}
        policy = logps.detach()
        means = {}
        for name, subset in (("chosen", desirable), ("rejected", ~desirable)):
            k = int(subset.sum())
            if k:
                logs[f"rewards/{name}"] = (float(rewards[subset].sum()), k)
                logs[f"logps/{name}"] = (float(policy[subset].sum()), k)
                means[name] = float(rewards[subset].sum()) / k
        if len(means) == 2:  # TRL logs the margin of a batch only when it holds both labels
            logs["rewards/margins"] = (means["chosen"] - means["rejected"], 1)
        return LossOutput(losses.sum(), n, logs=logs)
