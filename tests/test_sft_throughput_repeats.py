"""sft_throughput.py --repeats: how one run's repeats become the number its ratio uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sft_throughput  # noqa: E402


def _run(tok_s: float, rss: float, loss: float | None, seconds: float) -> dict:
    return {"tokens_per_s": tok_s, "peak_rss_mb": rss, "heldout_loss": loss, "train_runtime_s": seconds,
            "train_tokens": 1000, "settings": "s"}


def test_repeats_give_median_speed_largest_memory_and_the_first_loss():
    runs = [_run(200.0, 2500, 2.019, 80.0), _run(240.0, 2610, None, 70.0), _run(180.0, 2550, None, 90.0)]
    out = sft_throughput.combine(runs)
    assert out["tokens_per_s"] == 200.0
    assert out["tokens_per_s_runs"] == [200.0, 240.0, 180.0]
    assert out["train_runtime_s"] == 80.0
    assert out["peak_rss_mb"] == 2610
    assert out["heldout_loss"] == 2.019  # only the first repeat measures it
    assert sft_throughput.combine(runs[:2])["tokens_per_s"] == 220.0


def test_repeats_below_one_are_refused_before_any_run(monkeypatch, tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    monkeypatch.setattr(sys, "argv", ["sft_throughput.py", "--data", str(data), "--repeats", "0"])
    monkeypatch.setattr(sft_throughput, "launch", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit, match="--repeats must be at least 1, got 0"):
        sft_throughput.main()
