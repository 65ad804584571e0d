"""GRPO and RLOO parity with TRL 1.16's GRPOTrainer and RLOOTrainer, step by step, with the completions injected.

Sampling is taken out of the comparison: both tools get the same completions for each (prompt,
copy) — TRL through GRPOTrainer's `rollout_func` hook (RLOOTrainer has none: the test replaces
that trainer instance's sampling method), tunesmith through its generation helper — so what
is compared is everything after the rollout: rewards and their NaN handling, group advantages,
the per-token loss scored under the sampling temperature, each loss type's normaliser across an
accumulation window, the reference KL, and the optimizer step (gradient norm, then the next
step's numbers). The recipe of parity_recipe.py: a tiny saved Llama, prompts in order, lr 1e-3
linear to 0, AdamW without weight decay, clipping at 1.0, fp32, full fine-tuning.
"""

from __future__ import annotations

import math
import random

import pytest

trl = pytest.importorskip("trl", reason="TRL (the `bench` extra) is the reference implementation")

from conftest import QA, write_jsonl  # noqa: E402
from parity_recipe import save_tiny_llama  # noqa: E402

G = 4  # completions per prompt
PROMPTS_PER_MICRO = 2
STEPS = 3
MAX_COMPLETION = 8
TEMPERATURE = 0.8


def even(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]


def long_answers(prompts, completions, completion_ids, answer, **kwargs):
    """Scores only completions of prompts whose answer is longer than 5 characters (None elsewhere)."""
    return [len(c) / 8 if len(a) > 5 else None for c, a in zip(completion_ids, answer)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("grpo-parity")
    save_tiny_llama(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    pairs = (QA * 4)[: PROMPTS_PER_MICRO * 2 * STEPS]
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in pairs]
    prompt_ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    prompt_ids = [tok(text, add_special_tokens=False)["input_ids"] for text in prompt_ids]
    rng = random.Random(0)
    vocab = list(range(4, len(tok)))
    completions = {}
    for i in range(len(rows)):
        for j in range(G):
            body = rng.choices(vocab, k=rng.randint(1, MAX_COMPLETION - 1))
            # Three in four end with the end token; the others run to the limit (truncated).
            completions[i, j] = body + [tok.eos_token_id] if rng.random() < 0.75 else \
                rng.choices(vocab, k=MAX_COMPLETION)
    return folder, write_jsonl(folder / "prompts.jsonl", rows), rows, prompt_ids, completions, tok


def run_trl(saved, out, objective: dict, accum: int) -> list[dict]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    folder, _, rows, prompt_ids, completions, tok = saved
    by_text = {r["prompt"][0]["content"]: i for i, r in enumerate(rows)}

    def rollout(prompts, trainer):
        ids, outs = [], []
        for k, prompt in enumerate(prompts):  # each prompt G times in a row, in dataset order
            i = by_text[prompt[0]["content"]]
            ids.append(prompt_ids[i])
            outs.append(completions[i, k % G])
        return {"prompt_ids": ids, "completion_ids": outs, "logprobs": None}

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_MICRO * G,
                      gradient_accumulation_steps=accum, num_generations=G, max_completion_length=MAX_COMPLETION,
                      temperature=TEMPERATURE, shuffle_dataset=False, max_steps=STEPS, learning_rate=1e-3,
                      lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True,
                      bf16=False, seed=0, report_to=[], logging_steps=1, save_strategy="no",
                      beta=objective.get("beta", 0.0), loss_type=objective["loss_type"],
                      scale_rewards=objective.get("scale_rewards", "group"),
                      mask_truncated_completions=objective.get("mask_truncated_completions", False),
                      use_bias_correction_kl=objective.get("kl_bias_correction", True),
                      num_iterations=objective.get("num_iterations", 1), epsilon=objective.get("epsilon", 0.2))
    trainer = GRPOTrainer(model=str(folder), reward_funcs=[even, long_answers], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, rollout_func=rollout)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]


def run_ours(saved, out, objective: dict, accum: int, monkeypatch) -> list[dict]:
    import json
    import sys
    import types

    import tunesmith
    from tunesmith.engine import loop
    from tunesmith.generation import Generated

    folder, data, rows, prompt_ids, completions, tok = saved
    by_ids = {tuple(p): i for i, p in enumerate(prompt_ids)}

    def injected(model, tokenizer, prompts, **kwargs):
        outs = [completions[by_ids[tuple(p)], k % G] for k, p in enumerate(prompts)]
        return Generated([list(p) for p in prompts], outs, [o[-1] != tok.eos_token_id for o in outs])

    monkeypatch.setattr(loop, "generate_ids", injected)
    module = types.ModuleType("grpo_parity_rewards")
    module.even, module.long_answers = even, long_answers
    monkeypatch.setitem(sys.modules, "grpo_parity_rewards", module)
    cfg = {"model": {"name_or_path": str(folder)},
           "data": {"train": str(data), "max_length": 64, "shuffle": False},
           "method": {"type": "full"},
           "objective": {"type": "grpo", "num_generations": G, "max_completion_length": MAX_COMPLETION,
                         "temperature": TEMPERATURE, **objective,  # objective may name another type (rloo)
                         "rewards": [{"function": "grpo_parity_rewards:even"},
                                     {"function": "grpo_parity_rewards:long_answers"}]},
           "training": {"max_steps": STEPS, "batch_size": PROMPTS_PER_MICRO, "grad_accum": accum,
                        "learning_rate": 1e-3, "scheduler": "linear", "weight_decay": 0.0, "max_grad_norm": 1.0,
                        "precision": "fp32", "progress": False, "log_every": 1, "seed": 0},
           "eval": {"forgetting": False, "at_end": False},
           "output": {"dir": str(out), "save_model": False, "model_card": False}}
    result = tunesmith.train(cfg, echo=lambda m: None)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


def assert_steps_match(theirs: list[dict], ours: list[dict], keys: list[str]) -> None:
    assert len(theirs) == len(ours) == STEPS
    for step, (t, o) in enumerate(zip(theirs, ours), 1):
        for key in keys:
            if t.get(key) is None or math.isnan(t[key]):
                # A function that scored nothing this step (TRL: NaN), or a step reusing a rollout (TRL logs no
                # rollout numbers there): tunesmith logs nothing either.
                assert key not in o, f"step {step} {key}"
                continue
            assert o[key] == pytest.approx(t[key], rel=1e-5, abs=1e-5), f"step {step} {key}: ours {o[key]}, TRL {t[key]}"


# TRL shuffles a rollout's completions across its micro-batches (tunesmith keeps prompt groups together):
# the numbers that depend on the partition (bnpo's per-micro-batch normaliser; TRL's entropy, KL and clip
# ratio logs, means of per-micro-batch means) are compared with one micro-batch per step, the rest with two.
CASES = {
    "dapo": ({"loss_type": "dapo"}, 2),
    "grpo": ({"loss_type": "grpo"}, 2),
    "dr_grpo-scale-none": ({"loss_type": "dr_grpo", "scale_rewards": "none"}, 2),
    "bnpo": ({"loss_type": "bnpo"}, 1),
    "dapo-batch-beta-masked": ({"loss_type": "dapo", "scale_rewards": "batch", "beta": 0.1,
                                "mask_truncated_completions": True}, 1),
    "grpo-beta-no-bias-correction": ({"loss_type": "grpo", "beta": 0.05, "kl_bias_correction": False}, 1),
    # Two optimizer steps per rollout: the second step's ratio departs from 1 and the clipping acts.
    "dapo-two-iterations": ({"loss_type": "dapo", "num_iterations": 2, "epsilon": 0.05}, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_matches_trl_step_by_step(saved, tmp_path, monkeypatch, case):
    objective, accum = CASES[case]
    theirs = run_trl(saved, tmp_path / "trl", objective, accum)
    ours = run_ours(saved, tmp_path / "ours", objective, accum, monkeypatch)
    keys = ["loss", "grad_norm", "reward", "reward_std", "frac_reward_zero_std", "rewards/even/mean",
            "rewards/long_answers/mean", "completions/mean_length", "completions/clipped_ratio"]
    if accum == 1:
        keys += ["entropy", "clip_ratio/region_mean"] + (["kl"] if objective.get("beta") else [])
    assert_steps_match(theirs, ours, keys)


# --------------------------------------------------------------------------- RLOO

def run_trl_rloo(saved, out, objective: dict, accum: int) -> list[dict]:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    folder, _, rows, prompt_ids, completions, tok = saved
    by_ids = {tuple(p): i for i, p in enumerate(prompt_ids)}
    args = RLOOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_MICRO * G,
                      gradient_accumulation_steps=accum, num_generations=G, max_completion_length=MAX_COMPLETION,
                      temperature=TEMPERATURE, shuffle_dataset=False, max_steps=STEPS, learning_rate=1e-3,
                      lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True,
                      bf16=False, seed=0, report_to=[], logging_steps=1, save_strategy="no",
                      beta=objective.get("beta", 0.05), num_iterations=objective.get("num_iterations", 1),
                      epsilon=objective.get("epsilon", 0.2),
                      normalize_advantages=objective.get("normalize_advantages", False),
                      mask_truncated_completions=objective.get("mask_truncated_completions", False))
    trainer = RLOOTrainer(model=str(folder), reward_funcs=[even, long_answers], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)

    def injected(prompt_batch, images, multimodal_fields):
        # RLOOTrainer has no rollout hook: the test replaces this instance's sampling with the fixed completions.
        return [completions[by_ids[tuple(p)], k % G] for k, p in enumerate(prompt_batch)]

    trainer._generate_single_turn = injected
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]


RLOO_CASES = {
    "beta": ({"beta": 0.05}, 2),
    "no-reference-normalised": ({"beta": 0.0, "normalize_advantages": True}, 2),
    "two-iterations-masked": ({"beta": 0.05, "num_iterations": 2, "epsilon": 0.05,
                               "mask_truncated_completions": True}, 1),
}


@pytest.mark.parametrize("case", list(RLOO_CASES))
def test_rloo_matches_trl_step_by_step(saved, tmp_path, monkeypatch, case):
    objective, accum = RLOO_CASES[case]
    theirs = run_trl_rloo(saved, tmp_path / "trl", objective, accum)
    ours = run_ours(saved, tmp_path / "ours", {"type": "rloo", **objective}, accum, monkeypatch)
    keys = ["loss", "grad_norm", "reward", "reward_std", "frac_reward_zero_std", "rewards/even/mean",
            "completions/mean_length", "completions/clipped_ratio"] + (["kl"] if objective.get("beta") else [])
    if accum == 1:
        keys += ["entropy", "clip_ratio/region_mean"]
    assert_steps_match(theirs, ours, keys)
