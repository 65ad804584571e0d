"""KTO in the one loop: the KL pairs, invariants at step 1, learning, precompute, eval, refusals."""

from __future__ import annotations


import pytest
import torch

from conftest import QA, WRONG, metric_records, training_steps, window_mean, write_jsonl



@pytest.fixture
def kto_file(tmp_path):
    # In order, every batch of 4 holds two desirable and two undesirable answers.
    rows = [{"prompt": q, "completion": c, "label": good}
            for q, a in QA * 4 for c, good in ((a, True), (WRONG[a], False))]
    return write_jsonl(tmp_path / "kto.jsonl", rows)


def kto_config(run_config, data, **objective):
    return run_config(data={"train": str(data), "shuffle": False},
                      objective={"type": "kto", **objective},
                      training={"batch_size": 4, "learning_rate": 1e-2, "max_grad_norm": None,
                                "scheduler": "constant", "max_steps": 6})


# --------------------------------------------------------------------------- the KL pairs


def test_collator_pairs_each_prompt_with_the_previous_completion_of_its_batch(tiny_tokenizer):
    """TRL's KL completions: [c_n, c_1, ..., c_{n-1}] within the batch, cut to max_length (keep_start)."""
    from tunesmith.objectives import KTO

    objective = KTO()
    objective._max_length = 9
    rows = [{"prompt_ids": [10, 11], "completion_ids": [20, 21], "label": True},
            {"prompt_ids": [12, 13, 14], "completion_ids": [22], "label": False},
            {"prompt_ids": [15], "completion_ids": [23, 24, 25, 26, 27, 28, 29, 30, 31], "label": False}]
    batch = objective.collator(tiny_tokenizer, None, None, train=True)(rows)
    pad = tiny_tokenizer.pad_token_id
    assert batch["kl_input_ids"].tolist() == [
        [10, 11, 23, 24, 25, 26, 27, 28, 29],  # prompt 0 + completion 2, cut to 9 tokens
        [12, 13, 14, 20, 21, pad, pad, pad, pad],  # prompt 1 + completion 0
        [15, 22, pad, pad, pad, pad, pad, pad, pad],  # prompt 2 + completion 1
    ]
    assert batch["kl_completion_mask"].tolist()[1] == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["kl_attention_mask"].sum(1).tolist() == [9, 5, 2]
    assert batch["input_ids"].shape == (3, 10) and batch["label"].tolist() == [True, False, False]
    assert objective.count(batch) == 3


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])
def test_step_one_loss_when_policy_is_the_reference(run_config, kto_file, weights):
    """Δ = 0 and z = 0 (the KL pairs score the same under both): every example loses w·(1 − σ(0)) = w/2."""
    cfg = kto_config(run_config, kto_file, desirable_weight=weights[0], undesirable_weight=weights[1])
    cfg["training"]["max_steps"] = 1
    _, steps = training_steps(cfg)
    step1 = steps[0]
    assert step1["loss"] == pytest.approx(0.5 * (2 * weights[0] + 2 * weights[1]) / 4, rel=1e-6)
    assert step1["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert step1[key] == pytest.approx(0.0, abs=1e-6)
    assert step1["logps/chosen"] < 0 and step1["logps/rejected"] < 0


def test_subset_logs_are_means_over_their_own_label(tiny_model_dir):
    """Batches of 3 desirable + 1 undesirable: the logged means divide by the subset's count, not the batch's."""
    from contextlib import contextmanager

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.preference import encode_unpaired
    from tunesmith.objectives import KTO, StepContext

    folder = tiny_model_dir
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    recs = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}],
             "label": good} for (q, a), good in zip(QA, (True, True, False, True))]
    rows = [encode_unpaired(tok, r, max_length=64) for r in recs]
    objective = KTO()
    batch = objective.collator(tok, None, None, train=True)(rows)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # perturb the policy so rewards and z are not 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))

    @contextmanager
    def scope():
        yield reference

    with torch.no_grad():
        out = objective.loss(StepContext(policy=model, tokenizer=tok, reference=scope), batch)
        logps = objective._logps(model, batch)
        ref = objective._logps(reference, batch)
    rewards = 0.1 * (logps - ref)
    assert out.n_tokens == 4
    assert out.logs["rewards/chosen"][1] == 3 and out.logs["rewards/rejected"][1] == 1
    assert out.logs["rewards/chosen"][0] / 3 == pytest.approx(float(rewards[[0, 1, 3]].mean()), abs=1e-6)
    assert out.logs["rewards/rejected"][0] == pytest.approx(float(rewards[2]), abs=1e-6)
    assert out.logs["rewards/margins"] == (pytest.approx(float(rewards[[0, 1, 3]].mean() - rewards[2]), abs=1e-6), 1)
    assert out.logs["logps/chosen"][0] / 3 == pytest.approx(float(logps[[0, 1, 3]].mean()), abs=1e-5)
    assert out.logs["kl"][1] == 1 and out.logs["kl"][0] >= 0


# --------------------------------------------------------------------------- learning


def test_lora_kto_learns_the_preference(run_config, kto_file):
    cfg = kto_config(run_config, kto_file, beta=0.5)  # at β 0.1 the loss moves by ~1e-3 in 24 steps
    cfg["training"]["max_steps"] = 24
    _, steps = training_steps(cfg)
    first, last = steps[:6], steps[-6:]
    assert window_mean(last, "loss") < window_mean(first, "loss") - 0.05
    assert window_mean(last, "rewards/margins") > 0.5
    assert window_mean(last, "rewards/chosen") > window_mean(last, "rewards/rejected")
    assert window_mean(last, "logps/rejected") < window_mean(first, "logps/rejected")
    assert any(r["kl"] > 0 for r in steps)


def test_precompute_gives_the_same_losses_with_a_frozen_copy(run_config, kto_file):
    losses = {}
    for pre in (False, True):
        cfg = kto_config(run_config, kto_file, precompute_ref_logps=pre)
        cfg["method"] = {"type": "full"}
        cfg["training"].update(max_steps=3, learning_rate=1e-3)
        cfg["output"]["dir"] += f"-{pre}"
        _, steps = training_steps(cfg)
        losses[pre] = [(r["loss"], r["kl"]) for r in steps]
    assert losses[False][0][0] == pytest.approx(0.5, rel=1e-6)
    assert [x for pair in losses[True] for x in pair] == pytest.approx(
        [x for pair in losses[False] for x in pair], rel=1e-4, abs=1e-6)


def test_resume_with_precompute_continues_the_same_run(run_config, kto_file):
    """A resumed run scores the reference again (the frozen copy predates the checkpoint) with the saved batch size."""
    import tunesmith

    cfg = kto_config(run_config, kto_file, precompute_ref_logps=True)
    cfg["method"] = {"type": "full"}
    cfg["training"].update(max_steps=4, learning_rate=1e-3, save_every=2, keep_last=5)
    first, steps = training_steps(cfg)
    before = [(r["loss"], r["kl"]) for r in steps]
    again = tunesmith.train(cfg, resume=str(first.run_dir / "checkpoints" / "step-0000002"), echo=lambda m: None)
    after = [(r["loss"], r["kl"]) for r in metric_records(again.run_dir) if "loss" in r]
    assert len(after) == 4
    assert [x for p in after for x in p] == pytest.approx([x for p in before for x in p], rel=1e-5, abs=1e-6)


def test_eval_reports_kl_rewards_and_logps(run_config, kto_file):
    import tunesmith

    cfg = kto_config(run_config, kto_file)
    cfg["data"]["split"] = {"validation_file": str(kto_file)}
    result = tunesmith.train(cfg, echo=lambda m: None)
    for key in ("eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins",
                "eval_logps/chosen"):
        assert key in result.metrics, key
    assert result.metrics["eval_rewards/margins"] > 0


# --------------------------------------------------------------------------- refusals


def test_batch_size_one_is_refused_naming_training_batch_size(run_config, kto_file):
    import tunesmith
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    cfg = kto_config(run_config, kto_file)
    cfg["training"].update(batch_size=1, grad_accum=4)
    # Refused when the config is validated, before any data or model is loaded.
    with pytest.raises(ConfigError, match=r"training\.batch_size: objective 'kto' needs at least 2"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"training\.batch_size: objective 'kto' needs at least 2"):
        tunesmith.train(cfg, echo=lambda m: None)


def test_pairs_or_sft_data_is_refused_naming_the_format(run_config, alpaca_file, tmp_path):
    import tunesmith
    from tunesmith.errors import DataError

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": WRONG[a]} for q, a in QA])
    for data in (alpaca_file, pairs):
        cfg = run_config(data={"train": str(data)}, objective={"type": "kto"})
        with pytest.raises(DataError, match="formats unpaired_preference"):
            tunesmith.train(cfg, echo=lambda m: None)


def test_left_truncation_is_refused(run_config, kto_file):
    import tunesmith
    from tunesmith.errors import ConfigError

    cfg = kto_config(run_config, kto_file)
    cfg["data"]["truncation"] = "left"
    with pytest.raises(ConfigError, match="data.truncation"):
        tunesmith.train(cfg, echo=lambda m: None)
