"""Distillation in the one loop: KD terms at step 1, learning from a trained teacher, classification with a
student built from the teacher's layers, teacher sources, and mismatches refused before training."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import QA, SENTENCES, build_tokenizer, method_keys, write_jsonl
from tunesmith.errors import ConfigError



def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r and "lr" in r]


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA * 4]
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory) -> Path:
    rows = [{"text": s, "label": y} for s, y in SENTENCES]
    return write_jsonl(tmp_path_factory.mktemp("cls-data") / "train.jsonl", rows)


def config(model_dir: Path, train: Path, out: Path, objective: dict, **sections) -> dict:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train), "max_length": 64, "shuffle": False},
        "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": objective,
        "training": {"max_steps": 1, "batch_size": 8, "learning_rate": 1e-2, "scheduler": "constant",
                     "progress": False, "log_every": 1, "precision": "fp32", "max_grad_norm": None},
        "eval": {"forgetting": False},
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        if name == "method":  # the LoRA defaults above stay where the chosen method has them
            cfg["method"] = method_keys({**cfg["method"], "type": values.get("type", "lora")})
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def trained_teacher(tiny_model_dir, sft_file, tmp_path_factory) -> Path:
    """A run folder: the tiny Llama fully fine-tuned on the QA pairs (its answers differ from the base's)."""
    import tunesmith

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = config(tiny_model_dir, sft_file, out, {"type": "sft"}, method={"type": "full"},
                 training={"max_steps": 12, "learning_rate": 3e-3})
    return tunesmith.train(cfg, echo=quiet).run_dir


@pytest.fixture(scope="module")
def classifier_teacher(tiny_bert_wide_dir, labels_file, tmp_path_factory) -> Path:
    """A run folder: the tiny BERT briefly fine-tuned as a two-label classifier."""
    import tunesmith

    out = tmp_path_factory.mktemp("cls-teacher") / "run"
    cfg = config(tiny_bert_wide_dir, labels_file, out, {"type": "classification"}, method={"type": "full"},
                 training={"max_steps": 10, "learning_rate": 3e-3})
    return tunesmith.train(cfg, echo=quiet).run_dir


# --------------------------------------------------------------------------- step 1 with teacher == student


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_teacher_equal_to_the_student_gives_no_kd_loss_and_the_task_loss(tiny_model_dir, sft_file, tmp_path, loss):
    """A LoRA student starts as its base: with the base as teacher, KD is 0 and the task loss is SFT's."""
    import tunesmith

    packed = {"packing": True}  # the teacher sees the packed rows' position ids as the student does
    sft = tunesmith.train(config(tiny_model_dir, sft_file, tmp_path / "sft", {"type": "sft"}, data=packed),
                          echo=quiet)
    distill = tunesmith.train(config(tiny_model_dir, sft_file, tmp_path / "kd",
                                     {"type": "distill", "teacher": str(tiny_model_dir), "loss": loss}, data=packed),
                              echo=quiet)
    first, plain = steps(distill.run_dir)[0], steps(sft.run_dir)[0]
    assert first["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["task_loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert first["loss"] == pytest.approx(0.5 * plain["loss"], rel=1e-5)  # kd_ratio 0.5


def test_masked_lm_distillation_starts_at_zero_kd_and_hidden_loss(tiny_bert_wide_dir, labels_file, tmp_path):
    import tunesmith

    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": s} for s, _ in SENTENCES])
    cfg = config(tiny_bert_wide_dir, texts, tmp_path / "run",
                 {"type": "distill", "task": "masked_lm", "teacher": str(tiny_bert_wide_dir), "mlm_probability": 0.3,
                  "hidden_weight": 1.0, "temperature": 2.0},
                 method={"type": "full"}, training={"max_steps": 2})
    result = tunesmith.train(cfg, echo=quiet)
    first = steps(result.run_dir)[0]
    assert first["kd_loss"] == pytest.approx(0.0, abs=1e-5)
    assert first["hidden_loss"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.5 * first["task_loss"], rel=1e-5)
    assert steps(result.run_dir)[1]["kd_loss"] > 0  # the student moved away from its teacher


# --------------------------------------------------------------------------- learning from a trained teacher


def test_student_learns_to_match_a_trained_teacher_from_its_run_folder(tiny_model_dir, sft_file, trained_teacher,
                                                                       tmp_path):
    import tunesmith
    from tunesmith.artifacts import load_trained
    from tunesmith.data.pipeline import build_data
    from tunesmith.engine import evaluate_loss
    from tunesmith.objectives import OBJECTIVES

    cfg = config(tiny_model_dir, sft_file, tmp_path / "run",
                 {"type": "distill", "teacher": str(trained_teacher), "kd_ratio": 0.9},
                 method={"type": "full"}, data={"split": {"validation_file": str(sft_file)}},
                 training={"max_steps": 16, "batch_size": 12, "learning_rate": 3e-3})
    result = tunesmith.train(cfg, echo=quiet)
    kd = [r["kd_loss"] for r in steps(result.run_dir)]
    assert kd[0] > 0.1, "the trained teacher should disagree with the untrained student"
    assert sum(kd[-3:]) / 3 < 0.5 * kd[0], f"KD loss did not decrease: {kd}"
    metrics = result.metrics
    assert {"eval_loss", "eval_perplexity", "eval_kd_loss", "eval_task_loss"} <= set(metrics)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_task_loss"], rel=1e-6)  # eval_loss is the task's

    # The saved student reloads, and scored on its own (no teacher) it gives the eval loss the run reported.
    loaded = load_trained(result.run_dir)
    assert loaded.manifest["objective"] == "distill"
    objective = OBJECTIVES["distill"]()
    data = build_data(load_cfg(cfg).data, loaded.tokenizer, seed=0, packing=False, objective=objective)
    collate = objective.collator(loaded.tokenizer, objective.cfg, data.task, train=False)
    cpu = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    again = evaluate_loss(loaded.model, objective, data.val, collate, 64, cpu)
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


def load_cfg(cfg: dict):
    from tunesmith.config import load_config

    return load_config(cfg)


def test_teacher_from_a_run_folder_its_artifact_or_a_lora_run(tiny_model_dir, sft_file, trained_teacher, tmp_path):
    """The run folder and its model/ artifact are the same teacher; a LoRA run (base + adapter) works too."""
    import tunesmith

    lora_teacher = tunesmith.train(
        config(tiny_model_dir, sft_file, tmp_path / "lora-teacher", {"type": "sft"},
               training={"max_steps": 6, "learning_rate": 3e-2}), echo=quiet).run_dir
    first = {}
    for name, teacher in (("run", trained_teacher), ("artifact", trained_teacher / "model"), ("lora", lora_teacher)):
        run = tunesmith.train(config(tiny_model_dir, sft_file, tmp_path / name,
                                     {"type": "distill", "teacher": str(teacher)}), echo=quiet)
        first[name] = steps(run.run_dir)[0]["kd_loss"]
    assert first["run"] == pytest.approx(first["artifact"], rel=1e-6)
    assert first["run"] > 0.1 and first["lora"] > 1e-3


# --------------------------------------------------------------------------- classification, student from the teacher


def test_classification_distillation_with_a_student_built_from_the_teacher(classifier_teacher, tiny_bert_wide_dir,
                                                                            labels_file, tmp_path):
    import tunesmith
    from transformers import AutoModelForSequenceClassification

    cfg = config(tiny_bert_wide_dir, labels_file, tmp_path / "run",
                 {"type": "distill", "task": "classification", "teacher": str(classifier_teacher),
                  "temperature": 2.0, "hidden_weight": 0.5},
                 model={"init_from_teacher_every": 2}, method={"type": "full"},
                 data={"split": {"validation_file": str(labels_file)}},
                 training={"max_steps": 8, "learning_rate": 3e-3})
    lines = []
    result = tunesmith.train(cfg, echo=lines.append)
    assert any("student: teacher blocks [0] of 2" in line for line in lines), lines
    log = steps(result.run_dir)
    assert {"kd_loss", "task_loss", "hidden_loss"} <= set(log[0])
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"eval_accuracy", "eval_macro_f1", "eval_kd_loss"} <= set(result.metrics)
    assert "eval_perplexity" not in result.metrics  # the task's metrics, not a language model's
    student = AutoModelForSequenceClassification.from_pretrained(result.artifact_dir)
    assert student.config.num_hidden_layers == 1
    assert student.config.id2label == {0: "negative", 1: "positive"}


def test_a_distilled_classifier_reloads_with_load_trained(classifier_teacher, tiny_bert_wide_dir, labels_file,
                                                          tmp_path):
    import tunesmith
    from tunesmith.artifacts import load_trained

    cfg = config(tiny_bert_wide_dir, labels_file, tmp_path / "run",
                 {"type": "distill", "task": "classification", "teacher": str(classifier_teacher)},
                 method={"type": "full"})
    result = tunesmith.train(cfg, echo=quiet)
    assert load_trained(result.run_dir).manifest["auto_class"] == "AutoModelForSequenceClassification"


def test_unlabeled_texts_get_the_kd_term_only(classifier_teacher, tiny_bert_wide_dir, labels_file, tmp_path):
    """A transfer set: the same texts as unlabeled rows or as labelled rows give the same step-1 KD loss, and
    as unlabeled rows they leave the task loss exactly that of the labelled file alone."""
    import tunesmith

    extra = [("a great movie you will like", "positive"), ("terrible and bad", "negative"),
             ("good good good", "positive")]
    unlabeled = write_jsonl(tmp_path / "unlabeled.jsonl", [{"sentence": t} for t, _ in extra])
    together = write_jsonl(tmp_path / "together.jsonl",
                           [{"text": t, "label": y} for t, y in SENTENCES + extra])

    def first_step(train: Path, name: str, **objective) -> tuple[dict, list[str]]:
        lines: list[str] = []
        cfg = config(tiny_bert_wide_dir, train, tmp_path / name,
                     {"type": "distill", "task": "classification", "teacher": str(classifier_teacher),
                      "temperature": 2.0, **objective},
                     model={"init_from_teacher_every": 2}, method={"type": "full"}, training={"batch_size": 64})
        result = tunesmith.train(cfg, echo=lines.append)
        return steps(result.run_dir)[0], lines

    alone, _ = first_step(labels_file, "alone")
    with_unlabeled, lines = first_step(labels_file, "transfer", unlabeled=str(unlabeled))
    all_labelled, _ = first_step(together, "together")
    extras_only, _ = first_step(write_jsonl(tmp_path / "extras.jsonl", [{"text": t, "label": y} for t, y in extra]),
                                "extras")
    assert any(f"{len(SENTENCES) + len(extra)} train (3 of them unlabeled" in line for line in lines), lines
    assert with_unlabeled["task_loss"] == pytest.approx(alone["task_loss"], rel=1e-5)
    assert with_unlabeled["kd_loss"] == pytest.approx(all_labelled["kd_loss"], rel=1e-5)
    # Labelled, the extra rows do carry a task term: the row mean over both files (an identity, where a
    # "differs from" check would hinge on the teacher happening to score the extras unlike the rest).
    n, m = len(SENTENCES), len(extra)
    assert all_labelled["task_loss"] == pytest.approx(
        (n * alone["task_loss"] + m * extras_only["task_loss"]) / (n + m), rel=1e-4)
    assert with_unlabeled["kd_loss"] == pytest.approx(
        (n * alone["kd_loss"] + m * extras_only["kd_loss"]) / (n + m), rel=1e-4)


def test_unlabeled_texts_refused_where_they_have_no_target(tiny_model_dir, sft_file, tmp_path):
    from tunesmith.config import load_config

    base = config(tiny_model_dir, sft_file, tmp_path / "run",
                  {"type": "distill", "teacher": str(tiny_model_dir), "unlabeled": "more.jsonl"})
    with pytest.raises(ConfigError, match="objective.unlabeled: .*task 'sft' reads its targets from the text"):
        load_config(base)
    with pytest.raises(ConfigError, match="objective.unlabeled: with kd_ratio 0"):
        load_config({**base, "objective": {**base["objective"], "task": "classification", "kd_ratio": 0.0}})


def test_a_missing_unlabeled_file_is_named(classifier_teacher, tiny_bert_wide_dir, labels_file, tmp_path):
    import tunesmith
    from tunesmith.errors import DataError

    missing = tmp_path / "nowhere" / "unlabeled.jsonl"
    cfg = config(tiny_bert_wide_dir, labels_file, tmp_path / "run",
                 {"type": "distill", "task": "classification", "teacher": str(classifier_teacher),
                  "unlabeled": str(missing)}, method={"type": "full"})
    with pytest.raises(DataError, match=f"objective.unlabeled: data file not found: {missing}"):
        tunesmith.train(cfg, echo=quiet)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_student_from_teacher_copies_exactly_the_chosen_layers(family):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from tunesmith.models import kept_layers, student_from_teacher

    assert kept_layers(12, 2) == [0, 2, 4, 7, 9, 11]  # DistilBERT's layers of BERT-base
    assert kept_layers(4, 2) == [0, 3] and kept_layers(2, 2) == [0] and kept_layers(3, 1) == [0, 1, 2]
    torch.manual_seed(0)
    if family == "llama":
        teacher = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
        stack = "model.layers"
    else:
        teacher = BertForSequenceClassification(BertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3))
        stack = "bert.encoder.layer"
    student = student_from_teacher(teacher, 2, torch.float32)
    keep = kept_layers(6, 2)
    assert keep == [0, 3, 5]
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith(stack + "."):
            index, _, rest = key[len(stack) + 1:].partition(".")
            source = f"{stack}.{keep[int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_state[source]), key
    assert len(s_state) == len(t_state) - 3 * len([k for k in t_state if k.startswith(f"{stack}.0.")])
    # Copies, not shared tensors; and the layers know their new position (KV cache index).
    assert all(p.data_ptr() != q.data_ptr() for p in student.parameters() for q in teacher.parameters())
    if family == "llama":
        assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
        assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 64, (2, 7))
    assert student(input_ids=ids).logits.shape[-1] == teacher(input_ids=ids).logits.shape[-1]


# --------------------------------------------------------------------------- refused before training


def test_vocabulary_mismatch_is_refused_before_training(tiny_model_dir, sft_file, tmp_path):
    import tunesmith
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    student_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n = len(student_tok)
    # The same tokenizer with a padded output vocabulary.
    padded = tmp_path / "padded"
    student_tok.save_pretrained(padded)
    LlamaForCausalLM(LlamaConfig(vocab_size=n + 64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=3)).save_pretrained(padded)
    # Another tokenizer (more tokens).
    other = tmp_path / "other"
    tok = build_tokenizer(other)
    tok.add_tokens(["zebra", "quokka"])
    tok.save_pretrained(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=3)).save_pretrained(other)

    for teacher, sizes in ((padded, (n + 64, n)), (other, (n + 2, n))):
        out = tmp_path / f"run-{teacher.name}"
        cfg = config(tiny_model_dir, sft_file, out, {"type": "distill", "teacher": str(teacher)})
        with pytest.raises(ConfigError) as err:
            tunesmith.train(cfg, echo=quiet)
        message = str(err.value)
        assert f"{sizes[0]} tokens" in message and f"{sizes[1]}" in message, message
        assert not out.exists(), "refused after the run had started"


def test_label_mismatch_is_refused_before_training(tiny_bert_wide_dir, labels_file, tmp_path):
    import tunesmith
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    teacher = tmp_path / "three-labels"
    AutoTokenizer.from_pretrained(tiny_bert_wide_dir).save_pretrained(teacher)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_bert_wide_dir)), hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, num_labels=3,
    )).save_pretrained(teacher)
    out = tmp_path / "run"
    cfg = config(tiny_bert_wide_dir, labels_file, out,
                 {"type": "distill", "task": "classification", "teacher": str(teacher)}, method={"type": "full"})
    with pytest.raises(ConfigError, match="teacher classifies into 3 labels, the student into 2"):
        tunesmith.train(cfg, echo=quiet)
    assert not out.exists()


def test_config_combinations_refused_before_loading(tiny_model_dir, sft_file, tmp_path):
    import tunesmith
    from tunesmith.config import load_config

    base = config(tiny_model_dir, sft_file, tmp_path / "run", {"type": "distill", "teacher": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match="init_from_teacher_every.*needs objective.type distill"):
        load_config({**base, "objective": {"type": "sft"}, "model": {**base["model"], "init_from_teacher_every": 2}})
    with pytest.raises(ConfigError, match="method.type 'lora' saves weights"):
        load_config({**base, "model": {**base["model"], "init_from_teacher_every": 2}})
    with pytest.raises(ConfigError, match="hidden_weight"):
        tunesmith.train({**base, "objective": {**base["objective"], "hidden_weight": 1.0}}, echo=quiet)
    assert not (tmp_path / "run").exists()


def test_training_without_a_teacher_is_refused(tiny_model_dir, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tunesmith.config import load_config
    from tunesmith.engine import fit
    from tunesmith.objectives import OBJECTIVES
    from transformers import AutoModelForCausalLM

    cfg = load_config(config(tiny_model_dir, tmp_path / "unused.jsonl", tmp_path / "run",
                             {"type": "distill", "teacher": str(tiny_model_dir)}))
    objective = OBJECTIVES["distill"](cfg.objective)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    AcceleratorState._reset_state()
    try:
        with pytest.raises(ConfigError, match="step context holds none"):
            fit(cfg, model, objective, rows, [], lambda r: {}, tmp_path / "run", Accelerator(cpu=True), echo=quiet)
    finally:
        AcceleratorState._reset_state()  # leave no process-wide accelerate settings to later tests


def test_a_teacher_without_the_task_head_is_refused(tiny_model_dir):
    """A plain LM asked to teach classification would get a random classifier: distilling from noise."""
    from tunesmith.errors import ConfigError
    from tunesmith.teacher import load_teacher

    with pytest.raises(ConfigError, match=r"objective.teacher: .* has no trained AutoModelForSequenceClassification "
                                          r"head \(the checkpoint lacks score.weight\)"):
        load_teacher(str(tiny_model_dir), auto_class="AutoModelForSequenceClassification", dtype=torch.float32)
    model, _ = load_teacher(str(tiny_model_dir), auto_class="AutoModelForCausalLM", dtype=torch.float32)
    assert not model.training  # a causal LM teacher has its head (tied embeddings)
