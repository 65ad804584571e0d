"""Multi-task runs: config refusals, the sampler, shared backbone with a head per task, resume, reload."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import TOPICS, classification_tasks, metric_records, whole_and_resumed, write_jsonl

@pytest.fixture
def multitask_config(tiny_bert_wide_dir, tmp_path):
    def make(method: dict | None = None, **sections) -> dict:
        cfg = {
            "model": {"name_or_path": str(tiny_bert_wide_dir)},
            "tasks": classification_tasks(tmp_path),
            "method": method or {"type": "full"},
            "training": {"epochs": 4, "batch_size": 4, "learning_rate": 3e-3, "progress": False, "log_every": 1,
                         "precision": "fp32"},
            "output": {"dir": str(tmp_path / "run")},
            "eval": {"forgetting": False},
        }
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        return cfg

    return make


def test_task_batches_are_one_task_each_and_reproducible():
    from tunesmith.sampling import task_batches

    spans = [(0, 40), (40, 50)]  # 10 batches of task 0, 3 of task 1 (batch 4)
    for sampling in ("proportional", "temperature", "equal"):
        first = task_batches(spans, 4, seed=1, epoch=0, sampling=sampling)
        assert first == task_batches(spans, 4, seed=1, epoch=0, sampling=sampling)
        assert first != task_batches(spans, 4, seed=1, epoch=1, sampling=sampling)
        assert len(first) == 13
        for batch in first:
            assert len({i >= 40 for i in batch}) == 1, batch
    counts = {s: Counter(b[0] >= 40 for b in task_batches(spans, 4, 1, 0, s))[True]
              for s in ("proportional", "temperature", "equal")}
    # Task 1 holds 10 of 50 rows: 3 of 13 batches proportionally, 13 * sqrt(10)/(sqrt(40)+sqrt(10)) = 4.33 -> 4
    # at T=2, half (6 or 7) with equal.
    assert counts == {"proportional": 3, "temperature": 4, "equal": 6}
    equal = task_batches(spans, 4, 1, 0, "equal")
    assert [b[0] >= 40 for b in equal[:4]] == [False, True, False, True]  # round-robin
    # Proportional sampling uses every row of every task once per epoch.
    assert sorted(i for b in task_batches(spans, 4, 1, 0, "proportional") for i in b) == list(range(50))
    weighted = task_batches(spans, 4, 1, 0, "weights", weights=[1.0, 3.0])
    assert Counter(b[0] >= 40 for b in weighted)[True] == 10  # 13 * 3/4 = 9.75 -> 10: cycles task 1's rows


@pytest.mark.parametrize("change, expected", [
    ({"data": {"train": "x.jsonl"}}, "data: a multi-task run takes its data from each task"),
    ({"tasks": "twice"}, "the task name 'sentiment' is used twice"),
    ({"tasks": "dpo"}, "objective.type 'dpo' cannot be a task of a multi-task run"),
    ({"tasks": "families"}, "cannot share one model"),
    ({"multitask": {"sampling": "weights"}}, "weights needs a weight on every task; missing on sentiment, topic"),
    ({"tasks": "weight-without-weights"}, "tasks[].weight is read only with multitask.sampling: weights"),
    ({"method": {"type": "prompt_tuning"}}, "rewrites the inputs inside peft's forward"),
    ({"method": {"type": "linear_probe"}}, "linear_probe"),
    ({"tasks": "packing"}, "tasks[1] (topic): data.packing: objective.type classification does not pack"),
    ({"multitask": {"shared": False}}, "its own adapter, which method.type full cannot: it adds no adapter"),
    ({"multitask": {"shared": False}, "method": {"type": "lora_fa"}}, "LoRA-FA optimizer updates every B matrix"),
    ({"training": {"head_learning_rate": 1e-3}}, "training.head_learning_rate is for single-task runs"),
])
def test_bad_task_configs_are_refused_naming_the_task(multitask_config, change, expected):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    cfg = multitask_config()
    tasks = cfg["tasks"]
    variants = {
        "twice": [tasks[0], tasks[0]],
        "dpo": [tasks[0], {**tasks[1], "objective": {"type": "dpo"}}],
        "families": [{**tasks[0], "objective": {"type": "masked_lm"}}, {**tasks[1], "objective": {"type": "sft"}}],
        "weight-without-weights": [{**tasks[0], "weight": 2.0}, tasks[1]],
        "packing": [tasks[0], {**tasks[1], "data": {**tasks[1]["data"], "packing": True}}],
    }
    for key, value in change.items():
        cfg[key] = variants[value] if key == "tasks" else value
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert expected in str(err.value)


def test_two_heads_on_one_backbone_learn_both_tasks_and_reload(multitask_config, tmp_path):
    import torch

    import tunesmith
    from tunesmith.artifacts import load_trained

    cfg = multitask_config(eval={"every": 4, "forgetting": False})
    result = tunesmith.train(cfg)
    records = metric_records(result.run_dir)
    steps = [r for r in records if "loss" in r and "eval_loss" not in r]
    assert any("sentiment/loss" in r for r in steps) and any("topic/loss" in r for r in steps)
    first = [r for r in records if "eval_topic/accuracy" in r][0]
    final = result.metrics
    for task in ("sentiment", "topic"):
        assert final[f"eval_{task}/loss"] < first[f"eval_{task}/loss"]
    assert final["eval_mean/accuracy"] == pytest.approx(
        (final["eval_sentiment/accuracy"] + final["eval_topic/accuracy"]) / 2)
    assert final["eval_loss"] == pytest.approx((final["eval_sentiment/loss"] + final["eval_topic/loss"]) / 2)
    per_task = json.loads((result.run_dir / "task_results.json").read_text())
    assert set(per_task) == {"sentiment", "topic", "mean"}
    card = (result.run_dir / "README.md").read_text()
    assert "## Tasks" in card and "| topic | classification |" in card

    # Each task's model answers with its own head and labels; both share the trained backbone.
    sentiment = load_trained(result.run_dir, task="sentiment")
    topic = load_trained(result.run_dir, task="topic")
    assert sentiment.model.config.id2label[0] == "negative"
    assert sorted(topic.model.config.id2label.values()) == ["day", "film", "water"]
    shared = sentiment.model.bert.state_dict()
    assert all(torch.equal(v, shared[k]) for k, v in topic.model.bert.state_dict().items())
    batch = topic.tokenizer(["call the water", "the movie was good and great"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = topic.model(**batch).logits
    assert logits.shape == (2, 3)
    assert load_trained(result.run_dir).model.config.num_labels == 2  # default: the first task
    with pytest.raises(tunesmith.errors.ConfigError, match="its tasks are sentiment, topic"):
        load_trained(result.run_dir, task="ner")
    # `tunesmith eval run.yaml` scores generative tasks; classification tasks were scored in training.
    from tunesmith.evaluation.api import evaluate

    with pytest.raises(tunesmith.errors.ConfigError, match="sentiment: classification, topic: classification"):
        evaluate(cfg, echo=lambda _m: None)


def test_reloaded_head_scores_as_in_training(multitask_config, tmp_path):
    """LoRA shared by both tasks: the topic head saved beside the adapter scores its validation file as the
    run's final evaluation did."""
    import torch

    import tunesmith
    from tunesmith.artifacts import load_trained

    held_out = TOPICS[::2]
    cfg = multitask_config(method={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    cfg["tasks"][1]["data"]["split"] = {"validation_file": str(write_jsonl(
        tmp_path / "topic_val.jsonl", [{"text": t, "label": y} for t, y in held_out]))}
    result = tunesmith.train(cfg)
    topic = load_trained(result.run_dir, task="topic")
    batch = topic.tokenizer([t for t, _ in held_out], return_tensors="pt", padding=True)
    labels = torch.tensor([topic.model.config.label2id[y] for _, y in held_out])
    with torch.no_grad():
        logits = topic.model(**batch).logits
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert accuracy == pytest.approx(result.metrics["eval_topic/accuracy"])
    assert loss == pytest.approx(result.metrics["eval_topic/loss"], rel=1e-4)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-adapter", "per-task-adapters"])
def test_resumed_run_draws_the_same_batches_and_ends_with_the_same_weights(multitask_config, tmp_path, monkeypatch,
                                                                           shared):
    """Interrupted after step 7 (SIGINT, checkpoint) and resumed: every logged number and the final weights,
    extra head (and the task's own adapter) included, equal an uninterrupted run's; temperature sampling and
    uncertainty weighting on."""
    import torch
    from safetensors.torch import load_file

    def config(out: str) -> dict:
        return multitask_config(method={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                                multitask={"sampling": "temperature", "temperature": 3.0,
                                           "uncertainty_weighting": True, "shared": shared},
                                training={"epochs": 2}, output={"dir": str(tmp_path / out)})

    whole, resumed = whole_and_resumed(config, monkeypatch, step=7)

    def steps(run) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s",)}
                for r in metric_records(run.run_dir) if "loss" in r and "eval_loss" not in r]

    assert resumed.steps == whole.steps
    assert steps(resumed) == steps(whole)
    assert any("topic/uncertainty_weight" in r for r in steps(whole))
    files = ["adapter/adapter_model.safetensors", "adapter/heads/topic.safetensors"]
    if not shared:
        files.append("adapter/adapters/topic/adapter_model.safetensors")
    for file in files:
        a, b = load_file(whole.run_dir / file), load_file(resumed.run_dir / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["eval_topic/accuracy"] == whole.metrics["eval_topic/accuracy"]


def test_early_stopping_on_one_tasks_metric_restores_its_head(multitask_config):
    import tunesmith

    cfg = multitask_config(eval={"every": 2, "early_stopping_patience": 1, "metric": "eval_topic/loss",
                                 "forgetting": False},
                           training={"epochs": 30, "learning_rate": 0.05})
    result = tunesmith.train(cfg, echo=lambda _m: None)
    assert result.stopped_early
    evals = [r for r in metric_records(result.run_dir) if "eval_topic/loss" in r and not r.get("final")]
    best = min(r["eval_topic/loss"] for r in evals)
    # The final evaluation ran on the restored best weights, topic head included.
    assert result.metrics["eval_topic/loss"] == pytest.approx(best, rel=1e-5)


def test_instruction_mixture_trains_one_lm_and_reports_each_source(run_config, tmp_path):
    """Two SFT sources on a decoder: no extra head, a held-out loss per source and their mean."""
    from conftest import QA

    import tunesmith

    base = run_config()
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": a, "input": "", "output": q} for q, a in QA * 4])
    cfg = {k: v for k, v in base.items() if k != "data"}
    cfg["tasks"] = [
        {"name": "qa", "data": {**base["data"], "split": {"validation_ratio": 0.25}}},
        {"name": "reverse", "data": {"train": str(other), "max_length": 64, "split": {"validation_ratio": 0.25}},
         "loss_weight": 0.5},
    ]
    cfg["training"]["epochs"] = 2
    logs = []
    result = tunesmith.train(cfg, echo=logs.append)
    assert not any("own" in line and "head" in line for line in logs)  # the LM head is shared
    for source in ("qa", "reverse"):
        assert result.metrics[f"eval_{source}/loss"] > 0
        assert result.metrics[f"eval_{source}/perplexity"] > 1
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (result.run_dir / "adapter" / "heads").exists()

    # The CLI scores one task of the run (--task); an unknown task is refused, naming the run's tasks.
    from typer.testing import CliRunner

    from tunesmith.cli import app

    res = CliRunner().invoke(app, ["eval", "--model", str(result.run_dir), "--task", "reverse", "--data", str(other),
                                   "-m", "perplexity", "--no-forgetting", "-o", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert "run/reverse" in res.output and (tmp_path / "report").is_dir()
    res = CliRunner().invoke(app, ["eval", "--model", str(result.run_dir), "--task", "nope", "--data", str(other),
                                   "-m", "perplexity", "--no-forgetting", "-o", str(tmp_path / "report2")])
    assert res.exit_code != 0 and "its tasks are qa, reverse" in " ".join(res.output.split())  # rich wraps lines


PER_TASK_METHODS = {"lora": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                    "dora": {"type": "dora", "r": 4, "alpha": 8, "dropout": 0.0},
                    "ia3": {"type": "ia3"},
                    "qlora": {"type": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
                    "adapter": {"type": "adapter", "reduction_factor": 4}}
FIRST_ARTIFACT = {"lora": "adapter_model.safetensors", "dora": "adapter_model.safetensors",
                  "ia3": "adapter_model.safetensors", "qlora": "adapter_model.safetensors", "adapter": "bottleneck_adapter.safetensors"}


@pytest.mark.parametrize("method", list(PER_TASK_METHODS))
def test_per_task_adapters_learn_only_from_their_task_and_reload(multitask_config, tmp_path, method):
    """multitask.shared: false: the first task's adapter and head end bitwise equal whatever the second task's
    labels say (its batches never reach them), where a shared adapter differs; each task's saved adapter and
    head reload and score its validation rows exactly as the run's final evaluation did."""
    import torch
    from safetensors.torch import load_file

    import tunesmith
    from tunesmith.artifacts import load_trained

    held_out = TOPICS[::2]
    val = write_jsonl(tmp_path / "topic_val.jsonl", [{"text": t, "label": y} for t, y in held_out])
    rotate = {"film": "water", "water": "day", "day": "film"}
    flipped = write_jsonl(tmp_path / "topic_flipped.jsonl", [{"text": t, "label": rotate[y]} for t, y in TOPICS * 2])

    def run(shared: bool, flip: bool):
        cfg = multitask_config(method=PER_TASK_METHODS[method], multitask={"shared": shared},
                               training={"epochs": 2, "max_grad_norm": None},
                               output={"dir": str(tmp_path / f"{method}-{shared}-{flip}")})
        cfg["tasks"][1]["data"]["split"] = {"validation_file": str(val)}
        if flip:
            cfg["tasks"][1]["data"]["train"] = str(flipped)
        logs = []
        result = tunesmith.train(cfg, echo=logs.append)
        return result, load_file(result.run_dir / "adapter" / FIRST_ARTIFACT[method]), logs

    own, own_weights, logs = run(False, False)
    assert any("each has its own" in line for line in logs)
    _, own_flipped, _ = run(False, True)
    assert own_weights.keys() == own_flipped.keys()
    assert [k for k in own_weights if not torch.equal(own_weights[k], own_flipped[k])] == []
    if method == "lora":  # the control, once: a shared adapter does move with the other task's labels
        _, shared, _ = run(True, False)
        _, shared_flipped, _ = run(True, True)
        assert any(not torch.equal(shared[k], shared_flipped[k]) for k in shared if "classifier" not in k)

    topic_dir = own.run_dir / "adapter" / "adapters" / "topic"
    assert topic_dir.is_dir() and not (own.run_dir / "adapter" / "adapters" / "sentiment").exists()
    topic_weights = load_file(topic_dir / FIRST_ARTIFACT[method])
    topic = load_trained(own.run_dir, task="topic")
    batch = topic.tokenizer([t for t, _ in held_out], return_tensors="pt", padding=True)
    labels = torch.tensor([topic.model.config.label2id[y] for _, y in held_out])
    with torch.no_grad():
        logits = topic.model(**batch).logits
    assert float((logits.argmax(-1) == labels).float().mean()) == pytest.approx(own.metrics["eval_topic/accuracy"])
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert loss == pytest.approx(own.metrics["eval_topic/loss"], rel=1e-4)
    # The first task's model runs the first adapter: its outputs differ from the topic adapter's backbone.
    sentiment = load_trained(own.run_dir, task="sentiment")
    with torch.no_grad():
        h_sentiment = sentiment.model(**batch, output_hidden_states=True).hidden_states[-1]
        h_topic = topic.model(**batch, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(h_sentiment, h_topic)
    assert len(topic_weights) > 0


def test_decoder_mixture_with_per_task_adapters_answers_each_source_with_its_own(run_config, tmp_path):
    """Two SFT sources, multitask.shared: false: `tunesmith eval` on the run's config scores every task's
    model (its own adapter, picked by task name) on every task's held-out rows, and each source's adapter
    fits its own rows better than the other source's adapter does."""
    from conftest import QA

    import tunesmith
    from tunesmith.evaluation.api import evaluate

    base = run_config()
    forward = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA * 4])
    reverse = write_jsonl(tmp_path / "reverse.jsonl", [{"instruction": a, "input": "", "output": q} for q, a in QA * 4])
    split = {"validation_ratio": 0.25}
    cfg = {k: v for k, v in base.items() if k != "data"}
    cfg["tasks"] = [{"name": "qa", "data": {"train": str(forward), "max_length": 64, "split": split}},
                    {"name": "reverse", "data": {"train": str(reverse), "max_length": 64, "split": split}}]
    cfg["multitask"] = {"shared": False}
    cfg["training"].update(epochs=3, learning_rate=1e-2)
    cfg["eval"] = {"at_end": False, "forgetting": False}
    cfg["output"]["name"] = "mix"
    result = tunesmith.train(cfg, echo=lambda _m: None)
    assert (result.run_dir / "adapter" / "adapters" / "reverse" / "adapter_config.json").is_file()

    report = evaluate(cfg, settings={"metrics": ["perplexity"]}, forgetting=False, include_base=False,
                      output=tmp_path / "eval", echo=lambda _m: None)
    assert sorted(report.results) == ["mix/qa", "mix/reverse"]
    ppl = {(m, t): report.metric(m, t, "perplexity") for m in report.results for t in ("qa", "reverse")}
    assert ppl[("mix/reverse", "reverse")] < ppl[("mix/qa", "reverse")]
    assert ppl[("mix/qa", "qa")] < ppl[("mix/reverse", "qa")]
