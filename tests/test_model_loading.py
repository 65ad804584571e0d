"""Loading a base model with any head: tied embeddings survive the GGUF cache and bad checkpoints are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import tunesmith
from tunesmith.config import ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.models import load_model, materialize


def test_a_tied_gguf_loads_its_embeddings_into_every_head_class(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    out = tunesmith.export(tiny_model_dir, format="gguf", types=("f32",), output=tmp_path / "gguf",
                           echo=lambda m: None)
    (gguf,) = out.glob("*.gguf")
    cfg = ModelConfig(name_or_path=str(gguf))

    with safe_open(f"{materialize(cfg)}/model.safetensors", "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())
    causal = load_model(cfg, torch.float32)
    scorer = load_model(cfg, torch.float32, auto_class="AutoModelForSequenceClassification", num_labels=1)
    assert torch.equal(scorer.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    assert torch.equal(causal.lm_head.weight, causal.model.embed_tokens.weight)  # still tied as a causal LM
    # The body computes the same hidden states under either head.
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        assert torch.allclose(scorer.model(ids).last_hidden_state, causal.model(ids).last_hidden_state)


def test_a_checkpoint_without_input_embeddings_is_refused_for_a_head_class(tmp_path):
    from error_cases import lm_head_only_checkpoint

    folder = tmp_path / "lm-head-only"
    model = lm_head_only_checkpoint(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" not in set(f.keys())
    cfg = ModelConfig(name_or_path=str(folder))

    with pytest.raises(ConfigError, match=r"no input embeddings.*model\.embed_tokens\.weight is missing.*lm_head"):
        load_model(cfg, torch.float32, auto_class="AutoModelForSequenceClassification", num_labels=1)
    loaded = load_model(cfg, torch.float32)  # the causal LM ties it back from lm_head
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_untied_state_keeps_every_tensor_once_and_tolerates_models_without_embedding_accessors():
    from torch import nn

    from tunesmith.models import untied_state

    class Custom(nn.Module):  # remote-code models may not implement get_input_embeddings
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

        def get_input_embeddings(self):
            raise NotImplementedError

    state = untied_state(Custom())
    assert list(state) == ["emb.weight"]  # the shared tensor once, first name kept


def test_a_home_relative_model_path_is_expanded(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from tunesmith.models import resolve_source

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    assert resolve_source(ModelConfig(name_or_path="~/tiny")) == (str(tmp_path / "tiny"), None)
    with pytest.raises(ConfigError, match=f"folder not found: {tmp_path}/gone"):
        resolve_source(ModelConfig(name_or_path="~/gone"))
