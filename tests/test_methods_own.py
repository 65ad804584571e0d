"""tunesmith's own methods: BitFit, bottleneck adapters (Houlsby, Pfeiffer) and linear probing.

Each trains a tiny in-process model for a few steps at a high learning rate, checks that only
what the method trains changed, that the artifact holds only those tensors, and that it
reloads onto a fresh base with identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tunesmith
from conftest import build_tokenizer, write_jsonl
from tunesmith.artifacts import load_trained
from tunesmith.config import MethodConfig, load_config
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS, MethodContext
from tunesmith.objectives import OBJECTIVES

SENTENCES = [
    ("the movie was good and great", 1), ("a bad and terrible movie", 0),
    ("you will like this movie it is great", 1), ("the water was bad", 0),
    ("what a great day", 1), ("this is terrible", 0),
    ("good people make good time", 1), ("a terrible way to look", 0),
]


def quiet(_msg: str) -> None:
    pass


def ctx(objective: str, tokenizer=None) -> MethodContext:
    return MethodContext(OBJECTIVES[objective], tokenizer)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n, p in before.items() if n in now and not torch.equal(p, now[n].detach())}


def train_steps(model, loss_fn, steps: int = 8, lr: float = 3e-2) -> list[float]:
    """A few full-batch AdamW steps on the trainable parameters; the loss of each step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


@torch.no_grad()
def outputs(model, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.detach().clone()


# --- tiny models and batches -------------------------------------------------------------------

@pytest.fixture(scope="module")
def biased_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama with attention and MLP biases (Llama has none by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-bias")
    tok = build_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=3,
        eos_token_id=2, bos_token_id=None, attention_bias=True, mlp_bias=True,
    )).save_pretrained(folder)
    return folder


def bert_classifier(folder: Path, num_labels: int = 2, seed: int = 1):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the head (and the pooler the MLM checkpoint lacks) are drawn fresh
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, dtype=torch.float32)


def sentence_batch(folder: Path, rows=SENTENCES) -> tuple[dict, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok([s for s, _ in rows], return_tensors="pt", padding=True)
    return dict(enc), torch.tensor([y for _, y in rows])


def classification_loss(batch, labels):
    return lambda m: F.cross_entropy(m(**batch).logits, labels)


def lm_batch(folder: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok([s for s, _ in SENTENCES[:4]], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def read_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def capture_before_save(monkeypatch, method_cls, batch) -> dict:
    """The trained in-memory model's outputs on `batch`, taken just before the method saves it."""
    captured = {}
    real_save = method_cls.save

    def save(self, model, out):
        was = model.training
        captured["logits"] = outputs(model, batch)
        captured["model"] = model
        model.train(was)
        real_save(self, model, out)

    monkeypatch.setattr(method_cls, "save", save)
    return captured


@pytest.mark.parametrize("method, options", [
    ("lora", {}), ("ia3", {}), ("freeze", {"train_last_n_layers": 1}), ("prompt_tuning", {"num_virtual_tokens": 4}),
    ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 32}), ("prefix_tuning", {"num_virtual_tokens": 4}),
])
def test_the_fresh_pooler_learns_with_the_head_whatever_the_method(tiny_bert_wide_dir, method, options):
    """An MLM checkpoint has no pooler: the classifier reads a freshly drawn one, which must learn (and be
    saved) with the head for every method, and take head_learning_rate with it (found under peft too)."""
    from tunesmith.engine.optim import build_optimizer
    from tunesmith.methods.base import task_heads

    model = METHODS[method].apply(bert_classifier(tiny_bert_wide_dir), MethodConfig(type=method, **options),
                                  ctx("classification"))
    pooler = {n for n, p in model.named_parameters() if "pooler" in n and "original_module" not in n}
    assert pooler and all(p.requires_grad for n, p in model.named_parameters() if n in pooler), method
    heads = {id(p) for name, module in task_heads(model) if name == "pooler" for p in module.parameters()
             if p.requires_grad}
    assert heads, method
    from tunesmith.config import TrainingConfig

    groups = build_optimizer(model, TrainingConfig(learning_rate=1e-4, head_learning_rate=0.5)).param_groups
    assert heads <= {id(p) for g in groups if g["lr"] == 0.5 for p in g["params"]}, method


# --- BitFit -------------------------------------------------------------------------------------

def test_bitfit_bert_classification_trains_only_biases_and_head(tiny_bert_wide_dir, tmp_path):
    method = METHODS["bitfit"]
    batch, labels = sentence_batch(tiny_bert_wide_dir)
    model = method.apply(bert_classifier(tiny_bert_wide_dir), MethodConfig(type="bitfit"), ctx("classification"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if n.startswith(("classifier.", "bert.pooler."))}
    assert heads == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert all(n.endswith(".bias") for n in trainable - heads)
    assert len(trainable - heads) > 10  # attention, feed-forward and LayerNorm biases of both blocks

    before = snapshot(model)
    losses = train_steps(model, classification_loss(batch, labels), steps=10, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0], losses
    assert changed(before, model) == trainable

    out = tmp_path / "adapter"
    method.save(model, out)
    saved = load_file(out / "bitfit.safetensors")
    assert set(saved) == trainable
    reloaded = method.load(bert_classifier(tiny_bert_wide_dir, seed=7), out, MethodConfig(type="bitfit"),
                           ctx("classification"))
    torch.testing.assert_close(outputs(reloaded, batch), outputs(model, batch), atol=1e-5, rtol=0)


def test_bitfit_biased_llama_end_to_end(run_config, biased_llama_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.bitfit import BitFit

    batch = {k: v for k, v in lm_batch(biased_llama_dir).items() if k != "labels"}
    captured = capture_before_save(monkeypatch, BitFit, batch)
    cfg = run_config(model={"name_or_path": str(biased_llama_dir)}, method={"type": "bitfit"},
                     training={"max_steps": 8, "learning_rate": 5e-2, "scheduler": "constant"},
                     eval={"forgetting": False})
    result = tunesmith.train(cfg, echo=quiet)
    losses = read_losses(result.run_dir)
    assert min(losses[-3:]) < losses[0], losses

    saved = load_file(result.artifact_dir / "bitfit.safetensors")
    assert saved and all(n.endswith(".bias") for n in saved)  # a causal LM has no fresh head
    base = AutoModelForCausalLM.from_pretrained(biased_llama_dir, dtype=torch.float32)
    assert sum(t.numel() for t in saved.values()) < 0.05 * sum(p.numel() for p in base.parameters())
    base_params = dict(base.named_parameters())
    assert any(not torch.equal(t, base_params[n]) for n, t in saved.items()), "no bias learned"

    loaded = load_trained(result.run_dir)
    assert loaded.manifest["method"] == "bitfit"
    torch.testing.assert_close(outputs(loaded.model, batch), captured["logits"], atol=1e-5, rtol=0)
    reloaded_params = dict(loaded.model.named_parameters())
    for name, p in base_params.items():
        if name not in saved:
            assert torch.equal(reloaded_params[name], p), f"{name} should be the base's"


def test_bitfit_refuses_a_model_without_biases_before_the_run_folder(run_config, tmp_path):
    cfg = run_config(method={"type": "bitfit"}, eval={"forgetting": False})
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM has no bias terms.*lora"):
        tunesmith.train(cfg, echo=quiet)
    assert not (tmp_path / "run").exists()


# --- bottleneck adapters ------------------------------------------------------------------------

def llama_lm(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def t5_lm(folder):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)


# family -> (loader, objective, adapters per style)
FAMILIES = {
    "llama": (llama_lm, "causal_lm", {"houlsby": 4, "pfeiffer": 2}),
    "bert": (bert_classifier, "classification", {"houlsby": 4, "pfeiffer": 2}),
    "t5": (t5_lm, "seq2seq", {"houlsby": 10, "pfeiffer": 4}),  # decoder blocks add cross-attention
}


def family_setup(family: str, dirs: dict):
    folder = dirs[family]
    if family == "bert":
        batch, labels = sentence_batch(folder)
        return batch, classification_loss(batch, labels)
    full = lm_batch(folder)
    if family == "t5":
        full["decoder_input_ids"] = torch.zeros_like(full["input_ids"][:, :3])
        full["labels"] = full["input_ids"][:, :3].contiguous()
    batch = {k: v for k, v in full.items() if k != "labels"}
    return batch, lambda m: m(**full).loss


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_trains_and_reloads(family, style, tiny_model_dir, tiny_bert_wide_dir, tiny_t5_dir, tmp_path):
    from tunesmith.methods.adapter import Bottleneck

    load, objective, counts = FAMILIES[family]
    dirs = {"llama": tiny_model_dir, "bert": tiny_bert_wide_dir, "t5": tiny_t5_dir}
    batch, loss_fn = family_setup(family, dirs)
    method = METHODS["adapter"]
    cfg = MethodConfig(type="adapter", adapter_style=style, reduction_factor=4, adapter_activation="gelu")
    model = load(dirs[family])
    base_out = outputs(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    model = method.apply(model, cfg, ctx(objective))
    adapters = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(adapters) == counts[style]
    assert all(a.down.out_features == 12 for a in adapters)  # hidden 48 / reduction 4
    assert torch.equal(outputs(model, batch), base_out), "a fresh adapter must leave the base's function as is"
    assert set(base_state) <= set(model.state_dict()), "base state-dict keys must stay untouched"

    losses = train_steps(model, loss_fn, steps=8, lr=1e-2)
    assert losses[-1] < losses[0], losses
    state = model.state_dict()
    fresh_head = ("classifier.", "bert.pooler.")
    for key, value in base_state.items():
        if not key.startswith(fresh_head):
            assert torch.equal(state[key], value), f"base weight {key} changed"

    out = tmp_path / "adapter"
    method.save(model, out)
    saved = load_file(out / "bottleneck_adapter.safetensors")
    assert all(".bottleneck_adapters." in k or k.startswith(fresh_head) for k in saved)
    assert sum(".bottleneck_adapters." in k for k in saved) == 4 * counts[style]  # down/up weight+bias
    spec = json.loads((out / "bottleneck_adapter.json").read_text())
    assert (spec["style"], spec["reduction_factor"], spec["activation"]) == (style, 4, "gelu")
    assert len(spec["placements"]) == counts[style]

    fresh = load(dirs[family]) if family != "bert" else bert_classifier(dirs[family], seed=5)
    reloaded = method.load(fresh, out, cfg, ctx(objective))
    torch.testing.assert_close(outputs(reloaded, batch), outputs(model, batch), atol=1e-5, rtol=0)


def test_adapter_end_to_end_on_llama_sft(run_config, tiny_model_dir, monkeypatch):
    from tunesmith.methods.adapter import BottleneckAdapter

    batch = {k: v for k, v in lm_batch(tiny_model_dir).items() if k != "labels"}
    captured = capture_before_save(monkeypatch, BottleneckAdapter, batch)
    cfg = run_config(method={"type": "adapter", "adapter_style": "pfeiffer", "reduction_factor": 4},
                     training={"max_steps": 8, "learning_rate": 3e-2, "scheduler": "constant"},
                     eval={"forgetting": False})
    result = tunesmith.train(cfg, echo=quiet)
    losses = read_losses(result.run_dir)
    assert min(losses[-3:]) < losses[0], losses
    assert result.trainable_params == 2 * (48 * 12 + 12 + 12 * 48 + 48)
    assert {p.name for p in result.artifact_dir.iterdir()} >= {"bottleneck_adapter.safetensors",
                                                               "bottleneck_adapter.json", "tunesmith.json"}
    loaded = load_trained(result.run_dir)
    torch.testing.assert_close(outputs(loaded.model, batch), captured["logits"], atol=1e-5, rtol=0)


def test_adapter_errors_when_no_projection_matches():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="no attention or feed-forward output projection"):
        METHODS["adapter"].apply(model, MethodConfig(type="adapter"), ctx("classification"))


# --- linear probe -------------------------------------------------------------------------------

def count_backbone_rows(probed) -> list[int]:
    rows = []
    probed.backbone.register_forward_hook(lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                          with_kwargs=True)
    return rows


def test_linear_probe_computes_features_once_and_saves_only_the_head(tiny_bert_dir, tmp_path):
    method = METHODS["linear_probe"]
    cfg = MethodConfig(type="linear_probe", probe_head="linear")
    batch, labels = sentence_batch(tiny_bert_dir)
    probed = method.apply(bert_classifier(tiny_bert_dir), cfg, ctx("classification"))
    assert probed.pooling == "mean"  # an encoder: mean over real tokens
    assert [n for n, p in probed.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    rows = count_backbone_rows(probed)
    backbone_before = snapshot(probed.backbone)

    halves = [({k: v[:4] for k, v in batch.items()}, labels[:4]), ({k: v[4:] for k, v in batch.items()}, labels[4:])]
    opt = torch.optim.AdamW([p for p in probed.parameters() if p.requires_grad], lr=5e-2)
    epoch_losses = []
    for _ in range(3):  # three epochs of two batches
        probed.train()
        assert not probed.backbone.training, "the backbone must stay in eval mode"
        total = 0.0
        for part, y in halves:
            loss = F.cross_entropy(probed(**part).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += float(loss)
        epoch_losses.append(total)
    assert sum(rows) == len(SENTENCES), f"backbone ran on {sum(rows)} rows for {len(SENTENCES)} distinct examples"
    assert (probed.features_computed, probed.features_reused) == (8, 16)
    assert epoch_losses[-1] < epoch_losses[0], epoch_losses
    assert not changed(backbone_before, probed.backbone)

    trained = outputs(probed, batch)
    assert sum(rows) == len(SENTENCES), "evaluation must reuse the cached features"
    out = tmp_path / "adapter"
    method.save(probed, out)
    assert set(load_file(out / "probe_head.safetensors")) == {"weight", "bias"}
    assert json.loads((out / "probe_head.json").read_text())["head"] == "linear"
    reloaded = method.load(bert_classifier(tiny_bert_dir, seed=9), out, cfg, ctx("classification"))
    torch.testing.assert_close(outputs(reloaded, batch), trained, atol=1e-5, rtol=0)


def test_linear_probe_features_do_not_depend_on_padding(tiny_bert_dir):
    batch, _ = sentence_batch(tiny_bert_dir)
    probed = METHODS["linear_probe"].apply(bert_classifier(tiny_bert_dir), MethodConfig(type="linear_probe"),
                                           ctx("classification"))
    together = outputs(probed, batch)
    probed.cache.clear()
    alone = torch.cat([outputs(probed, {k: v[i:i + 1, : int(batch["attention_mask"][i].sum())]
                                        for k, v in batch.items()}) for i in range(len(SENTENCES))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_linear_probe_mlp_head_on_a_decoder_pools_the_last_token(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    method = METHODS["linear_probe"]
    cfg = MethodConfig(type="linear_probe", probe_head="mlp", probe_hidden=16)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, dtype=torch.float32)
    batch, labels = sentence_batch(tiny_model_dir)
    probed = method.apply(model, cfg, ctx("classification"))
    assert probed.pooling == "last"
    assert [tuple(p.shape) for p in probed.head.parameters()] == [(16, 48), (16,), (2, 16), (2,)]
    first = probed.features(batch["input_ids"][:1], batch["attention_mask"][:1], None)[0]
    n = int(batch["attention_mask"][0].sum())
    hidden = probed.backbone(input_ids=batch["input_ids"][:1, :n]).last_hidden_state[0, -1]
    torch.testing.assert_close(first, hidden, atol=1e-5, rtol=0)

    losses = train_steps(probed, classification_loss(batch, labels), steps=10, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    method.save(probed, tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / "probe_head.safetensors")) == {"0.weight", "0.bias", "2.weight",
                                                                                "2.bias"}
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, dtype=torch.float32)
    reloaded = method.load(fresh, tmp_path / "adapter", cfg, ctx("classification"))
    torch.testing.assert_close(outputs(reloaded, batch), outputs(probed, batch), atol=1e-5, rtol=0)


def test_linear_probe_token_classification_gives_per_token_logits(tiny_bert_dir):
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(tiny_bert_dir, num_labels=3, dtype=torch.float32)
    probed = METHODS["linear_probe"].apply(model, MethodConfig(type="linear_probe"), ctx("token_classification"))
    batch, _ = sentence_batch(tiny_bert_dir)
    mask = batch["attention_mask"].bool()
    tags = torch.randint(0, 3, batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    tags = tags.masked_fill(~mask, -100)
    logits = probed(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, 3)
    losses = train_steps(probed, lambda m: F.cross_entropy(m(**batch).logits.flatten(0, 1), tags.flatten(),
                                                           ignore_index=-100), steps=10, lr=5e-2)
    assert losses[-1] < losses[0], losses
    assert probed.features_computed == len(SENTENCES)


@pytest.mark.parametrize("objective", ["sft", "causal_lm", "masked_lm", "seq2seq"])
def test_linear_probe_refuses_generative_objectives_at_validation(objective):
    cfg = {"model": {"name_or_path": "any/model"}, "data": {"train": "any.jsonl"},
           "method": {"type": "linear_probe"}, "objective": {"type": objective}}
    with pytest.raises(ConfigError, match="a linear probe trains a new head on frozen features"):
        load_config(cfg)


def test_linear_probe_refuses_gradient_checkpointing():
    cfg = {"model": {"name_or_path": "any/model"}, "data": {"train": "any.jsonl"},
           "method": {"type": "linear_probe"}, "objective": {"type": "classification"},
           "training": {"gradient_checkpointing": True}}
    with pytest.raises(ConfigError, match="nothing to checkpoint"):
        load_config(cfg)


# --- end to end on the classification objective -----------------------------------------------

@pytest.mark.parametrize("method,options", [
    ("bitfit", {}), ("adapter", {"adapter_style": "houlsby", "reduction_factor": 4}),
    ("linear_probe", {"probe_head": "linear"}),
])
def test_classification_end_to_end(method, options, tiny_bert_wide_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": s, "label": "pos" if y else "neg"} for s, y in SENTENCES])
    batch, _ = sentence_batch(tiny_bert_wide_dir)
    captured = capture_before_save(monkeypatch, type(METHODS[method]), batch)
    cfg = {
        "model": {"name_or_path": str(tiny_bert_wide_dir)},
        "data": {"train": str(data), "max_length": 32, "shuffle": False},
        "method": {"type": method, **options},
        "objective": {"type": "classification"},
        "training": {"epochs": 8, "batch_size": 8, "learning_rate": 1e-2, "scheduler": "constant",
                     "progress": False, "log_every": 1, "precision": "fp32", "max_grad_norm": None},
        "eval": {"forgetting": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = tunesmith.train(cfg, echo=quiet)
    losses = read_losses(result.run_dir)
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses
    if method == "linear_probe":  # eight epochs, one backbone pass per distinct example
        assert captured["model"].features_computed == len(SENTENCES)
    loaded = load_trained(result.run_dir)
    assert loaded.manifest["labels"] == ["neg", "pos"]
    torch.testing.assert_close(outputs(loaded.model, batch), captured["logits"], atol=1e-5, rtol=0)
