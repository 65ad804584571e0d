"""Two processes (torchrun, gloo on CPU) train exactly as one process with the same global batch.

The window's item count (label tokens for SFT, pairs for DPO) is summed over processes before it
normalises the loss; DDP then averages gradients. A run of 2 processes x 2 micro-batches per step
must log the same losses and objective logs, and end with the same weights, as 1 process x 4.
`accelerate launch --cpu` has been seen to start one process only, hence torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import QA, WRONG, classification_tasks, metric_records, write_jsonl

import tunesmith

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")


def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA * 4])


def pair_data(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": WRONG[a]} for q, a in QA * 4])


CASES = {
    # Packed SFT rows hold different numbers of label tokens on the two processes; they come from the
    # memory-mapped Arrow store, built once by the main process and read by both (the in-memory rows of
    # packed SFT on two processes: the full fine-tuning resume test below).
    "sft-arrow-store": ({"type": "sft"}, sft_data, {"packing": True, "store": "arrow"}),
    "dpo": ({"type": "dpo", "beta": 0.5}, pair_data, {}),
}


def logged(run_dir):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "epoch")} for r in metric_records(run_dir)]


def one_and_two(cfg: dict, tmp_path, env: dict | None = None):
    """(the run folder of `cfg` in this process, that of the same run on two processes with half the grad_accum)."""
    one = tunesmith.train(cfg, echo=lambda m: None)
    two_cfg = {**cfg, "training": {**cfg["training"], "grad_accum": cfg["training"]["grad_accum"] // 2},
               "output": {**cfg["output"], "dir": str(tmp_path / "two")}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two_cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tunesmith.cli", "train", str(path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # One copy of the run log, not one per process.
    assert proc.stdout.count(f"done: {cfg['training']['max_steps']} steps") == 1, proc.stdout
    return one.run_dir, tmp_path / "two"


def assert_same_run(one_dir, two_dir, files: list[str]) -> None:
    """The same logged numbers every step, and the same saved weights."""
    a, b = logged(one_dir), logged(two_dir)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert rb.keys() == ra.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert a[0]["loss"] != pytest.approx(a[-1]["loss"], rel=1e-3)  # it trained
    for file in files:
        wa, wb = load_file(one_dir / file), load_file(two_dir / file)
        assert wa.keys() == wb.keys()
        # Sums in another order differ in the last bits; Adam's 1/sqrt(v) magnifies that for entries
        # whose gradients are near zero, to a few 1e-6 after three steps at this learning rate.
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5, msg=f"{file}: {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_as_one_with_the_same_global_batch(run_config, tmp_path, case):
    objective, data, data_extra = CASES[case]
    cfg = run_config(data={"train": str(data(tmp_path)), **data_extra}, objective=objective,
                     training={"batch_size": 2, "grad_accum": 4, "max_steps": 3, "learning_rate": 1e-2,
                               "max_grad_norm": 1.0},
                     eval={"at_end": False}, output={"dir": str(tmp_path / "one"), "model_card": False})
    cache = tmp_path / "cache-two"  # the two processes build their own store, not the one-process run's
    one_dir, two_dir = one_and_two(cfg, tmp_path, env={"TUNESMITH_CACHE": str(cache)})
    assert_same_run(one_dir, two_dir, ["adapter/adapter_model.safetensors"])
    if data_extra.get("store"):  # one finished store, no second build's leftovers
        assert len(list((cache / "rows").iterdir())) == 1 and not list((cache / "rows").glob("*.tmp-*"))


def test_two_process_multi_task_run_with_heads_and_adapters_per_task_trains_as_one(tiny_bert_wide_dir, tmp_path):
    """A multi-task run whose second task has its own head and its own LoRA adapter runs the shared backbone
    outside DDP's forward: the engine averages the gradients itself (a task one process did not draw
    contributes zeros there), and the per-task logs are merged over processes. Same numbers as one process."""
    cfg = {"model": {"name_or_path": str(tiny_bert_wide_dir)}, "tasks": classification_tasks(tmp_path),
           "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "multitask": {"sampling": "equal", "shared": False, "uncertainty_weighting": True},
           "training": {"batch_size": 2, "grad_accum": 4, "max_steps": 3, "learning_rate": 1e-2, "max_grad_norm": 1.0,
                        "progress": False, "log_every": 1, "precision": "fp32"},
           "eval": {"at_end": False, "forgetting": False},
           "output": {"dir": str(tmp_path / "one"), "model_card": False}}
    one_dir, two_dir = one_and_two(cfg, tmp_path)
    assert any("topic/loss" in r and "sentiment/loss" in r for r in logged(two_dir))
    assert_same_run(one_dir, two_dir, ["adapter/adapter_model.safetensors", "adapter/heads/topic.safetensors",
                                       "adapter/adapters/topic/adapter_model.safetensors"])


def test_two_process_full_fine_tune_interrupted_and_resumed_ends_as_one_process(run_config, tmp_path):
    """Full fine-tuning under DDP, stopped by SIGTERM after step 2 (every process signals itself
    there), checkpointed once, resumed by two processes: the same losses and weights as one
    uninterrupted process with the same global batch."""
    import os

    cfg = run_config(data={"train": str(sft_data(tmp_path)), "packing": True}, method={"type": "full"},
                     training={"batch_size": 2, "grad_accum": 4, "max_steps": 3, "learning_rate": 1e-3,
                               "max_grad_norm": 1.0, "save_every": 100},
                     eval={"at_end": False}, output={"dir": str(tmp_path / "one"), "model_card": False})
    one = tunesmith.train(cfg, echo=lambda m: None)

    two_cfg = {**cfg, "training": {**cfg["training"], "grad_accum": 2}, "output": {**cfg["output"], "dir": str(tmp_path / "two")}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two_cfg))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "tunesmith.cli", "train", str(path)]
    env = {**os.environ, "TUNESMITH_FAULT": "step:2", "TUNESMITH_FAULT_SIGNAL": "15"}
    stopped = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert stopped.returncode != 0 and stopped.stdout.count("training stopped after step 2") == 1, \
        stopped.stdout[-2000:] + stopped.stderr[-3000:]
    two_dir = tmp_path / "two"
    assert sorted(p.name for p in (two_dir / "checkpoints").iterdir()) == ["step-0000002"]  # written once
    resumed = subprocess.run(launch + ["--resume", "latest"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert resumed.stdout.count("resumed from") == 1 and resumed.stdout.count("done: 3 steps") == 1

    a, b = logged(one.run_dir), logged(two_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    wa = load_file(one.run_dir / "model" / "model.safetensors")
    wb = load_file(two_dir / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5, msg=name)
