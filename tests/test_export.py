"""`tunesmith export --format merged`: a trained run as a plain transformers model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import tunesmith
from tunesmith.errors import ConfigError


@pytest.fixture
def lora_run(run_config, tmp_path):
    result = tunesmith.train(run_config(training={"max_steps": 3}), echo=lambda m: None)
    return result.run_dir


def test_merged_export_loads_without_peft_and_computes_what_the_run_does(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.artifacts import load_trained

    out = tunesmith.export(lora_run, output=tmp_path / "merged", echo=lambda m: None)
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)
    trained = load_trained(lora_run)
    ids = trained.tokenizer("what is the capital of france", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, trained.model(ids).logits, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "merged" in card
    half = tunesmith.export(lora_run, output=tmp_path / "half", dtype="bf16", echo=lambda m: None)
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16


def test_export_refusals_leave_everything_as_it_was(lora_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        tunesmith.export(lora_run, output=taken, echo=lambda m: None)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    with pytest.raises(ConfigError, match="unknown format 'onnx'"):
        tunesmith.export(lora_run, format="onnx", echo=lambda m: None)
    bottleneck = tmp_path / "bottleneck" / "adapter"
    bottleneck.mkdir(parents=True)
    (bottleneck / "tunesmith.json").write_text(json.dumps({"method": "adapter", "artifact": "adapter"}))
    with pytest.raises(ConfigError, match="is a 'adapter' run; its weights are modules"):
        tunesmith.export(bottleneck.parent, output=tmp_path / "x", echo=lambda m: None)
    with pytest.raises(ConfigError, match="not found"):
        tunesmith.export(str(tmp_path / "missing"), output=tmp_path / "y", echo=lambda m: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_refuses_when_the_disk_is_too_small(lora_run, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(ConfigError, match="the merged weights need about .* GiB free"):
        tunesmith.export(lora_run, output=tmp_path / "z", echo=lambda m: None)
    assert not (tmp_path / "z").exists()


def test_cli_export(lora_run, tmp_path):
    from tunesmith.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(lora_run), "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["export", str(lora_run), "--output", str(tmp_path / "cli")])
    assert again.exit_code == 2 and "already exists" in " ".join(again.output.split())
