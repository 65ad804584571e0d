"""benchmarks/gpu_sft.py runs end to end on a tiny Llama (--smoke) and refuses to run without a GPU.

The smoke run checks the script's plumbing (model build, data, one process per run for each
tool, the RESULT protocol, runs reported as they end, the summary line), not its numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sft.py"


def _run(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


# Five processes (model build, then LoRA and full for each tool), each importing torch +
# transformers + peft: 35-50 s on a shared 2-core machine, so it carries the slow mark.
@pytest.mark.slow
def test_smoke_run_reports_every_run(tmp_path):
    proc = _run("--smoke", "--tools", "tunesmith", "trl", timeout=180, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    assert set(summary["runs"]) == {"smoke/lora", "smoke/full"}
    for name, entry in summary["runs"].items():
        for tool in ("tunesmith", "trl"):
            run = entry[tool]
            assert "error" not in run, (name, tool, run)
            assert run["tokens_per_s"] > 0, name
            assert run["rows_full"], name  # every packed row full: tokens per step are exact
            assert run["timed_steps"] == summary["steps"] == 2
            assert {"mfu", "mfu_with_attention", "peak_gpu_mem_mb", "peak_rss_mb"} <= set(run)
            assert run["mfu"] > 0 and run["mfu_with_attention"] > run["mfu"]
        assert entry["flops_per_token"] > 0
        assert entry["tokens_per_s_ratio"] == entry["tunesmith"]["tokens_per_s"] / entry["trl"]["tokens_per_s"]
        # By default each tool runs its own attention: tunesmith per document, TRL transformers' sdpa.
        assert "per-document SDPA" in entry["tunesmith"]["settings"] and ", sdpa," in entry["trl"]["settings"]
        assert entry["trl"]["trainable_params"] == entry["tunesmith"]["trainable_params"]
    # LoRA's frozen base skips weight gradients: 4N vs 6N FLOPs per token.
    lora, full = summary["runs"]["smoke/lora"], summary["runs"]["smoke/full"]
    assert lora["flops_per_token"] * 6 == full["flops_per_token"] * 4
    assert set(summary["targets"]) == {"1b_lora_tokens_per_s_ratio", "1b_lora_tunesmith_mfu"}
    # Each run was reported when it ended (a device command cut off keeps those), and the summary saved.
    printed = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RUN ")]
    saved = [json.loads(line) for line in (tmp_path / "gpu_sft_runs.jsonl").read_text().splitlines()]
    assert printed == saved and [(r["run"], r["tool"]) for r in saved] == [
        ("smoke/lora", "tunesmith"), ("smoke/lora", "trl"), ("smoke/full", "tunesmith"), ("smoke/full", "trl")]
    assert json.loads((tmp_path / "gpu_sft.json").read_text()) == summary


def test_without_gpu_it_points_to_smoke():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would start the real benchmark")
    proc = _run(timeout=60)
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
