"""KTO parity with TRL 1.16's KTOTrainer (the reference implementation), step by step.

The recipe of test_dpo_trl_parity.py: a tiny saved Llama with the fallback chat template, 16
conversational unpaired rows in order (both labels in every batch of 4, in varying proportions),
batch 4, 6 steps, lr 1e-3 linear to 0, AdamW without weight decay, clipping at 1.0, fp32, full
fine-tuning with a frozen reference loaded from the same folder. Loss, the KL estimate, the
reward and log-prob means and the gradient norm must match per step — with the reference scored
every step and precomputed once.
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl", reason="TRL (the `bench` extra) is the reference implementation")

from conftest import QA, WRONG, write_jsonl  # noqa: E402
from parity_recipe import STEPS, TRL_ARGS, run_tunesmith, save_tiny_llama  # noqa: E402

# Every batch of 4 holds both labels, 1 to 3 of each, so subset means and the margin are exercised.
LABELS = [True, False, True, False, True, True, False, True, False, True, False, False, True, False, False, True]
ROWS = [(q, a if good else WRONG[a], good) for (q, a), good in zip(QA * 3, LABELS)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kto-parity")
    save_tiny_llama(folder)
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": c}],
             "label": good} for q, c, good in ROWS]
    return folder, write_jsonl(folder / "kto.jsonl", rows), rows


def run_trl(folder, rows, out, precompute: bool, desirable_weight: float):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(out), beta=0.1, desirable_weight=desirable_weight, undesirable_weight=1.0,
                     precompute_ref_log_probs=precompute, **TRL_ARGS)
    trainer = KTOTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(folder))
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h and "kl" in h]


def test_kto_rows_and_kl_pairs_tokenize_as_trl(saved, tmp_path):
    """Same prompt/completion split and the same mismatched KL completions (TRL's rotation by one)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from tunesmith.config import DataConfig
    from tunesmith.objectives import KTO
    from tunesmith.objectives.kto import kl_completions

    folder, data, rows = saved
    tok = AutoTokenizer.from_pretrained(folder)
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, bf16=False,
                     report_to=[], max_length=64)
    theirs = KTOTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok).train_dataset
    objective = KTO()
    ours = [objective.encode(tok, r, DataConfig(train=str(data), max_length=64), None)[0] for r in rows]
    assert [r["prompt_ids"] for r in ours] == theirs["prompt_ids"]
    assert [r["completion_ids"] for r in ours] == theirs["completion_ids"]
    ours_kl = [c for i in range(0, len(ours), 4) for c in kl_completions(ours[i : i + 4])]
    assert ours_kl == theirs["KL_completion_ids"]


@pytest.mark.parametrize("precompute, desirable_weight", [(False, 1.0), (True, 1.5)])
def test_kto_matches_trl_step_by_step(saved, tmp_path, precompute, desirable_weight):
    folder, data, rows = saved
    _, theirs = run_trl(folder, rows, tmp_path / "trl", precompute, desirable_weight)
    ours = run_tunesmith(folder, data, tmp_path / "ours",
                         {"type": "kto", "beta": 0.1, "desirable_weight": desirable_weight, "undesirable_weight": 1.0,
                          "precompute_ref_logps": precompute})
    assert len(theirs) == len(ours) == STEPS
    assert theirs[0]["loss"] == pytest.approx(0.5 * (desirable_weight * 2 + 2) / 4, abs=1e-6)  # Δ = z = 0
    assert any(t["kl"] > 0 for t in theirs), "the KL estimate never left 0: the z path is not exercised"
    for step, (t, o) in enumerate(zip(theirs, ours), 1):
        assert o["loss"] == pytest.approx(t["loss"], abs=1e-5), f"step {step} loss"
        assert o["kl"] == pytest.approx(t["kl"], abs=1e-5), f"step {step} kl"
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert o[key] == pytest.approx(t[key], abs=1e-5), f"step {step} {key}"
        for key in ("logps/chosen", "logps/rejected"):
            assert o[key] == pytest.approx(t[key], abs=1e-4), f"step {step} {key}"
        assert o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-4), f"step {step} grad_norm"
