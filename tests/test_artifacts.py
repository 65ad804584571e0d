"""What a run leaves behind: artifacts that plain transformers / peft load, and the model card."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith
from tunesmith.methods.full import Full
from tunesmith.methods.lora import Lora

PROMPTS = ["what is the capital of france", "is this movie good and the sky blue"]


def quiet(_msg: str) -> None:
    pass


def encode(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    mask = batch["attention_mask"].bool()
    return out[mask].detach().clone()  # real tokens only


def capture_in_memory_logits(monkeypatch, method_cls, batch) -> dict:
    """Wrap the method's save so the test sees the trained in-memory model just before saving."""
    captured = {}
    real_save = method_cls.save

    def save(self, model, out):
        captured["logits"] = logits_of(model, batch)
        real_save(self, model, out)

    monkeypatch.setattr(method_cls, "save", save)
    return captured


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_lora_adapter_loads_with_plain_peft(run_config, monkeypatch, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoTokenizer

    batch = encode(tiny_tokenizer)
    captured = capture_in_memory_logits(monkeypatch, Lora, batch)
    cfg = run_config(training={"max_steps": 4, "save_every": 4, "learning_rate": 5e-2},
                     output={"license": "apache-2.0"})
    result = tunesmith.train(cfg, echo=quiet)
    adapter = result.artifact_dir
    assert adapter == result.run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in adapter.iterdir()}

    loaded = PeftModel.from_pretrained(base_model(tiny_model_dir), adapter)
    reloaded = logits_of(loaded, batch)
    torch.testing.assert_close(reloaded, captured["logits"], atol=1e-5, rtol=0)
    base = logits_of(base_model(tiny_model_dir), batch)
    assert (reloaded - base).abs().max() > 1e-3, "the adapter changed nothing"

    # The adapter holds exactly the last checkpoint's trainable weights (same step).
    saved = load_file(adapter / "adapter_model.safetensors")
    ckpt = load_file(result.run_dir / "checkpoints" / "step-0000004" / "trainable.safetensors")
    assert {k.replace(".default.", ".") for k in ckpt} == set(saved)
    for name, weight in ckpt.items():
        assert torch.equal(saved[name.replace(".default.", ".")], weight), name

    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["base_model_name_or_path"] == str(tiny_model_dir)
    # The tokenizer ships with the chat template training used, so inference formats alike.
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.chat_template and tok(PROMPTS)["input_ids"] == tiny_tokenizer(PROMPTS)["input_ids"]

    card = (result.run_dir / "README.md").read_text()
    assert (adapter / "README.md").read_text() == card
    meta, body = front_matter(card)
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["tunesmith", "lora", "sft"]
    assert "datasets" not in meta  # a local file is not a hub dataset
    assert f"| loss | {result.metrics['loss']:.4f} |" in body
    assert "| optimizer_steps | 4 |" in body and "| lora_r | 4 |" in body
    assert f"{result.trainable_params:,} of {result.total_params:,}" in body
    assert "AutoPeftModelForCausalLM" in body


def test_card_usage_names_a_class_peft_has_and_the_batch_counts_processes(run_config):
    """peft has no AutoPeftModelForMaskedLM: a masked-LM adapter's card loads with AutoPeftModel; the
    effective batch of a run on several processes is batch x accumulation x processes."""
    import peft

    from tunesmith.card import render_card
    from tunesmith.config import load_config

    cfg = load_config(run_config(training={"batch_size": 4, "grad_accum": 2}))
    kw = dict(artifact="adapter", metrics={}, trainable=1, total=2, data_stats={}, steps=1, library="peft")
    masked = load_config(run_config(objective={"type": "masked_lm"}))
    body = render_card(masked, **kw)
    used = next(line.split()[-1] for line in body.splitlines() if line.startswith("from peft import"))
    assert hasattr(peft, used), used
    assert "| effective_batch_size | 8 |" in render_card(cfg, **kw)
    four = render_card(cfg, **kw, processes=4)
    assert "| effective_batch_size | 32 |" in four and "| processes | 4 |" in four


def test_a_pinned_base_revision_is_what_the_run_reloads_on(run_config, tmp_path):
    """A run trained on model.revision X must reload (eval, export, serve) on X, not on the hub's latest."""
    from tunesmith.artifacts import _base_config, read_manifest, write_manifest
    from tunesmith.config import load_config

    cfg = load_config(run_config())
    pinned = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": "org/base",
                                                                          "revision": "abc123"})})
    write_manifest(tmp_path, pinned, base_source="org/base", labels=[])
    base = _base_config(read_manifest(tmp_path))
    assert (base.name_or_path, base.revision, base.trust_remote_code) == ("org/base", "abc123", False)


def test_full_model_loads_with_plain_transformers(run_config, monkeypatch, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = encode(tiny_tokenizer)
    captured = capture_in_memory_logits(monkeypatch, Full, batch)
    cfg = run_config(
        method={"type": "full"},
        data={"split": {"validation_ratio": 0.25}},
        training={"max_steps": 3, "save_every": 3},
        output={"card_base_model": "someone/tiny-llama"},
    )
    result = tunesmith.train(cfg, echo=quiet)
    folder = result.artifact_dir
    assert folder == result.run_dir / "model"

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    reloaded = logits_of(model, batch)
    torch.testing.assert_close(reloaded, captured["logits"], atol=1e-5, rtol=0)
    assert (reloaded - logits_of(base_model(tiny_model_dir), batch)).abs().max() > 1e-3
    # Tied embeddings stay tied, and the weights are the final checkpoint's.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ckpt = load_file(result.run_dir / "checkpoints" / "step-0000003" / "trainable.safetensors")
    state = model.state_dict()
    assert set(ckpt) == set(state) - {"lm_head.weight"}
    for name, weight in ckpt.items():
        assert torch.equal(state[name], weight), name
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok(PROMPTS)["input_ids"] == tiny_tokenizer(PROMPTS)["input_ids"]

    meta, body = front_matter((folder / "README.md").read_text())
    assert meta["base_model"] == "someone/tiny-llama"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "other"
    assert meta["tags"] == ["tunesmith", "full", "sft"]
    # The final metrics include the end-of-run evaluation.
    assert f"| eval_loss | {result.metrics['eval_loss']:.4f} |" in body
    assert f"| loss | {result.metrics['loss']:.4f} |" in body
    assert "AutoModelForCausalLM.from_pretrained" in body


def test_save_model_and_card_can_be_switched_off(run_config):
    cfg = run_config(training={"max_steps": 1}, output={"save_model": False, "model_card": False})
    result = tunesmith.train(cfg, echo=quiet)
    assert result.artifact_dir is None
    names = {p.name for p in result.run_dir.iterdir()}
    assert names == {"config.yaml", "metrics.jsonl"}


@pytest.mark.parametrize("method", [{"type": "lora"}, {"type": "full"}])
def test_returned_metrics_match_the_log(run_config, method):
    from tunesmith.engine.tracking import read_metrics

    cfg = run_config(method=method, training={"max_steps": 2})
    result = tunesmith.train(cfg, echo=quiet)
    last = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == result.steps == 2
    assert result.metrics["loss"] == last["loss"] and result.metrics["lr"] == last["lr"]
