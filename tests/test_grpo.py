"""GRPO in the one loop: a tiny policy learns a dense reward, TRL's log names, the reference KL, evaluation by
generation, resume, and refusals before any loss."""

from __future__ import annotations

import shutil
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import metric_records, write_jsonl
from tunesmith.errors import ConfigError

import tunesmith

EVEN = "rl_rewards:even"  # tests/rl_rewards.py: the share of even token ids, dense enough for a tiny policy
REWARDS = '''
def explode(prompts, completions, completion_ids, answer, **kwargs):
    return [1 / 0 if a == "8" else 0.0 for a in answer]
'''


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "grpo_test_rewards"
    sys.modules.pop("grpo_test_rewards", None)


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"what is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def grpo(run_config, prompts, tmp_path, objective: dict, **sections) -> dict:
    sections.setdefault("method", {"type": "full"})
    data = {"train": str(prompts), "max_length": 48, "split": {"validation_ratio": 0.25}, **sections.pop("data", {})}
    cfg = run_config(data=data,
                     objective={"type": "grpo", "num_generations": 4, "max_completion_length": 8, **objective},
                     **sections)
    cfg["training"].update({"max_steps": 12, "batch_size": 4, "learning_rate": 3e-2, "scheduler": "constant"})
    cfg["training"].update(sections.get("training", {}))
    cfg["output"] = {"dir": str(tmp_path / "run"), "overwrite": True}
    return cfg


def steps(run_dir) -> list[dict]:
    return [r for r in metric_records(run_dir) if "lr" in r]


def test_a_tiny_policy_learns_a_dense_reward(run_config, prompts, tmp_path):
    cfg = grpo(run_config, prompts, tmp_path,
               {"rewards": [{"function": EVEN}, {"function": "correctness", "weight": 0.0}]})
    result = tunesmith.train(cfg, echo=lambda m: None)
    log = steps(result.run_dir)
    first = sum(r["reward"] for r in log[:3]) / 3
    last = sum(r["reward"] for r in log[-3:]) / 3
    assert first < 0.75 and last > first + 0.2, [r["reward"] for r in log]
    assert log[-1]["entropy"] < log[0]["entropy"]
    assert {"reward", "reward_std", "rewards/even/mean", "rewards/correctness/mean", "frac_reward_zero_std",
            "completions/mean_length", "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "clip_ratio/region_mean", "entropy"} <= set(log[0])
    # One optimizer step per rollout: the ratio is 1, nothing is clipped.
    assert all(r["clip_ratio/region_mean"] == 0 for r in log)
    assert "kl" not in log[0]  # beta 0: no reference kept
    assert {"eval_reward", "eval_rewards/even/mean", "eval_exact_match", "eval_completions/mean_length"} \
        <= set(result.metrics)


def test_beta_adds_the_kl_to_the_reference_which_starts_at_zero(run_config, prompts, tmp_path):
    cfg = grpo(run_config, prompts, tmp_path, {"beta": 0.1, "rewards": [{"function": EVEN}]},
               method={"type": "lora"}, training={"max_steps": 4, "learning_rate": 5e-2})
    log = steps(tunesmith.train(cfg, echo=lambda m: None).run_dir)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the LoRA-off policy is the reference at step 1
    assert log[-1]["kl"] > 1e-4


@pytest.mark.parametrize("iterations", [1, 2])
def test_resumed_grpo_run_samples_and_trains_as_the_uninterrupted_one(run_config, prompts, tmp_path, iterations):
    # With two steps per rollout the step-3 checkpoint falls inside a rollout: step 4 reuses its saved batches.
    cfg = grpo(run_config, prompts, tmp_path, {"rewards": [{"function": EVEN}], "num_iterations": iterations},
               training={"max_steps": 6, "save_every": 3, "keep_last": 10, "log_every": 2})
    a = tunesmith.train(cfg, echo=lambda m: None)
    b_dir = tmp_path / "b"
    shutil.copytree(a.run_dir, b_dir)
    shutil.rmtree(b_dir / "model")
    for ckpt in (b_dir / "checkpoints").iterdir():
        if ckpt.name != "step-0000003":
            shutil.rmtree(ckpt)
    b = tunesmith.train({**cfg, "output": {"dir": str(b_dir)}}, resume=True, echo=lambda m: None)
    wa, wb = load_file(a.run_dir / "model" / "model.safetensors"), load_file(b.run_dir / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)
    la, lb = steps(a.run_dir), steps(b.run_dir)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [2, 4, 6]
    if iterations > 1:
        assert any(r["clip_ratio/region_mean"] > 0 for r in la)  # the reused rollout's ratio left 1
    for ra, rb in zip(la, lb):
        for key in ("loss", "reward", "completions/mean_length", "entropy", "clip_ratio/region_mean"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)


def test_a_failing_reward_function_is_named_with_its_prompt(run_config, prompts, rewards_module, tmp_path):
    cfg = grpo(run_config, prompts, tmp_path, {"rewards": [{"function": f"{rewards_module}:explode"}]},
               data={"shuffle": False, "split": {"validation_ratio": 0.0}}, training={"max_steps": 2})
    with pytest.raises(ConfigError, match=r"reward function 'grpo_test_rewards:explode' failed on completion \d+ "
                                          r"\(prompt 'what is 4 plus 4\?'\): ZeroDivisionError"):
        tunesmith.train(cfg, echo=lambda m: None)


def test_grpo_settings_refused_at_validation(run_config, prompts, tmp_path):
    from tunesmith.config import load_config

    def refused(objective: dict, match: str, **sections) -> None:
        with pytest.raises(ConfigError, match=match):
            load_config(grpo(run_config, prompts, tmp_path, objective, **sections))

    refused({}, "objective.rewards: grpo needs at least one reward function")
    refused({"rewards": [{"function": "correctnes"}]}, "neither a built-in reward function")
    refused({"rewards": [{"function": "correctness", "args": {"extract": "boxd"}}]}, "reward function 'correctness'")
    refused({"rewards": [{"function": "correctness"}], "max_completion_length": 64},
            r"data.max_length \(48\) must exceed objective.max_completion_length \(64\)")
    refused({"rewards": [{"function": "correctness"}]}, "eval.metric: grpo evaluates by reward",
            eval={"every": 5})
    refused({"rewards": [{"function": "correctness"}], "num_generations": 1}, "num_generations")
    refused({"type": "rloo", "rewards": [{"function": "correctness"}], "dynamic_sampling": True},
            "objective.dynamic_sampling: rloo")


def test_a_reward_column_the_prompts_lack_is_refused_before_the_model_loads(run_config, prompts, tmp_path,
                                                                             monkeypatch):
    import tunesmith.models as models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    cfg = grpo(run_config, prompts, tmp_path, {"rewards": [{"function": "correctness", "args": {"column": "solution"}}]})
    with pytest.raises(ConfigError, match="reward function 'correctness' reads column 'solution', which the prompt "
                                          "rows do not have \\(they have: answer\\)"):
        tunesmith.train(cfg, echo=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_rloo_learns_with_its_kl_penalty_in_the_reward(run_config, prompts, tmp_path):
    cfg = grpo(run_config, prompts, tmp_path, {"type": "rloo", "rewards": [{"function": EVEN}]},
               training={"max_steps": 16})
    log = steps(tunesmith.train(cfg, echo=lambda m: None).run_dir)
    first = sum(r["reward"] for r in log[:3]) / 3
    last = sum(r["reward"] for r in log[-3:]) / 3
    assert last > first + 0.1, [r["reward"] for r in log]
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and log[-1]["kl"] > 0.01  # beta 0.05 by default
    # Leave-one-out advantages sum to zero in each group and the ratio is 1: the loss is 0 in value.
    assert all(abs(r["loss"]) < 1e-6 for r in log)


def _rollout_with(policy, tokenizer, groups: list[list[list[int]]], micro: list[int], **objective):
    """GRPO's rollout over prompts whose completions are given (a fake generation helper); `micro` says
    how many prompts each micro-batch holds. Returns the objective and its batches."""
    from tunesmith.generation import Generated
    from tunesmith.objective_config import objective_config
    from tunesmith.objectives.base import StepContext
    from tunesmith.objectives.grpo import GRPO

    g = len(groups[0])
    prompts = [{"prompt_ids": [10 + i, 11 + i, 12], "raw_prompt": f"q{i}", "columns": {}} for i in range(len(groups))]

    def generate(ids, **kwargs):
        return Generated([list(p) for p in ids], [c for group in groups for c in group], [False] * len(ids))

    objective = GRPO(objective_config(type="grpo", num_generations=g, max_completion_length=4,
                                      rewards=[{"function": EVEN}], **objective))
    rows, at = [], 0
    for n in micro:
        rows.append(prompts[at:at + n])
        at += n
    ctx = StepContext(policy=policy, tokenizer=tokenizer, generate=generate)
    return objective, ctx, objective.window(ctx, rows, collate=None)


def _window_gradient(objective, ctx, batches) -> torch.Tensor:
    """The engine's window gradient: every micro-batch's loss sum over the window's item count."""
    ctx.policy.zero_grad()
    n = sum(objective.count(b) for b in batches)
    for b in batches:
        (objective.loss(ctx, b).loss_sum / n).backward()
    return torch.cat([p.grad.flatten() for p in ctx.policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_dynamic_sampling_trains_only_on_groups_with_reward_spread(tiny_model_dir, tiny_tokenizer, loss_type):
    from transformers import AutoModelForCausalLM

    eos = tiny_tokenizer.eos_token_id
    same_even, same_odd = [[4, 6, eos]] * 4, [[5, 7, eos]] * 4
    mixed = [[4, 6, eos], [5, 7, eos], [4, 7, eos], [5, 6, 8, eos]]
    mixed_too = [[8, 8, eos], [9, 9, eos], [8, 9, eos], [9, 8, eos]]
    groups = [same_even, mixed, same_odd, mixed_too]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    every, ctx, full = _rollout_with(policy, tiny_tokenizer, groups, [2, 1, 1], loss_type=loss_type)
    dynamic, _, kept = _rollout_with(policy, tiny_tokenizer, groups, [2, 1, 1], loss_type=loss_type,
                                     dynamic_sampling=True)
    # The micro-batch of the odd-only group is gone; the others hold only the mixed groups' completions.
    assert [b["input_ids"].shape[0] for b in full] == [8, 4, 4] and [b["input_ids"].shape[0] for b in kept] == [4, 4]
    torch.testing.assert_close(kept[0]["input_ids"], full[0]["input_ids"][4:, :kept[0]["input_ids"].shape[1]])
    torch.testing.assert_close(kept[1]["input_ids"], full[2]["input_ids"])
    for k, f in ((kept[0], full[0]["advantages"][4:]), (kept[1], full[2]["advantages"])):
        torch.testing.assert_close(k["advantages"], f)  # the same advantages as in the whole rollout
    assert full[0]["advantages"][:4].abs().sum() == 0 and full[1]["advantages"].abs().sum() == 0
    # Logged over the whole rollout: half of its groups had no spread.
    assert every._pending["frac_reward_zero_std"] == (8.0, 16) and dynamic._pending["frac_reward_zero_std"] == (8.0, 16)
    assert dynamic._pending["reward"] == every._pending["reward"]
    # The update points the same way; only the normaliser (the items kept) differs.
    whole, filtered = _window_gradient(every, ctx, full), _window_gradient(dynamic, ctx, kept)
    scale = sum(every.count(b) for b in full) / sum(dynamic.count(b) for b in kept)
    assert filtered.abs().sum() > 0
    torch.testing.assert_close(filtered, whole * scale, rtol=1e-4, atol=1e-7)


def test_dynamic_sampling_keeps_one_group_when_none_has_spread(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    eos = tiny_tokenizer.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    objective, ctx, batches = _rollout_with(policy, tiny_tokenizer, [[[4, 6, eos]] * 4, [[5, eos]] * 4], [1, 1],
                                            dynamic_sampling=True)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 4
    assert batches[0]["advantages"].abs().sum() == 0
    logs = objective.loss(ctx, batches[0]).logs  # the step still reports its rollout
    assert logs["frac_reward_zero_std"] == (8.0, 8) and logs["reward"] == (6.0, 8)
