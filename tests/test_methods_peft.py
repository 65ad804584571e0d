"""The peft-based methods: LoRA family, QLoRA, prompt family, IA3.

Each trains the tiny Llama on SFT, learns exactly the parameters the method implies, saves
only adapter weights and reloads (tunesmith.artifacts.load_trained) to identical outputs.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import method_keys

import tunesmith
from tunesmith.artifacts import load_trained
from tunesmith.config import MethodConfig, TrainingConfig, load_config
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS, MethodContext
from tunesmith.methods.base import Method
from tunesmith.methods.lora import LoraFA, preset_modules
from tunesmith.objectives import OBJECTIVES

PROMPTS = ["what is the capital of france", "is this movie good and the sky blue"]
# Tiny Llama (conftest): hidden 48, 2 kv heads of 12, intermediate 96, 2 blocks.
LINEAR_SHAPES = {"q_proj": (48, 48), "k_proj": (48, 24), "v_proj": (48, 24), "o_proj": (48, 48),
                 "gate_proj": (48, 96), "up_proj": (48, 96), "down_proj": (96, 48)}  # (in, out)
LAYERS, R = 2, 4


def quiet(_msg: str) -> None:
    pass


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    # Prompt and P-tuning prepend virtual-token positions; compare the real tokens only.
    out = out[:, -batch["input_ids"].shape[1]:]
    return out[batch["attention_mask"].bool()].detach().clone()


def losses_of(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train_and_reload(run_config, monkeypatch, tokenizer, method: dict, **training):
    """Train a few steps; returns (result, in-memory logits before saving, reloaded logits, saved tensors)."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    captured = {}
    real_save = Method.save

    def save(self, model, out):
        captured["logits"] = logits_of(model, batch)
        real_save(self, model, out)

    monkeypatch.setattr(Method, "save", save)
    cfg = run_config(method=method_keys({"r": R, **method}),
                     training={"max_steps": 6, "learning_rate": 5e-2, **training}, eval={"forgetting": False})
    result = tunesmith.train(cfg, echo=quiet)
    loaded = load_trained(result.run_dir)
    return result, captured["logits"], logits_of(loaded.model, batch), load_file(
        result.artifact_dir / "adapter_model.safetensors")


def lora_size(shapes=LINEAR_SHAPES, layers=LAYERS, r=R) -> int:
    return layers * r * sum(i + o for i, o in shapes.values())


# method -> (extra method config, trainable parameter count it implies, name every saved tensor carries)
CASES = {
    "lora": ({}, lora_size(), "lora_"),
    "dora": ({}, lora_size() + LAYERS * sum(o for _, o in LINEAR_SHAPES.values()), "lora_"),
    "rslora": ({}, lora_size(), "lora_"),
    "loraplus": ({"type": "lora", "loraplus_lr_ratio": 8}, lora_size(), "lora_"),
    "lora_fa": ({}, LAYERS * R * sum(o for _, o in LINEAR_SHAPES.values()), "lora_"),
    # peft's IA3 default for Llama: k_proj, v_proj (output scaling), down_proj (input scaling).
    "ia3": ({}, LAYERS * (24 + 24 + 96), "ia3_l"),
    "prefix_tuning": ({"num_virtual_tokens": 5}, LAYERS * 2 * 5 * 24, "prompt_embeddings"),
    "prompt_tuning": ({"num_virtual_tokens": 5, "prompt_init": "text", "prompt_init_text": "answer the question"},
                      5 * 48, "prompt_embeddings"),
    "p_tuning": ({"num_virtual_tokens": 5, "encoder_hidden_size": 16},
                 5 * 48 + (48 * 16 + 16) + (16 * 16 + 16) + (16 * 48 + 48), "prompt_"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_saves_only_adapter_and_reloads(case, run_config, monkeypatch, tiny_tokenizer, tiny_model_dir):
    extra, expected_trainable, saved_marker = CASES[case]
    method = {"type": case, **extra}
    result, trained, reloaded, saved = train_and_reload(run_config, monkeypatch, tiny_tokenizer, method)

    assert result.trainable_params == expected_trainable
    losses = losses_of(result.run_dir)
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)

    # Only the method's weights are saved: every tensor is an adapter tensor, far smaller than the base.
    assert saved and all(saved_marker in k for k in saved), sorted(saved)[:5]
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert (result.artifact_dir / "adapter_model.safetensors").stat().st_size < base_bytes / 4
    assert not list(result.artifact_dir.glob("model*.safetensors"))
    manifest = json.loads((result.artifact_dir / "tunesmith.json").read_text())
    assert manifest["method"] == METHODS[method["type"]].name


def test_lora_fa_leaves_a_at_init_and_trains_b(run_config, monkeypatch, tiny_tokenizer):
    initial = {}
    real_build = LoraFA.build_optimizer

    def build(self, model, cfg, method_cfg):
        initial.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        return real_build(self, model, cfg, method_cfg)

    monkeypatch.setattr(LoraFA, "build_optimizer", build)
    result, _, _, saved = train_and_reload(run_config, monkeypatch, tiny_tokenizer, {"type": "lora_fa"})
    a_names = [n for n in initial if "lora_A" in n]
    b_names = [n for n in initial if "lora_B" in n]
    assert len(a_names) == len(b_names) == LAYERS * len(LINEAR_SHAPES)
    for name in a_names:
        assert torch.equal(saved[name.replace(".default", "")], initial[name]), name
    for name in b_names:
        assert not torch.equal(saved[name.replace(".default", "")], initial[name]), name


def applied(tiny_model_dir, method: dict, objective: str = "sft", tokenizer=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = MethodConfig(**method_keys({"r": R, "dropout": 0.0, **method}))
    return METHODS[cfg.type].apply(model, cfg, MethodContext(OBJECTIVES[objective], tokenizer, str(tiny_model_dir)))


def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(tiny_model_dir):
    model = applied(tiny_model_dir, {"type": "lora", "loraplus_lr_ratio": 16})
    optimizer = METHODS["lora"].build_optimizer(model, TrainingConfig(learning_rate=1e-3),
                                                MethodConfig(type="lora", loraplus_lr_ratio=16))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
    a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
    assert len(a) == len(b) == LAYERS * len(LINEAR_SHAPES)
    assert a == [1e-3] * len(a) and b == pytest.approx([16e-3] * len(b))
    # Plain LoRA keeps the engine's AdamW.
    assert METHODS["lora"].build_optimizer(applied(tiny_model_dir, {"type": "lora"}), TrainingConfig(),
                                           MethodConfig(type="lora")) is None


def test_rslora_scales_by_square_root_of_rank(tiny_model_dir):
    scale = lambda m: {mod.scaling["default"] for mod in m.modules() if isinstance(getattr(mod, "scaling", None), dict)}  # noqa: E731
    assert scale(applied(tiny_model_dir, {"type": "lora", "alpha": 8})) == {8 / R}
    assert scale(applied(tiny_model_dir, {"type": "rslora", "alpha": 8})) == {8 / R ** 0.5}


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_layers_to_transform_touches_only_those_blocks(tiny_model_dir, method):
    for targets in ("all-linear", "mlp", ["q_proj", "v_proj"]):
        model = applied(tiny_model_dir, {"type": method, "layers_to_transform": [1], "target_modules": targets})
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(".layers.1." in n for n in trained), (targets, trained)
    with pytest.raises(ConfigError, match="out of range"):
        applied(tiny_model_dir, {"type": method, "layers_to_transform": [2]})


def tail(names: list[str]) -> set[str]:
    """Block-relative names: 'model.layers.0.self_attn.q_proj' -> 'self_attn.q_proj'."""
    out = set()
    for n in names:
        parts = n.split(".")
        i = next(i for i, p in enumerate(parts) if p.isdigit())
        out.add(".".join(parts[i + 1:]))
    return out


def test_presets_pick_the_expected_modules(tiny_model_dir, tiny_bert_dir, tiny_t5_dir):
    from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM,
                              GPT2Config, GPT2LMHeadModel)

    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tail(preset_modules(llama, "attention")) == {f"self_attn.{x}_proj" for x in "qkvo"}
    assert tail(preset_modules(llama, "mlp")) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}

    bert = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir)
    assert tail(preset_modules(bert, "attention")) == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
    assert tail(preset_modules(bert, "mlp")) == {"intermediate.dense", "output.dense"}
    # The MLM head's transform is not a block layer.
    assert not [n for n in preset_modules(bert, "all-linear") if n.startswith("cls.")]

    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    attention = tail(preset_modules(t5, "attention"))
    assert {a.rsplit(".", 1)[1] for a in attention} == set("qkvo")
    assert any("EncDecAttention" in a for a in attention)
    assert {m.rsplit(".", 1)[1] for m in tail(preset_modules(t5, "mlp"))} == {"wi", "wo"}
    assert "lm_head" not in preset_modules(t5, "all-linear")

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    assert tail(preset_modules(gpt2, "attention")) == {"attn.c_attn", "attn.c_proj"}
    assert tail(preset_modules(gpt2, "mlp")) == {"mlp.c_fc", "mlp.c_proj"}


def test_preset_adapters_apply_on_encoder_and_seq2seq_models(tiny_bert_dir, tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    cfg = MethodConfig(type="lora", r=2, target_modules="attention")
    model = METHODS["lora"].apply(bert, cfg, MethodContext(OBJECTIVES["classification"]))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("attention.output.dense.lora_A" in n for n in trained)
    assert not any("intermediate" in n or ".output.dense.lora" in n.replace("attention.output", "") for n in trained)
    assert any("classifier" in n and "modules_to_save" in n for n in trained)  # the new head learns

    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    cfg = MethodConfig(type="ia3", target_modules="mlp")
    model = METHODS["ia3"].apply(t5, cfg, MethodContext(OBJECTIVES["seq2seq"]))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("DenseReluDense" in n for n in trained)


@pytest.mark.parametrize("method,overrides,reason", [
    ("prefix_tuning", {"training": {"gradient_checkpointing": True}}, "gradient_checkpointing cannot be used"),
    ("prompt_tuning", {"data": {"packing": True}}, "virtual tokens are prepended once per row"),
    ("p_tuning", {"data": {"packing": True}}, "virtual tokens are prepended once per row"),
    ("prefix_tuning", {"objective": {"type": "masked_lm"}}, "peft has no masked-LM task type"),
    ("prompt_tuning", {"method": {"prompt_init": "text"}}, "needs method.prompt_init_text"),
    ("lora_fa", {"method": {"loraplus_lr_ratio": 4}}, "lora_fa brings its own optimizer"),
    ("ia3", {"method": {"loraplus_lr_ratio": 4}}, "LoRA family"),
    ("qlora", {"method": {"bits": 8, "quant_type": "fp4"}}, "4-bit QLoRA only"),
])
def test_refused_at_config_validation(run_config, method, overrides, reason):
    sections = {k: v for k, v in overrides.items() if k != "method"}
    cfg = run_config(method={"type": method, **overrides.get("method", {})}, **sections)
    with pytest.raises(ConfigError, match=reason):
        load_config(cfg)


def test_prompt_methods_do_not_pack_by_default(run_config):
    assert not load_config(run_config(method={"type": "prompt_tuning"})).packing_enabled
    assert load_config(run_config(method={"type": "lora"})).packing_enabled


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install 'tunesmith[qlora]')")


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_a_quantized_base_and_reloads(bits, run_config, monkeypatch, tiny_tokenizer):
    import bitsandbytes as bnb

    seen = {}
    real_apply = METHODS["qlora"].apply

    def apply(model, cfg, ctx):
        seen["quantized"] = [type(m).__name__ for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit,
                                                                                          bnb.nn.Linear8bitLt))]
        return real_apply(model, cfg, ctx)

    monkeypatch.setattr(METHODS["qlora"], "apply", apply)
    result, trained, reloaded, saved = train_and_reload(
        run_config, monkeypatch, tiny_tokenizer, {"type": "qlora", "bits": bits, "compute_dtype": "fp32"})
    assert len(seen["quantized"]) == LAYERS * len(LINEAR_SHAPES)
    assert set(seen["quantized"]) == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert result.trainable_params == lora_size()
    losses = losses_of(result.run_dir)
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)
    assert saved and all("lora_" in k for k in saved)
    quant = json.loads((result.artifact_dir / "tunesmith.json").read_text())["method_config"]
    assert quant["bits"] == bits


def test_qlora_names_the_extra_when_bitsandbytes_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec then reports it absent
    with pytest.raises(ConfigError, match=r"tunesmith\[qlora\]"):
        METHODS["qlora"].load_kwargs(MethodConfig(type="qlora"), "fp32")


@needs_bnb
def test_qlora_gradients_are_the_same_after_an_evaluation(tmp_path, tiny_tokenizer):
    """On AVX512-BF16 CPUs bitsandbytes moves a 4-bit layer to an inference kernel without a
    backward at its first eval-mode forward, and keeps it for training; tunesmith keeps the
    differentiable path, so a step after an evaluation computes the gradients it did before.
    (Layer widths here are multiples of 32, which that kernel needs, so the check bites there.)"""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tiny_tokenizer.pad_token_id,
    )).save_pretrained(tmp_path)
    qlora = METHODS["qlora"]
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, **qlora.load_kwargs(MethodConfig(type="qlora", compute_dtype="fp32"), "fp32"))
    model = qlora.apply(base, MethodConfig(type="qlora", r=R, dropout=0.0),
                        MethodContext(OBJECTIVES["sft"], tiny_tokenizer, str(tmp_path)))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    logits_of(model, batch)  # an evaluation: eval mode, no grad
    after = gradients()
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=1e-5, msg=name)


def test_prefix_tuning_refuses_a_model_without_past_key_values():
    """DistilBERT's forward (and its backbone's) takes no past_key_values, the only way peft
    injects prefixes: refused when the method applies, before any training step."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=50, dim=32, hidden_dim=64, n_layers=1, n_heads=2, num_labels=2))
    with pytest.raises(ConfigError, match=r"prefix_tuning cannot train DistilBertForSequenceClassification.*"
                                          r"past_key_values.*use prompt_tuning"):
        METHODS["prefix_tuning"].apply(model, MethodConfig(type="prefix_tuning"),
                                       MethodContext(OBJECTIVES["classification"]))
