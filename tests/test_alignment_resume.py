"""Resuming a preference run from a mid-run checkpoint reproduces the uninterrupted run.

What must survive: the reference (a frozen copy of the *initial* weights for full fine-tuning,
not the checkpoint's), objective state (KTO's batch size and precomputed pairs), the log
windows of the objective's own logs, and the data position.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import QA, WRONG, metric_records, write_jsonl

import tunesmith


def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": WRONG[a]} for q, a in QA * 3])


def unpaired(tmp_path):
    rows = [{"prompt": q, "completion": c, "label": good} for q, a in QA * 2 for c, good in ((a, True), (WRONG[a], False))]
    return write_jsonl(tmp_path / "unpaired.jsonl", rows)


CASES = {
    "dpo-full-frozen-copy": ({"type": "full"}, {"type": "dpo"}, pairs),
    "dpo-lora-precomputed": ({"type": "lora"}, {"type": "dpo", "precompute_ref_logps": True}, pairs),
    "kto-full": ({"type": "full"}, {"type": "kto", "beta": 0.5}, unpaired),
    "orpo-lora": ({"type": "lora"}, {"type": "orpo"}, pairs),
}


def weights(run_dir):
    folder = run_dir / ("model" if (run_dir / "model").is_dir() else "adapter")
    name = "model.safetensors" if folder.name == "model" else "adapter_model.safetensors"
    return load_file(folder / name)


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_preference_run_matches_the_uninterrupted_one(run_config, tmp_path, case):
    method, objective, data = CASES[case]
    cfg = run_config(data={"train": str(data(tmp_path))}, method=method, objective=objective,
                     training={"batch_size": 4, "epochs": 2, "max_steps": 6, "save_every": 3, "keep_last": 10,
                               "learning_rate": 1e-3 if method["type"] == "full" else 1e-2, "log_every": 2},
                     output={"dir": str(tmp_path / "a")})
    a = tunesmith.train(cfg, echo=lambda m: None)
    assert a.steps == 6

    # The same run, stopped after its step-3 checkpoint: copy the folder as it was then.
    b_dir = tmp_path / "b"
    shutil.copytree(a.run_dir, b_dir)
    for extra in ("model", "adapter", "README.md"):
        shutil.rmtree(b_dir / extra, ignore_errors=True) if (b_dir / extra).is_dir() else (b_dir / extra).unlink(
            missing_ok=True)
    for ckpt in (b_dir / "checkpoints").iterdir():
        if ckpt.name != "step-0000003":
            shutil.rmtree(ckpt)
    cfg_b = {**cfg, "output": {**cfg["output"], "dir": str(b_dir)}}
    b = tunesmith.train(cfg_b, resume=True, echo=lambda m: None)
    assert b.steps == 6

    wa, wb = weights(a.run_dir), weights(b.run_dir)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)

    def logged(run_dir):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metric_records(run_dir) if "loss" in r]

    for ra, rb in zip(logged(a.run_dir), logged(b.run_dir), strict=True):
        assert rb.keys() == ra.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
