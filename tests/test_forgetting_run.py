"""Forgetting measured by every training run: base before, tuned after, deltas in log and card."""

from __future__ import annotations

import json

import pytest

import tunesmith


def test_forgetting_is_on_by_default():
    from tunesmith.config import EvalConfig

    assert EvalConfig().forgetting is True and EvalConfig().reference[0].path == "default"


def test_run_measures_reference_before_and_after(run_config):
    cfg = run_config(method={"type": "full"}, training={"learning_rate": 1e-2, "max_steps": 6, "save_every": 3},
                     eval={"forgetting": True})
    result = tunesmith.train(cfg, echo=lambda m: None)

    before = json.loads((result.run_dir / "reference_base.json").read_text())
    assert set(before) == {"ref/default/perplexity"}
    f = result.forgetting
    assert f["before/ref/default/perplexity"] == before["ref/default/perplexity"]
    delta = f["after/ref/default/perplexity"] - f["before/ref/default/perplexity"]
    assert f["forgetting/default/perplexity_delta"] == pytest.approx(delta)
    # Full fine-tuning at a high rate on six Q/A pairs moves the model away from general text.
    assert f["after/ref/default/perplexity"] != f["before/ref/default/perplexity"]

    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("forgetting")]
    assert len(logged) == 1 and logged[0]["forgetting/default/perplexity_delta"] == pytest.approx(delta)
    card = (result.run_dir / "README.md").read_text()
    assert "## Forgetting" in card and "forgetting/default/perplexity_delta" in card


def test_reference_every_eval_and_opt_out(run_config):
    cfg = run_config(data={"split": {"validation_ratio": 0.25}},
                     training={"max_steps": 4}, eval={"every": 2, "reference_every_eval": True, "forgetting": True})
    result = tunesmith.train(cfg, echo=lambda m: None)
    evals = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    mid = [r for r in evals if "eval_loss" in r and not r.get("final")]
    assert mid and all("ref/default/perplexity" in r and "forgetting/default/perplexity_delta" in r for r in mid)

    off = run_config(eval={"forgetting": False}, output={"dir": str(result.run_dir) + "-off"})
    quiet = tunesmith.train(off, echo=lambda m: None)
    assert quiet.forgetting == {} and not (quiet.run_dir / "reference_base.json").exists()
    assert "## Forgetting" not in (quiet.run_dir / "README.md").read_text()
