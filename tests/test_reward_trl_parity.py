"""Reward-model parity with TRL 1.16's RewardTrainer (the reference implementation), step by step.

The DPO parity recipe (../shared/reference/alignment.md): a tiny saved Llama, 16 conversational
pairs in order, batch 4, 6 steps, lr 1e-3 linear to 0, AdamW without weight decay, clipping at
1.0, fp32, full fine-tuning. The score head is new to a causal-LM checkpoint and each tool would
draw it from its own RNG state, so the folder holds a sequence-classification checkpoint with
num_labels=1: both tools load the same head weights. Both tokenise the whole conversation with
the chat template; the test checks the token ids are identical before comparing loss, accuracy,
margin, reward statistics and the gradient norm per step (plain, centered, and with a margin
column).
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl", reason="TRL (the `bench` extra) is the reference implementation")

from conftest import QA, WRONG, write_jsonl  # noqa: E402
from parity_recipe import TRL_ARGS, run_tunesmith, save_tiny_llama  # noqa: E402

PAIRS = [(q, a, WRONG[a]) for q, a in QA * 3][:16]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import torch
    from transformers import LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward-parity")
    lm = save_tiny_llama(folder)
    # The same backbone with a one-output score head, saved so neither tool draws the head itself.
    config = lm.config
    config.num_labels = 1
    torch.manual_seed(5)
    model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.2)  # rewards far enough apart that accuracy is not all ties
    model.save_pretrained(folder)
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    return folder, rows


def with_margins(rows: list[dict]) -> list[dict]:
    return [{**r, "margin": 0.25 * (i % 4)} for i, r in enumerate(rows)]


def run_trl(folder, rows, out, center: float | None):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(out), center_rewards_coefficient=center, **TRL_ARGS)
    trainer = RewardTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(folder))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "accuracy" in h]
    return logs, trainer.train_dataset


def test_same_token_ids_as_trl(saved, tmp_path):
    """Conversational pairs: TRL tokenises apply_chat_template(prompt + answer) whole, without an added EOS."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tunesmith.config import DataConfig
    from tunesmith.data.formats import FORMATS
    from tunesmith.objectives.reward import RewardModel

    folder, rows = saved
    tok = AutoTokenizer.from_pretrained(folder)
    args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=64)
    trainer = RewardTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    records = [FORMATS["preference"].normalize(r, lambda name: name) for r in rows]
    objective, data = RewardModel(), DataConfig(train="x.jsonl", max_length=64)
    for theirs, record in zip(trainer.train_dataset, records):
        row, _ = objective.encode(tok, record, data, None)
        assert row["prompt_ids"] + row["chosen_ids"] == theirs["chosen_ids"]
        assert row["prompt_ids"] + row["rejected_ids"] == theirs["rejected_ids"]


@pytest.mark.parametrize("case", ["plain", "centered", "margin"])
def test_reward_matches_trl_step_by_step(saved, tmp_path, case):
    folder, rows = saved
    center = 0.01 if case == "centered" else None
    rows = with_margins(rows) if case == "margin" else rows
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    theirs, _ = run_trl(folder, rows, tmp_path / "trl", center)
    ours = run_tunesmith(folder, data, tmp_path / "ours",
                         {"type": "reward", "center_rewards_coefficient": center or 0.0})
    assert len(theirs) == len(ours) == 6
    assert 0 < sum(t["accuracy"] for t in theirs) / 6 < 1  # the comparison is not between all-ties
    for step, (t, o) in enumerate(zip(theirs, ours), 1):
        assert o["loss"] == pytest.approx(t["loss"], abs=1e-5), f"step {step} loss"
        assert o["accuracy"] == pytest.approx(t["accuracy"], abs=1e-6), f"step {step} accuracy"
        assert o["margin"] == pytest.approx(t["margin"], abs=1e-5), f"step {step} margin"
        for key in ("mean_reward", "min_reward", "max_reward"):
            assert o[key] == pytest.approx(t[key], abs=1e-5), f"step {step} {key}"
        assert o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-4), f"step {step} grad_norm"
