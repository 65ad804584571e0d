"""`tunesmith export --format merged`: a trained run as a plain transformers model."""

from __future__ import annotations

import json
from pathlib import Path

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
    # --overwrite onto the run itself, a folder above it, or the run's base model: refused, all intact
    base = Path(json.loads((lora_run / "adapter" / "tunesmith.json").read_text())["base_model"])
    kept = {p: sorted(q.name for q in p.iterdir()) for p in (lora_run, base)}
    for target in (lora_run, lora_run.parent, base):
        for fmt in ("merged", "gguf"):
            with pytest.raises(ConfigError, match="holds the input"):
                tunesmith.export(lora_run, output=target, format=fmt, overwrite=True, echo=lambda m: None)
    assert {p: sorted(q.name for q in p.iterdir()) for p in kept} == kept


def test_export_refuses_when_the_disk_is_too_small(lora_run, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(ConfigError, match="the merged weights need about .* GiB free"):
        tunesmith.export(lora_run, output=tmp_path / "z", echo=lambda m: None)
    assert not (tmp_path / "z").exists()


def test_export_disk_check_counts_the_saved_dtype_not_the_stored_one(tmp_path, monkeypatch):
    """A bf16 base folds in fp32 and is saved so with --dtype auto: twice its size on disk."""
    from safetensors.torch import save_file

    from tunesmith.exporting import merged

    base = tmp_path / "bf16-base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1000, 1000, dtype=torch.bfloat16)}, str(base / "model.safetensors"))
    monkeypatch.setattr(merged, "free_space", lambda out: (out, 3_000_000))  # 2 MB stored, 4 MB in fp32
    merged._check_disk(base, None, tmp_path / "out", "bf16")
    for dtype in ("auto", "fp32"):
        with pytest.raises(ConfigError, match="need about 0.00 GiB"):
            merged._check_disk(base, None, tmp_path / "out", dtype)


def test_cli_export(lora_run, tmp_path):
    from tunesmith.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(lora_run), "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["export", str(lora_run), "--output", str(tmp_path / "cli")])
    assert again.exit_code == 2 and "already exists" in " ".join(again.output.split())


def _gguf_fields(file):
    import gguf

    reader = gguf.GGUFReader(str(file))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, kinds, reader


def test_gguf_export_of_a_lora_run_loads_back_as_the_same_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.artifacts import load_trained

    out = tunesmith.export(lora_run, format="gguf", types=("f32", "f16"), output=tmp_path / "gguf",
                           echo=lambda m: None)
    name = lora_run.name
    report = json.loads((out / "export.json").read_text())
    assert set(report["files"]) == {f"{name}-f32.gguf", f"{name}-f16.gguf"}
    assert all(e["check"]["passed"] and e["check"]["tokenizer_ids_equal"] for e in report["files"].values())
    assert report["files"][f"{name}-f32.gguf"]["check"]["logits_max_rel_diff"] <= 1e-4
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{name}-f32.gguf")
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()
    assert not (out / ".merged").exists()

    fields, kinds, reader = _gguf_fields(out / f"{name}-f16.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["tokenizer.chat_template"].startswith("{")
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied to token_embd

    # Independently of the exporter's own check: the file computes what the trained run computes.
    trained = load_trained(lora_run)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"{name}-f32.gguf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out, gguf_file=f"{name}-f32.gguf")
    text = "<|im_start|>user\nwhat is the capital of france<|im_end|>\n"
    assert tok(text)["input_ids"] == trained.tokenizer(text)["input_ids"]
    ids = trained.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, trained.model(ids).logits, atol=1e-5)


def _tiny_model(folder, cls="llama", hidden=64, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from conftest import build_tokenizer

    tok = build_tokenizer(folder)
    torch.manual_seed(0)
    Config, Model = (LlamaConfig, LlamaForCausalLM) if cls == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = Model(Config(vocab_size=len(tok) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False, **extra))
    model.save_pretrained(folder)
    return model


def test_gguf_quantized_types_write_blocks_and_stay_close(tmp_path):
    folder = tmp_path / "model"
    _tiny_model(folder)
    out = tunesmith.export(folder, format="gguf", types=("q8_0", "q4_0", "bf16"), output=tmp_path / "q",
                           echo=lambda m: None)
    report = json.loads((out / "export.json").read_text())
    q8 = report["files"]["model-q8_0.gguf"]
    assert q8["tensors"]["Q8_0"] >= 14 and q8["check"]["passed"] and q8["check"]["logits_max_rel_diff"] > 0
    sizes = {t: report["files"][f"model-{t}.gguf"]["bytes"] for t in ("q8_0", "q4_0", "bf16")}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["bf16"]
    _, kinds, reader = _gguf_fields(out / "model-q4_0.gguf")
    assert kinds["blk.1.ffn_down.weight"] == "Q4_0" and kinds["output.weight"] == "Q8_0"  # as llama.cpp keeps it high
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(reader.fields["tokenizer.ggml.token_type"].data)


def test_gguf_qwen2_with_biases_round_trips(tmp_path):
    folder = tmp_path / "qwen"
    _tiny_model(folder, "qwen2")
    out = tunesmith.export(folder, format="gguf", types=("f32",), output=tmp_path / "g", echo=lambda m: None)
    check = json.loads((out / "export.json").read_text())["files"]["qwen-f32.gguf"]["check"]
    assert check["passed"] and check["logits_max_rel_diff"] <= 1e-4
    _, kinds, _ = _gguf_fields(out / "qwen-f32.gguf")
    assert "blk.0.attn_q.bias" in kinds


def test_gguf_llama_with_attention_biases_round_trips(tmp_path):
    """llama.cpp's converter permutes q/k biases like their weights; a bias left in HF order computes wrong."""
    folder = tmp_path / "biased"
    model = _tiny_model(folder, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:  # fresh biases are zero, which no row order would show
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.bias.normal_(std=0.5)
    model.save_pretrained(folder)
    out = tunesmith.export(folder, format="gguf", types=("f32",), output=tmp_path / "g", echo=lambda m: None)
    check = json.loads((out / "export.json").read_text())["files"]["biased-f32.gguf"]["check"]
    assert check["passed"] and check["logits_max_rel_diff"] <= 1e-4


def test_gguf_check_catches_a_wrong_file(tmp_path, monkeypatch):
    """Without llama.cpp's q/k row order the file loads but computes something else: the check must say so."""
    from tunesmith.exporting import gguf_file
    from tunesmith.exporting.gguf_export import ExportCheckError

    folder = tmp_path / "model"
    _tiny_model(folder)
    monkeypatch.setattr(gguf_file, "_permute", lambda w, heads: w)
    with pytest.raises(ExportCheckError, match="did not reproduce the model"):
        tunesmith.export(folder, format="gguf", types=("f32",), output=tmp_path / "bad", echo=lambda m: None)
    assert not json.loads((tmp_path / "bad" / "export.json").read_text())["files"]["model-f32.gguf"]["check"]["passed"]


def test_gguf_refusals_name_the_reason_and_write_nothing(tmp_path, tiny_bert_dir):
    import shutil as sh

    folder = tmp_path / "model"
    _tiny_model(folder)
    with pytest.raises(ConfigError, match="can be read by the gguf package but not written"):
        tunesmith.export(folder, format="gguf", types=("q4_k",), output=tmp_path / "a", echo=lambda m: None)
    with pytest.raises(ConfigError, match="unknown GGUF type 'q3'"):
        tunesmith.export(folder, format="gguf", types=("q3",), output=tmp_path / "a", echo=lambda m: None)
    with pytest.raises(ConfigError, match="is not mapped to llama.cpp names"):
        tunesmith.export(tiny_bert_dir, format="gguf", output=tmp_path / "a", echo=lambda m: None)
    odd = tmp_path / "odd"
    sh.copytree(folder, odd)
    tok = json.loads((odd / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="has no llama.cpp name this exporter knows"):
        tunesmith.export(odd, format="gguf", output=tmp_path / "a", echo=lambda m: None)
    with pytest.raises(ConfigError, match="--dtype applies to --format merged"):
        tunesmith.export(folder, format="gguf", dtype="bf16", output=tmp_path / "a", echo=lambda m: None)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp*"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "old.gguf").write_text("keep")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        tunesmith.export(folder, format="gguf", output=taken, echo=lambda m: None)
    assert (taken / "old.gguf").read_text() == "keep" and len(list(taken.iterdir())) == 1


def test_bnb_4bit_export_reloads_quantized(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    _tiny_model(folder)  # bitsandbytes' CPU kernel needs output sizes in multiples of 32
    out = tunesmith.export(folder, format="bnb-4bit", output=tmp_path / "nf4", echo=lambda m: None)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    check = json.loads((out / "export.json").read_text())["check"]
    assert 0 < check["logits_max_rel_diff"] < 1 and check["argmax_agreement"] > 0.5


def test_cli_gguf_export_and_refusal(lora_run, tmp_path):
    from tunesmith.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(lora_run), "--format", "gguf", "--type", "f16", "--output",
                                 str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "greedy generations 4/4 identical" in " ".join(result.output.split())
    bad = runner.invoke(app, ["export", str(lora_run), "--format", "gguf", "--type", "q4_k"])
    assert bad.exit_code == 2 and "not written" in " ".join(bad.output.split())


def test_gguf_export_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    folder = tmp_path / "model"
    _tiny_model(folder)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    with pytest.raises(ConfigError, match=r"the export needs about .* \(an fp32 copy while writing, then f16, q8_0\)"):
        tunesmith.export(folder, format="gguf", types=("f16", "q8_0"), output=tmp_path / "z", echo=lambda m: None)
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp_itself(tmp_path):
    """Opt-in (llama-cpp-python is a ~7-13 minute source build): set TUNESMITH_LLAMA_PYTHON to a
    python that has it, e.g. /tmp/llcpp/bin/python (benchmarks/gguf_in_llamacpp.py says how)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    llama_python = os.environ.get("TUNESMITH_LLAMA_PYTHON")
    if not llama_python:
        pytest.skip("TUNESMITH_LLAMA_PYTHON is not set (a python with llama-cpp-python)")
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    _tiny_model(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(folder)
    out = tunesmith.export(folder, format="gguf", types=("f32", "f16"), output=tmp_path / "g", echo=lambda m: None)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gguf_in_llamacpp.py"
    proc = subprocess.run([sys.executable, str(script), str(out), str(folder), "--llama-python", llama_python],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])["files"]
    for name, r in files.items():
        assert r["tokenizer_ids_equal"] and r["chat_template_in_file"], name
        assert r["logits_max_rel_diff"] < 1e-2 and r["argmax_agreement"] == 1.0, (name, r)


def test_ollama_modelfile_renders_chatml_turns_without_a_blank_line(tmp_path):
    from conftest import build_tokenizer

    from tunesmith.data.templates import FALLBACK_CHAT_TEMPLATE
    from tunesmith.exporting.gguf_export import modelfile

    tok = build_tokenizer(tmp_path)
    assert "<|im_start|>" in FALLBACK_CHAT_TEMPLATE
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    tok.save_pretrained(tmp_path)
    text = modelfile("model.gguf", tmp_path)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # What Ollama renders for one user turn: Go-template whitespace trimming by hand ({{- eats what precedes).
    rendered = (template.replace("\n{{- ", "{{- ").replace("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}", "")
                .replace("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}",
                         "<|im_start|>user\nhi<|im_end|>\n"))
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", rendered
    assert 'PARAMETER stop "<|im_end|>"' in text
