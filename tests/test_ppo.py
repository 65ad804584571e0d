"""PPO in the one loop. TRL removed its PPOTrainer, so PPO is held to its invariants (ratio 1 on a rollout's
first minibatch, KL 0 while policy = reference, the value head starting from the reward model's score head, the
adaptive KL controller) and to a toy task: a reward model trained by `tunesmith train` prefers one answer, and
PPO learns to give it. GAE's closed form and the clipped value loss are tested in test_policy_gradient.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import metric_records, write_jsonl
from tunesmith.errors import ConfigError

import tunesmith

EVEN = "rl_rewards:even"


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"what is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def ppo(run_config, prompts, tmp_path, objective: dict, **sections) -> dict:
    sections.setdefault("method", {"type": "full"})
    data = {"train": str(prompts), "max_length": 48, "split": {"validation_ratio": 0.25}, **sections.pop("data", {})}
    cfg = run_config(data=data, objective={"type": "ppo", "max_completion_length": 8, "num_generations": 2,
                                           "ppo_epochs": 2, "num_mini_batches": 2, **objective}, **sections)
    cfg["training"].update({"max_steps": 12, "batch_size": 4, "learning_rate": 3e-2, "scheduler": "constant"})
    cfg["training"].update(sections.get("training", {}))
    cfg["output"] = {"dir": str(tmp_path / "run"), "overwrite": True}
    return cfg


def steps(run_dir) -> list[dict]:
    return [r for r in metric_records(run_dir) if "lr" in r]


def test_ppo_with_a_reward_function_learns_and_keeps_its_invariants(run_config, prompts, tmp_path):
    # Full fine-tuning: LoRA on the tiny random model cannot sharpen its near-uniform head in a few steps.
    cfg = ppo(run_config, prompts, tmp_path, {"rewards": [{"function": EVEN}], "num_generations": 4},
              training={"max_steps": 32, "learning_rate": 3e-2})
    result = tunesmith.train(cfg, echo=lambda m: None)
    log = steps(result.run_dir)
    assert {"objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward", "kl_coef",
            "reward", "rewards/even/mean", "completions/mean_length", "completions/clipped_ratio",
            "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
            "val/ratio", "entropy"} <= set(log[0])
    # Four steps per rollout (2 epochs x 2 minibatches): the rollout's numbers come with its first step,
    # where the policy has not moved since it sampled: ratio 1, nothing clipped, no approximate KL.
    firsts = [r for r in log if "reward" in r]
    assert [r["step"] for r in firsts] == list(range(1, 33, 4))
    for r in firsts:
        assert r["val/ratio"] == pytest.approx(1.0, abs=1e-6)
        assert r["policy/clipfrac_avg"] == 0 and r["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)
    later = [r for r in log if "reward" not in r]
    assert any(abs(r["val/ratio"] - 1) > 1e-4 for r in later)  # the reused rollout's ratio leaves 1
    # The frozen copy is the reference: KL 0 at the first rollout, then the policy moves away.
    assert firsts[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert firsts[-1]["objective/kl"] > 1e-3
    first = sum(r["reward"] for r in firsts[:2]) / 2
    last = sum(r["reward"] for r in firsts[-2:]) / 2
    assert last > first + 0.15, [r["reward"] for r in firsts]
    assert {"eval_reward", "eval_rewards/even/mean", "eval_completions/mean_length"} <= set(result.metrics)


def test_adaptive_kl_coefficient_follows_ziegler_controller():
    from tunesmith.objectives.ppo import adapted_kl_coef

    # KL above target: the coefficient grows, by at most 20 % x completions / horizon.
    assert adapted_kl_coef(0.1, kl=12.0, target=6.0, completions=100, horizon=1000) == pytest.approx(0.1 * 1.02)
    assert adapted_kl_coef(0.1, kl=3.0, target=6.0, completions=100, horizon=1000) == pytest.approx(0.1 * 0.98)
    assert adapted_kl_coef(0.1, kl=6.6, target=6.0, completions=100, horizon=1000) == pytest.approx(0.1 * 1.01)


def test_resumed_ppo_run_inside_a_rollout_matches_the_uninterrupted_one(run_config, prompts, tmp_path):
    cfg = ppo(run_config, prompts, tmp_path, {"rewards": [{"function": EVEN}], "target_kl": 0.5, "kl_horizon": 20},
              method={"type": "lora"}, training={"max_steps": 6, "save_every": 3, "keep_last": 10, "log_every": 2})
    a = tunesmith.train(cfg, echo=lambda m: None)
    b_dir = tmp_path / "b"
    shutil.copytree(a.run_dir, b_dir)
    shutil.rmtree(b_dir / "adapter")
    for ckpt in (b_dir / "checkpoints").iterdir():
        if ckpt.name != "step-0000003":
            shutil.rmtree(ckpt)
    b = tunesmith.train({**cfg, "output": {"dir": str(b_dir)}}, resume=True, echo=lambda m: None)
    wa = load_file(a.run_dir / "adapter" / "adapter_model.safetensors")
    wb = load_file(b.run_dir / "adapter" / "adapter_model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)
    la, lb = steps(a.run_dir), steps(b.run_dir)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [2, 4, 6]
    for ra, rb in zip(la, lb):  # step 4 uses the checkpoint's rollout, value head and kl_coef
        for key in ("loss", "loss/value_avg", "val/ratio", "entropy"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert lb[-1]["kl_coef"] == pytest.approx(la[-1]["kl_coef"], rel=1e-9)
    assert la[-1]["kl_coef"] != pytest.approx(0.05)  # the controller moved it


@pytest.fixture
def reward_run(run_config, tmp_path):
    """A reward model trained by tunesmith on the tiny Llama: answers of "yes" beat answers of "no"."""
    pairs = [{"prompt": f"what is {i} plus {i}?", "chosen": "yes yes yes", "rejected": "no no no"} for i in range(16)]
    cfg = run_config(data={"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "max_length": 48,
                           "split": {"validation_ratio": 0.0}},
                     objective={"type": "reward"}, method={"type": "full"})
    cfg["training"].update({"max_steps": 20, "batch_size": 8, "learning_rate": 1e-2})
    cfg["output"] = {"dir": str(tmp_path / "rm"), "overwrite": True}
    return tunesmith.train(cfg, echo=lambda m: None).run_dir


@pytest.fixture
def sft_policy(run_config, tmp_path):
    """The tiny Llama after SFT on both answers of every prompt: it says "yes yes yes" or "no no no", about
    half the time each (the SFT step of the RLHF pipeline)."""
    rows = [{"prompt": f"what is {i} plus {i}?", "completion": answer} for i in range(12)
            for answer in ("yes yes yes", "no no no")]
    cfg = run_config(data={"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)), "max_length": 48,
                           "split": {"validation_ratio": 0.0}}, method={"type": "full"})
    cfg["training"].update({"max_steps": 40, "batch_size": 8, "learning_rate": 1e-2})
    cfg["output"] = {"dir": str(tmp_path / "sft"), "overwrite": True}
    return tunesmith.train(cfg, echo=lambda m: None).run_dir / "model"


def test_ppo_learns_what_a_trained_reward_model_prefers(run_config, prompts, reward_run, sft_policy, tmp_path):
    # lr 3e-3: at 1e-2 full fine-tuning of the tiny policy collapsed to one-token completions (which the
    # reward model scores low) on an AMX Xeon whose kernels round differently; 3e-3 climbed +3.2 there.
    cfg = ppo(run_config, prompts, tmp_path, {"reward_model": str(reward_run), "num_generations": 4},
              model={"name_or_path": str(sft_policy)}, training={"max_steps": 24, "learning_rate": 3e-3})
    messages = []
    result = tunesmith.train(cfg, echo=messages.append)
    assert any(m.startswith("reward model: ") for m in messages)
    firsts = [r for r in steps(result.run_dir) if "objective/scores" in r]
    start = sum(r["objective/scores"] for r in firsts[:2]) / 2
    end = sum(r["objective/scores"] for r in firsts[-2:]) / 2
    assert end > start + 1.0, [round(r["objective/scores"], 3) for r in firsts]
    assert firsts[-1]["objective/kl"] > 0.01  # paid for with KL to the SFT policy
    assert "eval_score" in result.metrics and "eval_reward" in result.metrics


def test_value_head_starts_from_the_reward_models_score_head(tiny_model_dir, reward_run):
    from transformers import AutoModelForCausalLM

    from tunesmith.artifacts import load_trained
    from tunesmith.objective_config import objective_config
    from tunesmith.objectives import StepContext
    from tunesmith.objectives.ppo import PPO, score_head

    rm = load_trained(reward_run).model
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    objective = PPO(objective_config(type="ppo", reward_model=str(reward_run)))
    groups = objective.own_parameters(StepContext(policy=policy, reward_model=rm), torch.device("cpu"))
    assert groups[0]["params"][0] is objective.value_head.weight
    torch.testing.assert_close(objective.value_head.weight, score_head(rm, 48).weight.float())
    without = PPO(objective_config(type="ppo", rewards=[{"function": EVEN}]))
    without.own_parameters(StepContext(policy=policy), torch.device("cpu"))
    assert without.value_head.weight.abs().sum() == 0  # no reward model: values start at 0


def test_ppo_settings_refused_at_validation(run_config, prompts, tiny_model_dir, tmp_path):
    from tunesmith.config import load_config

    def refused(objective: dict, match: str, **sections) -> None:
        with pytest.raises(ConfigError, match=match):
            load_config(ppo(run_config, prompts, tmp_path, objective, **sections))

    refused({}, "objective: ppo needs a reward: objective.reward_model")
    refused({"rewards": [{"function": EVEN}], "num_mini_batches": 3},
            r"num_mini_batches \(3\) must divide the completions of a rollout .* = 8\)")
    refused({"rewards": [{"function": EVEN}], "num_iterations": 2}, "ppo_epochs x num_mini_batches")
    refused({"rewards": [{"function": EVEN}], "kl_estimator": "k2"}, "kl_estimator")
    refused({"rewards": [{"function": EVEN}], "dynamic_sampling": True}, "objective.dynamic_sampling: ppo")
    # Added to the score here, subtracted in TRL: a TRL config's positive 1.0 would reward truncation.
    refused({"rewards": [{"function": EVEN}], "missing_eos_penalty": 1.0}, "objective.missing_eos_penalty")
    # A plain LM has no trained score head: refused when it loads, before the policy does (a random head
    # would reward noise).
    cfg = ppo(run_config, prompts, tmp_path, {"reward_model": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match="objective.reward_model: .* has no trained AutoModelForSequence"
                                          "Classification head .*score.weight"):
        tunesmith.train(cfg, echo=lambda m: None)
    # A trained classifier with two outputs is no reward model either.
    from transformers import AutoModelForSequenceClassification

    two = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).save_pretrained(two)
    for f in tiny_model_dir.glob("*token*"):
        (two / f.name).write_bytes(f.read_bytes())
    cfg = ppo(run_config, prompts, tmp_path, {"reward_model": str(two)})
    with pytest.raises(ConfigError, match="objective.reward_model: .* has 2 outputs per sequence; a reward model "
                                          "has one"):
        tunesmith.train(cfg, echo=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_plan_of_ppo_holds_the_reward_model_beside_the_policy(run_config, prompts, reward_run, tmp_path):
    """`tunesmith plan` trains its proxies with the real reward model and shows its weights as a line."""
    from tunesmith.artifacts import load_trained
    from tunesmith.planning import plan

    p = plan(ppo(run_config, prompts, tmp_path, {"reward_model": str(reward_run)}, training={"max_steps": 2}))
    rm = load_trained(reward_run).model
    rm_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in (*rm.parameters(), *rm.buffers())}.values())
    assert p.memory["second_model"] == rm_bytes
    assert p.peak == sum(p.memory.values()) and p.memory["activations"] > 0


def test_reward_model_reads_rollouts_laid_out_as_its_training_pairs(tiny_tokenizer):
    """A rollout that stopped at <|im_end|> is scored as `prompt + answer + <|im_end|>\\n`, the very tokens
    reward training rendered for the same answer, so the head reads the same last token."""
    import copy

    from tunesmith.data.preference import chat_ids, encode_pair
    from tunesmith.data.templates import FALLBACK_CHAT_TEMPLATE, turn_end_ids
    from tunesmith.objectives.ppo import reward_model_sequences

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    end = turn_end_ids(tok)
    assert end[0] == tok.convert_tokens_to_ids("<|im_end|>") and len(end) == 2
    record = {"prompt": [{"role": "user", "content": "what color is the sky"}],
              "chosen": [{"role": "assistant", "content": "blue"}],
              "rejected": [{"role": "assistant", "content": "green"}]}
    pair = encode_pair(tok, record, max_length=64)
    trained = pair["prompt_ids"] + pair["chosen_ids"]
    prompt = chat_ids(tok, record["prompt"], generation_prompt=True)
    assert prompt == pair["prompt_ids"] and pair["chosen_ids"][-len(end):] == end
    generated = pair["chosen_ids"][:-(len(end) - 1)]  # what sampling gives: the answer and the stop token
    assert reward_model_sequences([prompt], [generated], [False], end) == [trained]
    # Cut off before its end: scored as it is (missing_eos_penalty is the knob for those).
    assert reward_model_sequences([prompt], [generated[:2]], [True], end) == [prompt + generated[:2]]
