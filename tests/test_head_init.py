"""LP-FT: a fine-tuning run's task head starts from a linear-probe run's head (model.head_from)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import write_jsonl
from test_reward import ROWS, head_model, plain_rewards, quiet, records, reward_config


@pytest.fixture(scope="module")
def probe_run(tiny_model_dir, tmp_path_factory):
    """A linear-probe reward model trained on the pairs: (run dir, pairs file)."""
    import tunesmith

    folder = tmp_path_factory.mktemp("probe")
    data = write_jsonl(folder / "pairs.jsonl", ROWS)
    cfg = reward_config(tiny_model_dir, data, folder / "probe")
    cfg["method"] = {"type": "linear_probe"}
    cfg["training"].update(max_steps=40, learning_rate=5e-2)
    return tunesmith.train(cfg, echo=quiet).run_dir, data


def test_lora_from_a_probe_starts_with_the_probes_rewards(probe_run, tiny_model_dir, tmp_path):
    """Step 1 of the LoRA run (adapter still the identity) scores pairs with the probe's head: its loss is
    hand-computed from a plain transformers model whose score head holds the probe's weight."""
    import tunesmith
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.artifacts import load_trained

    probe_dir, data = probe_run
    cfg = reward_config(tiny_model_dir, data, tmp_path / "ft")
    cfg["model"]["head_from"] = str(probe_dir)
    lines: list[str] = []
    step1 = records(tunesmith.train(cfg, echo=lines.append).run_dir)[0]

    head = load_file(probe_dir / "adapter" / "probe_head.safetensors")
    seeded = head_model(tiny_model_dir, tmp_path / "seeded", lambda w: w.copy_(head["weight"]))
    tokenizer = AutoTokenizer.from_pretrained(seeded)
    rc, rr = plain_rewards(AutoModelForSequenceClassification.from_pretrained(seeded).eval(), tokenizer, ROWS[:4])
    loss = F.softplus(-(rc - rr)).mean()
    assert step1["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert step1["accuracy"] == pytest.approx(float((rc > rr).float().mean()))
    assert float(loss) < math.log(2) - 0.1, "the probe learned: a better start than a zero head"
    # The probe read the same features: its own rewards are these plus its bias, which the score head lacks.
    probe = load_trained(probe_dir).model
    pc, pr = plain_rewards(probe, tokenizer, ROWS[:4])
    torch.testing.assert_close(pc - rc, head["bias"].expand(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(pr - rr, head["bias"].expand(4), atol=1e-5, rtol=0)
    assert any("starts from the linear probe" in line and "bias" in line for line in lines), lines


def test_head_from_a_run_that_is_not_a_probe_is_refused_before_a_run_folder(probe_run, tiny_model_dir, tmp_path):
    import tunesmith
    from tunesmith.errors import ConfigError

    _, data = probe_run
    lora = tunesmith.train(reward_config(tiny_model_dir, data, tmp_path / "lora"), echo=quiet).run_dir
    cfg = reward_config(tiny_model_dir, data, tmp_path / "ft")
    cfg["model"]["head_from"] = str(lora)
    with pytest.raises(ConfigError, match=r"model.head_from: .* method.type 'lora'.*linear_probe run"):
        tunesmith.train(cfg, echo=quiet)
    other = head_model(tiny_model_dir, tmp_path / "other-base", torch.nn.init.zeros_)
    with pytest.raises(ConfigError, match=r"model.head_from: .* read features of .*, this run trains .*other-base"):
        tunesmith.train({**cfg, "model": {"name_or_path": str(other), "head_from": str(probe_run[0])}}, echo=quiet)
    cfg["model"]["head_from"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"model.head_from: .*missing is not a folder"):
        tunesmith.train(cfg, echo=quiet)
    assert not (tmp_path / "ft").exists()


def test_head_from_needs_an_objective_with_a_head_and_a_method_that_is_not_the_probe(tiny_model_dir, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    base = reward_config(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out")
    base["model"]["head_from"] = str(tmp_path)
    with pytest.raises(ConfigError, match="model.head_from: objective.type 'sft' adds no task head"):
        load_config({**base, "objective": {"type": "sft"}})
    with pytest.raises(ConfigError, match="this run is the probe itself"):
        load_config({**base, "method": {"type": "linear_probe"}})
    tasks = [{"name": n, "data": {"train": f"{n}.jsonl"}, "objective": {"type": "sft"}} for n in ("a", "b")]
    with pytest.raises(ConfigError) as refused:
        load_config({**base, "data": None, "objective": None, "tasks": tasks})
    # One reason, not one more per task checked alone.
    assert str(refused.value).count("head_from") == 1, str(refused.value)
    assert "model.head_from is for single-task runs" in str(refused.value)


def test_token_classification_head_takes_the_probes_weight_and_bias_and_an_encoders_sequence_head_is_refused(
        tiny_bert_dir, tmp_path):
    """Per-token probe features are what a token classifier reads, on encoders too (its bias is copied); a
    BERT sequence classifier reads its pooler instead, so a pooled probe cannot seed it."""
    import tunesmith
    from tunesmith.artifacts import load_trained
    from tunesmith.errors import ConfigError

    from conftest import SENTENCES
    from test_matrix import NER

    def run(objective, rows, out, method, **training):
        data = write_jsonl(tmp_path / f"{objective}.jsonl", rows)
        return {"model": {"name_or_path": str(tiny_bert_dir)}, "data": {"train": str(data), "max_length": 32},
                "method": {"type": method}, "objective": {"type": objective},
                "training": {"batch_size": 4, "learning_rate": 5e-2, "max_steps": 5, "progress": False,
                             "precision": "fp32", **training},
                "eval": {"forgetting": False}, "output": {"dir": str(tmp_path / out)}}

    ner = [{"tokens": t, "tags": y} for t, y in NER]
    probe = tunesmith.train(run("token_classification", ner, "probe", "linear_probe"), echo=quiet).run_dir
    cfg = run("token_classification", ner, "ft", "full", learning_rate=1e-9, max_steps=1)
    cfg["model"]["head_from"] = str(probe)
    tuned = load_trained(tunesmith.train(cfg, echo=quiet).run_dir).model
    head = load_file(probe / "adapter" / "probe_head.safetensors")
    torch.testing.assert_close(tuned.classifier.weight.detach(), head["weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(tuned.classifier.bias.detach(), head["bias"], atol=1e-6, rtol=0)
    assert head["bias"].abs().max() > 1e-3  # the probe moved its bias: the copy is not of zeros

    sentences = [{"text": s, "label": y} for s, y in SENTENCES]
    pooled = tunesmith.train(run("classification", sentences, "pooled", "linear_probe"), echo=quiet).run_dir
    cfg = run("classification", sentences, "ft-cls", "full")
    cfg["model"]["head_from"] = str(pooled)
    with pytest.raises(ConfigError, match="model.head_from: bert is an encoder, whose sequence classifier reads "
                                          "the pooler"):
        tunesmith.train(cfg, echo=quiet)
    assert not (tmp_path / "ft-cls").exists()
