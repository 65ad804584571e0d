"""DPO parity with TRL 1.16's DPOTrainer (the reference implementation), step by step.

The verified recipe of ../shared/reference/alignment.md: a tiny saved Llama, 16 conversational
pairs in order, batch 4, 6 steps, lr 1e-3 linear to 0, AdamW without weight decay, clipping at
1.0, fp32, full fine-tuning with a frozen reference loaded from the same folder. Loss,
rewards/margins, rewards/accuracies and the gradient norm must match per step.
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl", reason="TRL (the `bench` extra) is the reference implementation")

from conftest import QA, WRONG, write_jsonl  # noqa: E402
from parity_recipe import TRL_ARGS, run_tunesmith, save_tiny_llama  # noqa: E402

PAIRS = [(q, a, WRONG[a]) for q, a in QA * 3][:16]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo-parity")
    save_tiny_llama(folder)
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    return folder, write_jsonl(folder / "pairs.jsonl", rows), rows


def run_trl(folder, rows, out, loss_type: str, label_smoothing: float) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(out), beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing, **TRL_ARGS)
    trainer = DPOTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(folder))
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "rewards/margins" in h]


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_dpo_matches_trl_step_by_step(saved, tmp_path, loss_type, smoothing):
    folder, data, rows = saved
    theirs = run_trl(folder, rows, tmp_path / "trl", loss_type, smoothing)
    ours = run_tunesmith(folder, data, tmp_path / "ours",
                         {"type": "dpo", "beta": 0.1, "loss": loss_type, "label_smoothing": smoothing})
    assert len(theirs) == len(ours) == 6
    for step, (t, o) in enumerate(zip(theirs, ours), 1):
        # rel 1e-6 where the loss is large: IPO's squared logits reach ~20 by step 5, where a rounding
        # difference in the summed log-probs (fp32 ulp ~1e-5 at -100) moves the loss by ~1e-5.
        assert o["loss"] == pytest.approx(t["loss"], abs=1e-5, rel=1e-6), f"step {step} loss"
        assert o["rewards/margins"] == pytest.approx(t["rewards/margins"], abs=1e-5), f"step {step} margins"
        assert o["rewards/accuracies"] == pytest.approx(t["rewards/accuracies"], abs=1e-6), f"step {step} acc"
        assert o["logps/chosen"] == pytest.approx(t["logps/chosen"], abs=1e-4), f"step {step} logps/chosen"
        assert o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-4), f"step {step} grad_norm"
