"""Forgetting: reference sets measured before/after, deltas, and a model that really forgets."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tunesmith
from tunesmith.config import ReferenceSet
from tunesmith.errors import ConfigError
from tunesmith.evaluation.api import compare
from tunesmith.evaluation.forgetting import (
    forgetting_deltas,
    measure_reference,
    reference_file,
    reference_name,
)

from conftest import write_jsonl


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_default_reference_sets_ship_with_the_package():
    text = reference_file(ReferenceSet()).read_text()
    assert 2000 < len(text.split()) < 4000  # a few thousand tokens of general prose
    qa = [json.loads(x) for x in reference_file(ReferenceSet(kind="task")).read_text().splitlines()]
    assert len(qa) == 30 and all(r["messages"][-1]["role"] == "assistant" for r in qa)
    assert reference_name(ReferenceSet()) == "default"
    assert reference_name(ReferenceSet(kind="task")) == "default_qa"
    assert reference_name(ReferenceSet(path="/x/wiki.txt")) == "wiki"


def test_forgetting_deltas_are_after_minus_before():
    before = {"ref/default/perplexity": 10.0, "ref/qa/exact_match": 0.5, "eval_loss": 1.0, "ref/gone/perplexity": 3.0}
    after = {"ref/default/perplexity": 12.5, "ref/qa/exact_match": 0.25, "eval_loss": 9.0}
    assert forgetting_deltas(before, after) == {
        "forgetting/default/perplexity_delta": 2.5,
        "forgetting/default/perplexity_change_pct": 25.0,
        "forgetting/qa/exact_match_delta": -0.25,
        "forgetting/qa/exact_match_change_pct": -50.0,
    }
    assert forgetting_deltas({"ref/a/exact_match": 0.0}, {"ref/a/exact_match": 0.5}) == {
        "forgetting/a/exact_match_delta": 0.5}  # no relative change from zero


def test_measure_reference_is_windowed_perplexity_and_restores_mode(tiny_lm, tiny_tokenizer, tmp_path):
    text = "the water is blue and the sky is green. " * 7
    path = tmp_path / "wiki.txt"
    path.write_text(text)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 20):
            w = ids[i : i + 20]
            logp = torch.log_softmax(tiny_lm(input_ids=torch.tensor([w])).logits[0].double(), -1)
            total -= sum(float(logp[t - 1, w[t]]) for t in range(1, len(w)))
            n += len(w) - 1
    tiny_lm.train()
    got = measure_reference(tiny_lm, tiny_tokenizer, [ReferenceSet(path=str(path))], batch_size=2, max_length=20)
    assert tiny_lm.training
    assert got == {"ref/wiki/perplexity": pytest.approx(math.exp(total / n), rel=1e-5)}
    again = measure_reference(tiny_lm, tiny_tokenizer, [ReferenceSet(path=str(path))], batch_size=5, max_length=20)
    assert again["ref/wiki/perplexity"] == pytest.approx(got["ref/wiki/perplexity"], rel=1e-5)  # deterministic


def test_reference_perplexity_of_chat_records_with_a_tokenizer_without_a_template(tiny_lm, tiny_model_dir, tmp_path):
    """Chat records render through a chat template: a tokenizer without one gets the fallback first (it
    raised transformers' 'chat_template is not set' unless an earlier task had set it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "ref.jsonl", [{"messages": [{"role": "user", "content": "the sky"},
                                                              {"role": "assistant", "content": "is blue"}]}] * 3)
    got = measure_reference(tiny_lm, tok, [ReferenceSet(path=str(path), kind="perplexity")])
    assert math.isfinite(got["ref/ref/perplexity"])


def test_measure_reference_on_a_peft_model_and_a_task_set(tiny_lm, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    sets = [ReferenceSet(max_samples=2), ReferenceSet(kind="task", max_samples=3)]
    base = measure_reference(tiny_lm, tiny_tokenizer, sets, max_length=64)
    # A freshly initialised LoRA adapter is the identity (B = 0): same scores through peft.
    wrapped = get_peft_model(tiny_lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped.eval()
    got = measure_reference(wrapped, tiny_tokenizer, sets, max_length=64)
    assert set(got) == {"ref/default/perplexity", "ref/default_qa/exact_match"}
    assert got["ref/default/perplexity"] == pytest.approx(base["ref/default/perplexity"], rel=1e-6)
    assert 0.0 <= got["ref/default_qa/exact_match"] <= 1.0
    assert not wrapped.training


def test_reference_errors(tiny_lm, tiny_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="reference file not found"):
        measure_reference(tiny_lm, tiny_tokenizer, [ReferenceSet(path=str(tmp_path / "none.txt"))])
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(ConfigError, match="kind 'task' needs prompt/answer rows"):
        measure_reference(tiny_lm, tiny_tokenizer, [ReferenceSet(path=str(tmp_path / "t.txt"), kind="task")])
    with pytest.raises(ConfigError, match="unknown metric 'em'"):
        measure_reference(tiny_lm, tiny_tokenizer, [ReferenceSet(kind="task", metrics=["em"])])
    with pytest.raises(ConfigError, match="two sets are named 'default'"):
        measure_reference(tiny_lm, tiny_tokenizer, [ReferenceSet(), ReferenceSet()])


def test_overfitting_one_domain_raises_reference_perplexity(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Full fine-tune at a high learning rate on one repetitive text: the model forgets."""
    from transformers import AutoModelForCausalLM

    domain = write_jsonl(tmp_path / "domain.jsonl",
                         [{"text": "great movie good review positive great movie good review positive"}] * 16)
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(domain), "max_length": 32, "packing": False},
        "method": {"type": "full"},
        "objective": {"type": "sft"},
        "training": {"max_steps": 25, "batch_size": 8, "learning_rate": 1e-2, "scheduler": "constant",
                     "progress": False, "precision": "fp32", "log_every": 25},
        "eval": {"forgetting": False},
        "output": {"dir": str(tmp_path / "run"), "model_card": False},
    }
    run = tunesmith.train(cfg, echo=quiet)
    sets = [ReferenceSet(max_samples=4)]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(run.artifact_dir, dtype=torch.float32)
    before = measure_reference(base, tiny_tokenizer, sets, max_length=128)
    after = measure_reference(tuned, tiny_tokenizer, sets, max_length=128)
    deltas = forgetting_deltas(before, after)
    assert after["ref/default/perplexity"] > 1.5 * before["ref/default/perplexity"]
    assert deltas["forgetting/default/perplexity_delta"] > 0
    assert deltas["forgetting/default/perplexity_change_pct"] > 50

    # The same numbers through compare, and in its report.
    result = compare(models=[f"base={tiny_model_dir}", f"tuned={run.run_dir}"],
                     reference=[{"path": "default", "max_samples": 4}], output=tmp_path / "report",
                     cache_dir=tmp_path / "cache", echo=quiet)
    result_delta = result.forgetting["tuned"]["forgetting/default/perplexity_delta"]
    assert result.reference["tuned"]["ref/default/perplexity"] > result.reference["base"]["ref/default/perplexity"]
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| tuned | ref/default/perplexity"))
    assert f"+{result_delta:.2f}" in row
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert data["forgetting"]["tuned"]["forgetting/default/perplexity_delta"] == pytest.approx(result_delta)
