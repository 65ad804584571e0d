"""GRPO: sample a group of completions per prompt, score them with reward functions, and push the
policy towards the completions that beat their group (TRL 1.16's GRPOTrainer definitions).

One optimizer step (`window`): the step's prompts (batch_size per micro-batch × grad_accum)
are each completed `num_generations` times by the generation helper (sampling at
`temperature`, `top_p`, `top_k`, up to `max_completion_length` new tokens; the model in eval
mode, restored after). Every reward function scores every completion before any loss
(reward_functions.py); their weighted sum r gives advantages normalised within each prompt's
group (`scale_rewards`, policy_gradient.group_advantages). Each micro-batch's completions then
get the clipped surrogate per token, scored under the same temperature, with β·k3 KL to the
reference when `beta` > 0, and reduced by `loss_type`'s normaliser (policy_gradient.py's table).
With `dynamic_sampling` (DAPO's filter) the groups whose completions all got one reward are left
out of the window before any log-prob is scored: they carry no advantage, so the update is the
same direction for less work (advantages and logs are those of the whole rollout), and the
normaliser (dapo: the window's tokens) counts only the groups kept. DAPO also samples further prompts until the batch is full; here a step trains on the
groups it has (raise the prompts per step to keep more).
With `num_iterations` μ = 1 the old policy is the policy: the ratio is 1 in value and the clipping
never acts (clip ratios 0). With μ > 1 a rollout serves μ optimizer steps (the engine keeps its
rows for them, so an epoch takes μ times the steps, as TRL's repeat sampler does); the old
policy's log-probs are scored once, right after the rollout, and the buffer of batches is part of
the objective's checkpoint state, so a run resumed inside it reuses the same completions.

Logs (TRL's names): reward, reward_std, rewards/<fn>/mean, frac_reward_zero_std,
completions/mean_length, completions/clipped_ratio (no end token), clip_ratio/low_mean,
clip_ratio/high_mean, clip_ratio/region_mean, entropy, kl (β > 0). The token means (entropy, kl,
clip ratios) are over every counted token of the log window; TRL averages per-micro-batch means
instead, which agrees with one micro-batch per step.

Micro-batches hold whole prompt groups in data order. TRL shuffles a rollout's completions before
splitting them into micro-batches, so `bnpo` (normalised by each micro-batch's tokens) matches
TRL exactly with one micro-batch per step and differs by the partition otherwise; `grpo`,
`dr_grpo` and `dapo` do not depend on the partition.

Evaluation (`evaluate`): one greedy completion per held-out prompt; eval_reward (the weighted sum),
eval_rewards/<fn>/mean, eval_completions/mean_length, and eval_exact_match when a `correctness`
reward is configured (the share of completions it finds correct).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import DataConfig, ObjectiveConfig
from ..data.preference import answer_labels, chat_ids, pad_completions
from ..data.templates import IGNORE
from ..objective_config import GRPOSection, objective_config
from ..reward_functions import COLUMN_CHECK_ROWS, RewardSpec, call_rewards, check_reward_columns, load_reward
from ..scoring import labelled_nll_and_entropy
from .base import LossOutput, Objective, StepContext, TaskInfo
from .policy_gradient import clipped_policy_loss, group_advantages, groups_with_spread, grpo_loss_sum, nanstd


def _load_rewards(specs: list[RewardSpec]) -> list[tuple[RewardSpec, Callable]]:
    # A console script's sys.path starts at its own folder, not the user's: user reward modules
    # (my_rewards:score) are looked up in the current directory too.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    return [(spec, load_reward(spec)) for spec in specs]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class GRPO(Objective):
    name = "grpo"
    formats = ("prompt",)
    generative = True
    online = True

    def __init__(self, cfg: GRPOSection | None = None):
        super().__init__(cfg if cfg is not None else objective_config(type=self.name))
        self.needs_reference = self._wants_reference()
        self.functions = _load_rewards(self.cfg.rewards)
        self._pending: dict[str, tuple[float, float]] = {}
        self._buffer: list[dict] = []  # the current rollout's batches, reused for num_iterations steps
        self._uses = 0

    @property
    def steps_per_window(self) -> int:
        return self.cfg.num_iterations

    def _wants_reference(self) -> bool:
        return self.cfg.beta > 0

    def state_dict(self) -> dict:
        if self.cfg.num_iterations == 1:
            return {}
        return {"buffer": self._buffer, "uses": self._uses}

    def load_state_dict(self, state: dict) -> None:
        self._buffer, self._uses = state.get("buffer", []), state.get("uses", 0)

    def check_rows(self, rows: list[dict]) -> None:
        check_reward_columns(self.functions, [r["columns"] for r in rows[:COLUMN_CHECK_ROWS]])

    # ---------------------------------------------------------------- prompts

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        ids = chat_ids(tokenizer, record["prompt"], generation_prompt=True)
        if len(ids) + self.cfg.max_completion_length > data.max_length:
            return None, False  # no room for a whole completion: dropped, and counted
        return {"prompt_ids": ids, "raw_prompt": record["raw_prompt"], "columns": record["columns"]}, False

    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool) -> Callable:
        pad = _pad_id(tokenizer)

        def prompts(rows: list[dict]) -> dict[str, torch.Tensor]:
            width = max(len(r["prompt_ids"]) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in rows])
            mask = torch.tensor([[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in rows])
            return {"input_ids": ids, "attention_mask": mask}

        return prompts

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        if self.cfg.loss_type == "dapo":
            return int(batch["completion_mask"].sum())
        return int(batch["completion_mask"].shape[0])

    # ---------------------------------------------------------------- rollouts

    def _complete(self, ctx: StepContext, prompts: list[dict], *, sample: bool, copies: int,
                  batch_size: int | None = None):
        cfg = self.cfg
        ids = [r["prompt_ids"] for r in prompts for _ in range(copies)]
        if ctx.generate is None:
            raise RuntimeError(f"objective '{self.name}' generates completions: the step context must carry a "
                               "generation helper (engine.fit sets one when it is given the tokenizer)")
        out = ctx.generate(ids, max_new_tokens=cfg.max_completion_length, do_sample=sample,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                           merged_adapters=cfg.merged_rollouts,
                           batch_size=batch_size or cfg.generation_batch_size or len(ids))
        texts = ctx.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        rows = [r for r in prompts for _ in range(copies)]
        raw = [r["raw_prompt"] for r in rows]
        # Chat prompts get chat completions, string prompts strings: what TRL hands reward functions.
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for t, p in zip(texts, raw)]
        keys = sorted({k for r in rows for k in r["columns"]})
        columns = {k: [r["columns"].get(k) for r in rows] for k in keys}
        scores = call_rewards(self.functions, raw, completions, out.completion_ids, columns)
        if not scores:  # no reward functions (PPO scores with its reward model alone)
            return out, torch.zeros(len(rows), 0, dtype=torch.float64), torch.zeros(len(rows), dtype=torch.float64)
        per_fn = torch.tensor([[math.nan if v is None else v for v in fn] for fn in scores],
                              dtype=torch.float64).T  # (completions, functions)
        weights = torch.tensor([spec.weight for spec, _ in self.functions], dtype=torch.float64)
        rewards = (per_fn * weights).nansum(dim=1)
        rewards[torch.isnan(per_fn).all(dim=1)] = math.nan
        return out, per_fn, rewards

    def window(self, ctx: StepContext, rows: list[list[dict]], collate: Callable) -> list[dict]:
        if self._buffer and self._uses < self.cfg.num_iterations:
            self._uses += 1
            return self._buffer
        self._buffer, self._uses = self._rollout(ctx, rows), 1
        return self._buffer

    def _rollout(self, ctx: StepContext, rows: list[list[dict]]) -> list[dict]:
        cfg = self.cfg
        g = cfg.num_generations
        prompts = [r for micro in rows for r in micro]
        out, per_fn, rewards = self._complete(ctx, prompts, sample=True, copies=g)
        kept = self._kept_groups(rewards)
        pad = _pad_id(ctx.tokenizer)
        batches, order, first = [], [], 0
        for micro in rows:
            picks = [i for j in range(first, first + len(micro)) if kept[j] for i in range(j * g, (j + 1) * g)]
            first += len(micro)
            if not picks:
                continue
            prompt_ids = [out.prompt_ids[i] for i in picks]
            completion_ids = [out.completion_ids[i] for i in picks]
            sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
            masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)]
            if cfg.mask_truncated_completions:
                masks = [[0] * len(m) if out.truncated[i] else m for m, i in zip(masks, picks)]
            batch = pad_completions(sequences, masks, pad)
            if self.needs_reference:
                batch["ref_logps"] = self._frozen_logps(ctx, batch, reference=True)
            if self._needs_old_logps():  # the policy that sampled, before this rollout's first update
                batch["old_logps"] = self._frozen_logps(ctx, batch, reference=False)
            batches.append(batch)
            order += picks
        lengths = [len(c) for c in out.completion_ids]
        logs = {"reward": (float(torch.nansum(rewards)), int((~torch.isnan(rewards)).sum())),
                "reward_std": (float(nanstd(rewards)) if rewards.numel() > 1 else 0.0, 1),
                "completions/mean_length": (float(sum(lengths)), len(lengths)),
                "completions/clipped_ratio": (float(sum(out.truncated)), len(lengths))}
        for j, (spec, _) in enumerate(self.functions):
            scored = ~torch.isnan(per_fn[:, j])
            logs[f"rewards/{spec.log_name}/mean"] = (float(per_fn[scored, j].sum()), int(scored.sum()))
        # Over the whole rollout, then the kept completions: dropped groups' advantages are 0, so the kept
        # ones and the logs are what they would be without the filter. (GRPO's advantages read only the
        # rewards; RLOO's read the batches' log-probs too, and RLOO refuses dynamic sampling.)
        advantages = self._advantages(rewards, batches, logs)[order]
        at = 0
        for batch in batches:
            n = batch["input_ids"].shape[0]
            batch["advantages"] = advantages[at:at + n]
            at += n
        self._pending = logs
        return batches

    def _kept_groups(self, rewards: torch.Tensor) -> torch.Tensor:
        """(groups,) bool: the groups the update trains on. With dynamic sampling those with reward spread;
        when none has any, the first group stays (its rewards give it no advantage): the step still reports
        its rollout's logs, and every process still runs a backward pass (DDP all-reduces in it)."""
        if not self.cfg.dynamic_sampling:
            return torch.ones(len(rewards) // self.cfg.num_generations, dtype=torch.bool)
        spread = groups_with_spread(rewards, self.cfg.num_generations)
        if spread.any():
            return spread
        return torch.arange(len(spread)) == 0

    def _needs_old_logps(self) -> bool:
        return self.cfg.num_iterations > 1

    def _advantages(self, rewards: torch.Tensor, batches: list[dict], logs: dict) -> torch.Tensor:
        """One advantage per completion (in rollout order) from the weighted rewards; adds its own logs."""
        adv = group_advantages(rewards, self.cfg.num_generations, self.cfg.scale_rewards)
        logs["frac_reward_zero_std"] = (float(adv.std_is_zero.sum()), len(rewards))
        return adv.advantages

    def _token_logps(self, model, batch: dict[str, torch.Tensor], entropy: bool = False):
        """(per-token log-probs (B, L-1) under the sampling temperature, entropies of the counted tokens, mask)."""
        labels = answer_labels(batch["input_ids"], batch["completion_mask"])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        nll, ent = labelled_nll_and_entropy(model, inputs, labels, temperature=self.cfg.temperature,
                                            entropy=entropy)
        mask = labels[:, 1:] != IGNORE
        logps = torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).masked_scatter(mask, -nll)
        return logps, ent, mask

    @torch.no_grad()
    def _frozen_logps(self, ctx: StepContext, batch: dict[str, torch.Tensor], *, reference: bool) -> torch.Tensor:
        """Per-token log-probs without gradient, of the reference or of the policy as it is now."""
        device = next(ctx.policy.parameters()).device
        on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if not reference:
            return self._token_logps(ctx.policy, on_device)[0].cpu()
        with ctx.reference() as model:
            return self._token_logps(model, on_device)[0].cpu()

    # ---------------------------------------------------------------- loss

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.cfg
        logps, entropy, mask = self._token_logps(ctx.policy, batch, entropy=True)
        old = batch.get("old_logps")
        out = clipped_policy_loss(logps, logps.detach() if old is None else old, batch["advantages"],
                                  epsilon_low=cfg.epsilon,
                                  epsilon_high=cfg.epsilon_high, ref_logps=batch.get("ref_logps"), beta=cfg.beta,
                                  delta=cfg.delta, kl_bias_correction=cfg.kl_bias_correction)
        total, n = grpo_loss_sum(out.per_token, mask, cfg.loss_type, cfg.max_completion_length)
        tokens = int(mask.sum())
        logs: dict[str, tuple[float, float]] = {"entropy": (float(entropy.sum()), len(entropy))}
        for name, flags in (("low_mean", out.low_clipped), ("high_mean", out.high_clipped),
                            ("region_mean", out.low_clipped | out.high_clipped)):
            logs[f"clip_ratio/{name}"] = (float((flags & mask).sum()), tokens)
        if out.kl is not None:
            logs["kl"] = (float((out.kl.detach() * mask).sum()), tokens)
        if ctx.policy.training and self._pending:
            logs.update(self._pending)  # the rollout's numbers, once per step
            self._pending = {}
        return LossOutput(total, n, logs=logs)

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, ctx: StepContext, rows: list[dict], batch_size: int) -> dict[str, float] | None:
        if not rows:
            return {}
        out, per_fn, rewards = self._complete(ctx, rows, sample=False, copies=1, batch_size=batch_size)
        scored = ~torch.isnan(rewards)
        metrics: dict[str, Any] = {
            "eval_reward": float(rewards[scored].mean()) if scored.any() else math.nan,
            "eval_completions/mean_length": sum(len(c) for c in out.completion_ids) / len(rows),
            "eval_completions/clipped_ratio": sum(out.truncated) / len(rows),
        }
        for j, (spec, _) in enumerate(self.functions):
            column = per_fn[:, j]
            ok = ~torch.isnan(column)
            metrics[f"eval_rewards/{spec.log_name}/mean"] = float(column[ok].mean()) if ok.any() else math.nan
            if spec.function == "correctness" and "eval_exact_match" not in metrics:
                full = float(spec.args.get("reward", 1.0))
                metrics["eval_exact_match"] = float((column[ok] == full).float().mean()) if ok.any() else math.nan
        return metrics
