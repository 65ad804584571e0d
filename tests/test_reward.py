"""Reward modelling in the one loop: step-1 values, learning, margins, reloading, eval, `tunesmith eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import QA, write_jsonl

# Every answer is only ever chosen or only ever rejected, so a tiny model learns to rank them within a
# few steps (DPO's set swaps positive/negative between prompts, which a reward head learns slowly).
WRONG = {"paris": "london", "blue": "green", "positive": "terrible", "negative": "great", "two": "three",
         "blue water": "red water"}
ROWS = [{"prompt": q, "chosen": a, "rejected": WRONG[a]} for q, a in QA * 4]


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


def reward_config(model_dir, data, out, **objective) -> dict:
    return {"model": {"name_or_path": str(model_dir)},
            "data": {"train": str(data), "max_length": 64, "shuffle": False},
            "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "objective": {"type": "reward", **objective},
            "training": {"batch_size": 4, "learning_rate": 1e-2, "scheduler": "constant", "max_steps": 1,
                         "progress": False, "log_every": 1, "precision": "fp32"},
            "eval": {"forgetting": False},
            "output": {"dir": str(out)}}


def records(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def head_model(tiny_model_dir, folder, init):
    """The tiny Llama saved with a one-output score head: `init` sets the head's weights."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from tunesmith.data.templates import FALLBACK_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = FALLBACK_CHAT_TEMPLATE  # what tunesmith renders a model without a template with
    tok.save_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        init(model.score.weight)
    model.save_pretrained(folder)
    return folder


def plain_rewards(model, tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each whole conversation scored alone (no padding) by a plain transformers / peft model."""
    def score(messages):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].float()

    user = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    chosen = torch.stack([score(u + [{"role": "assistant", "content": r["chosen"]}]) for u, r in zip(user, rows)])
    rejected = torch.stack([score(u + [{"role": "assistant", "content": r["rejected"]}]) for u, r in zip(user, rows)])
    return chosen, rejected


@pytest.mark.parametrize("margins", [None, [0.0, 0.5, 1.0, 2.0]])
def test_step_one_with_a_zero_head_is_ln2_or_the_margin_loss(tiny_model_dir, tmp_path, margins):
    """All rewards 0: loss = mean log(1 + e^m) (ln 2 without margins), accuracy 0 (ties), margin 0."""
    import tunesmith

    folder = head_model(tiny_model_dir, tmp_path / "zero", torch.nn.init.zeros_)
    rows = [dict(r, margin=m) for r, m in zip(ROWS, margins)] + ROWS[4:] if margins else ROWS
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = tunesmith.train(reward_config(folder, data, tmp_path / "run", center_rewards_coefficient=0.01),
                             echo=quiet)
    step1 = records(result.run_dir)[0]
    expected = sum(math.log1p(math.exp(m)) for m in margins) / 4 if margins else math.log(2)
    assert step1["loss"] == pytest.approx(expected, rel=1e-6)
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert step1[key] == pytest.approx(0.0, abs=1e-7), key


def test_step_one_matches_rewards_from_plain_transformers(tiny_model_dir, tmp_path):
    """Random head, margins and centering: the logged step-1 values are hand-computed from a plain
    transformers model scoring each conversation alone (TRL's tokenisation: the whole chat template)."""
    import tunesmith
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    folder = head_model(tiny_model_dir, tmp_path / "random", lambda w: w.normal_(0.0, 0.5))
    margins = torch.tensor([0.0, 0.3, -0.2, 1.0])
    rows = [dict(r, margin=float(m)) for r, m in zip(ROWS, margins)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = tunesmith.train(reward_config(folder, data, tmp_path / "run", center_rewards_coefficient=0.01),
                             echo=quiet)
    step1 = records(result.run_dir)[0]

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rc, rr = plain_rewards(model, AutoTokenizer.from_pretrained(folder), rows)
    both = torch.cat([rc, rr])
    loss = (-F.logsigmoid(rc - rr - margins)).mean() + 0.01 * ((rc + rr) ** 2).mean()
    assert step1["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert step1["accuracy"] == pytest.approx(float((rc > rr).float().mean()))
    assert step1["margin"] == pytest.approx(float((rc - rr).mean()), abs=1e-5)
    assert step1["mean_reward"] == pytest.approx(float(both.mean()), abs=1e-5)
    assert step1["min_reward"] == pytest.approx(float(both.min()), abs=1e-5)
    assert step1["max_reward"] == pytest.approx(float(both.max()), abs=1e-5)
    assert float(both.max() - both.min()) > 0.05  # the head is not near zero: this is not the ln 2 case


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A LoRA reward model trained on the pairs, evaluated on them: (config, run dir, pairs file)."""
    import tunesmith

    folder = tmp_path_factory.mktemp("reward-lora")
    data = write_jsonl(folder / "pairs.jsonl", ROWS)
    cfg = reward_config(tiny_model_dir, data, folder / "run")
    cfg["data"]["split"] = {"validation_file": str(data)}
    cfg["training"]["max_steps"] = 30
    result = tunesmith.train(cfg, echo=quiet)
    return cfg, result, data


def test_lora_reward_model_learns_the_preference(lora_run):
    _, result, _ = lora_run
    steps = [r for r in records(result.run_dir) if "accuracy" in r and "loss" in r]
    first, last = steps[:6], steps[-6:]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    assert mean(last, "loss") < mean(first, "loss") - 0.3
    assert mean(last, "accuracy") > mean(first, "accuracy")
    assert mean(last, "accuracy") >= 0.95
    assert mean(last, "margin") > mean(first, "margin") + 1.0
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward", "eval_min_reward",
                "eval_max_reward"):
        assert key in result.metrics, key
    assert result.metrics["eval_accuracy"] >= 0.95
    assert result.metrics["eval_min_reward"] < result.metrics["eval_mean_reward"] < result.metrics["eval_max_reward"]


def test_head_learning_rate_moves_the_score_head_by_its_own_rate(tiny_model_dir, tmp_path):
    """Adam's first step moves every weight with a gradient by exactly its group's lr (m / sqrt(v) = sign
    of the gradient): the score head by training.head_learning_rate, LoRA's B by training.learning_rate."""
    import tunesmith
    from safetensors.torch import load_file

    folder = head_model(tiny_model_dir, tmp_path / "head", lambda w: w.fill_(0.1))
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cfg = reward_config(folder, data, tmp_path / "run")
    cfg["training"]["head_learning_rate"] = 0.05
    result = tunesmith.train(cfg, echo=quiet)
    saved = load_file(result.artifact_dir / "adapter_model.safetensors")
    (head,) = [v for k, v in saved.items() if k.endswith("score.weight")]
    moved = (head - 0.1).abs()
    assert moved.max() == pytest.approx(0.05, rel=1e-4) and moved.min() > 0.04
    b = torch.cat([v.flatten() for k, v in saved.items() if "lora_B" in k]).abs()  # B starts at 0
    assert b.max() == pytest.approx(1e-2, rel=1e-4)


@pytest.mark.parametrize("overrides,reason", [
    ({"objective": {"type": "sft"}, "data": {"format": "alpaca"}}, "objective.type 'sft' adds no task head"),
    ({"method": {"type": "lora", "loraplus_lr_ratio": 4}}, "build their own optimizer groups"),
])
def test_head_learning_rate_refused_where_it_cannot_apply(tiny_model_dir, alpaca_file, pairs_file, tmp_path,
                                                        overrides, reason):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    cfg = reward_config(tiny_model_dir, alpaca_file if "data" in overrides else pairs_file, tmp_path / "run")
    cfg["training"]["head_learning_rate"] = 1e-3
    for section, values in overrides.items():
        cfg[section].update(values)
    with pytest.raises(ConfigError, match=reason):
        load_config(cfg)


def test_lora_artifact_scores_texts_with_plain_peft(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.artifacts import load_trained

    _, result, _ = lora_run
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model = PeftModel.from_pretrained(base, str(result.artifact_dir)).eval()
    tok = AutoTokenizer.from_pretrained(result.artifact_dir)
    rc, rr = plain_rewards(model, tok, ROWS[:6])
    ours_c, ours_r = plain_rewards(load_trained(result.run_dir).model, tok, ROWS[:6])
    assert torch.allclose(rc, ours_c, atol=1e-5) and torch.allclose(rr, ours_r, atol=1e-5)
    # The eval loss of the run, recomputed from the reloaded model on the same 24 pairs.
    rc, rr = plain_rewards(model, tok, ROWS)
    assert float((-F.logsigmoid(rc - rr)).mean()) == pytest.approx(result.metrics["eval_loss"], rel=1e-4)


def test_full_reward_model_reloads_with_plain_transformers(tiny_model_dir, pairs_file, tmp_path):
    import tunesmith
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = reward_config(tiny_model_dir, pairs_file, tmp_path / "run")
    cfg["method"] = {"type": "full"}
    cfg["data"]["split"] = {"validation_file": str(pairs_file)}
    cfg["training"].update(max_steps=6, learning_rate=1e-3)
    result = tunesmith.train(cfg, echo=quiet)
    losses = [r["loss"] for r in records(result.run_dir) if "loss" in r and "eval_loss" not in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    manifest = json.loads((result.artifact_dir / "tunesmith.json").read_text())
    assert manifest["objective"] == "reward" and manifest["auto_class"] == "AutoModelForSequenceClassification"

    model = AutoModelForSequenceClassification.from_pretrained(result.artifact_dir).eval()
    assert model.config.num_labels == 1
    rc, rr = plain_rewards(model, AutoTokenizer.from_pretrained(result.artifact_dir), ROWS)
    assert float((-F.logsigmoid(rc - rr)).mean()) == pytest.approx(result.metrics["eval_loss"], rel=1e-4)
    assert float((rc > rr).float().mean()) == pytest.approx(result.metrics["eval_accuracy"])


def test_tunesmith_eval_reports_pair_accuracy(lora_run, tmp_path):
    """`tunesmith eval` on preference data: pair metrics, equal to the run's own eval numbers."""
    from tunesmith.evaluation.api import evaluate
    from tunesmith.evaluation.pairs import score_pairs
    from tunesmith.artifacts import load_trained

    cfg, result, data = lora_run
    ad_hoc = evaluate(model=str(result.run_dir), data=str(data), output=tmp_path / "e1",
                      cache_dir=tmp_path / "c", echo=quiet)
    assert [m.label for m in ad_hoc.models] == ["run"] and not ad_hoc.forgetting  # no base, no LM perplexity
    scores = ad_hoc.results["run"]["pairs"].metrics
    assert scores["pairs"] == len(ROWS)
    assert scores["pair_accuracy"] == pytest.approx(result.metrics["eval_accuracy"], abs=1e-6)
    assert scores["pair_margin"] == pytest.approx(result.metrics["eval_margin"], abs=1e-5)
    assert "pair_accuracy" in (tmp_path / "e1" / "report.md").read_text()

    # From the run's config: its validation data, the same numbers, and no base model to score.
    by_config = evaluate(cfg, output=tmp_path / "e2", cache_dir=tmp_path / "c", echo=quiet)
    assert len(by_config.models) == 1 and by_config.models[0].label != "base"
    val = by_config.results[by_config.models[0].label]["validation"].metrics
    assert val["pair_accuracy"] == pytest.approx(scores["pair_accuracy"])

    loaded = load_trained(result.run_dir)
    direct = score_pairs(loaded.model, loaded.tokenizer, data, batch_size=5)  # other batches, same numbers
    assert direct["pair_margin"] == pytest.approx(scores["pair_margin"], abs=1e-5)


def test_pair_metrics_refuse_other_data_and_models(tiny_model_dir, alpaca_file, pairs_file, tmp_path):
    from tunesmith.errors import ConfigError, DataError
    from tunesmith.evaluation.api import evaluate

    with pytest.raises(DataError, match="'preference' format"):
        evaluate(model=str(tiny_model_dir), data=str(alpaca_file), settings={"metrics": ["pair_accuracy"]},
                 forgetting=False, output=tmp_path / "e", echo=quiet)
    with pytest.raises(ConfigError, match="need a reward model"):
        evaluate(model=str(tiny_model_dir), data=str(pairs_file), output=tmp_path / "e", use_cache=False,
                 echo=quiet)


def test_reward_on_sft_data_is_refused_naming_the_format(tiny_model_dir, alpaca_file, tmp_path):
    import tunesmith
    from tunesmith.errors import DataError

    with pytest.raises(DataError, match="objective 'reward' needs data in one of the formats preference"):
        tunesmith.train(reward_config(tiny_model_dir, alpaca_file, tmp_path / "run"), echo=quiet)
