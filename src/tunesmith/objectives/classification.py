"""Classification: one label per sequence, or one BIO tag per word (NER).

Label names come from the data (sorted; numerically when every label is an integer id) or
from `objective.labels`, which fixes their order. They reach the model as num_labels,
id2label and label2id, so a saved model's config.json names its classes, and the run's
tunesmith.json lists them too.

Loss: cross-entropy summed over the items (sequences, or labelled words) and divided by
their number by the engine. With class weights, item i counts w[y_i] times, and the sum is
still divided by the number of items (not by the sum of weights): with `balanced` weights
(n_items / (n_classes * n_items_of_class)) the mean weight over the training items is 1,
so the loss keeps the scale of the unweighted one. Eval loss is always unweighted, so it
stays a plain negative log-likelihood that compares across runs.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig, ObjectiveConfig
from ..data.templates import IGNORE
from ..errors import ConfigError, DataError
from .base import LossOutput, Objective, StepContext, TaskInfo
from .truncation import tokenize_truncated

WEIGHTS_KEY = "class_weights"


def _sorted_labels(names: set[str]) -> list[str]:
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)  # label ids 0..9, 10 — not "10" before "2"
    return sorted(names)


def _short(text: str, limit: int = 50) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_labels(found: Counter, cfg: ObjectiveConfig, what: str) -> list[str]:
    if cfg.labels is None:
        return _sorted_labels(set(found))
    if len(set(cfg.labels)) != len(cfg.labels):
        raise ConfigError(f"objective.labels: names repeat: {cfg.labels}")
    unknown = [n for n in found if n not in cfg.labels]
    if unknown:
        raise DataError(
            f"the data holds {what} {', '.join(repr(u) for u in sorted(unknown))} not listed in objective.labels "
            f"{cfg.labels}; add them, or fix the data"
        )
    return list(cfg.labels)


def class_weights(found: Counter, labels: list[str], cfg: ObjectiveConfig) -> list[float] | None:
    spec = cfg.class_weights
    if spec is None:
        return None
    if spec == "balanced":
        total = sum(found.values())
        # A class absent from the data gets weight 0: no item of it is ever weighted anyway.
        return [total / (len(labels) * found[n]) if found[n] else 0.0 for n in labels]
    if len(spec) != len(labels):
        raise ConfigError(
            f"objective.class_weights: {len(spec)} weights for {len(labels)} labels {labels}; "
            "give one weight per label, in that order (or 'balanced')"
        )
    if any(w < 0 for w in spec):
        raise ConfigError(f"objective.class_weights: weights must not be negative, got {spec}")
    return [float(w) for w in spec]


def label_kwargs(task: TaskInfo) -> dict:
    if not task.labels:
        raise ConfigError("classification needs label names (from the training data or objective.labels)")
    return {"num_labels": task.num_labels, "id2label": dict(enumerate(task.labels)),
            "label2id": {n: i for i, n in enumerate(task.labels)}}


def label_id(task: TaskInfo, name: str, record_hint: str) -> int:
    try:
        return task.labels.index(name)
    except ValueError:
        raise DataError(
            f"label '{name}' ({record_hint}) is not one of the labels the model learns: {task.labels} "
            "(from the training data or objective.labels)"
        ) from None


def _pad_ids(rows: list[dict], key: str, pad: int) -> torch.Tensor:
    longest = max(len(r["input_ids"]) for r in rows)
    return torch.tensor([r[key] + [pad] * (longest - len(r[key])) for r in rows])


def encoder_inputs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids padded on the right, attention_mask, and token_type_ids when the rows have them."""
    batch = {"input_ids": _pad_ids(rows, "input_ids", pad_token_id)}
    longest = batch["input_ids"].shape[1]
    batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"]))
                                            for r in rows])
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = _pad_ids(rows, "token_type_ids", 0)
    return batch


def labelled_task(found: Counter, labels: list[str], cfg: ObjectiveConfig) -> TaskInfo:
    """The task's label names, with class weights (from the training label counts) when asked for."""
    task = TaskInfo(labels)
    weights = class_weights(found, labels, cfg)
    if weights is not None:
        task.extra[WEIGHTS_KEY] = weights
    return task


def model_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Exactly these inputs: linear-probe wrappers and peft prompt methods rely on this call.
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return model(**inputs).logits


def weighted_ce_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy summed over the items; items labelled IGNORE (a distillation transfer set's) add nothing."""
    keep = labels != IGNORE
    if not bool(keep.all()):
        logits, labels = logits[keep], labels[keep]
    per_item = F.cross_entropy(logits.float(), labels, reduction="none")
    if weights is not None:
        per_item = per_item * weights[labels]
    return per_item.sum()


SEQUENCE_END = -1  # separates rows in token classification's gathered predictions


def accuracy_and_macro_f1(predictions: torch.Tensor, references: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    y_pred, y_true = predictions.numpy(), references.numpy()
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


class _Collator:
    def __init__(self, pad_token_id: int, label_pad: int, weights: list[float] | None, per_token: bool):
        self.pad_token_id, self.label_pad, self.per_token = pad_token_id, label_pad, per_token
        self.weights = torch.tensor(weights, dtype=torch.float32) if weights is not None else None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = encoder_inputs(rows, self.pad_token_id)
        if self.per_token:
            batch["labels"] = _pad_ids(rows, "labels", IGNORE)
        else:
            batch["labels"] = torch.tensor([r["label"] for r in rows])
        if self.weights is not None:
            # Travels with the batch (the objective is shared and stateless); the loss reads it.
            batch[WEIGHTS_KEY] = self.weights
        return batch


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ConfigError("classification needs a tokenizer with a pad token (models.load_tokenizer sets one)")
    return tokenizer.pad_token_id


class SequenceClassification(Objective):
    """One label per text (or text pair); the model's sequence-classification head.

    Decoder models classify from each row's last real token: transformers finds it through
    config.pad_token_id (set from the tokenizer at load), which works with right padding.
    """

    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    formats = ("text_label",)

    def prepare(self, records: list[dict], cfg: ObjectiveConfig) -> TaskInfo:
        found = Counter(str(r["label"]) for r in records)
        labels = resolve_labels(found, cfg, "labels")
        if len(labels) < 2:
            counts = ", ".join(f"'{k}': {v} rows" for k, v in found.most_common())
            raise DataError(f"classification needs at least two labels; the data holds only {labels} ({counts})")
        return labelled_task(found, labels, cfg)

    def model_kwargs(self, cfg: ObjectiveConfig, task: TaskInfo, tokenizer) -> dict:
        return label_kwargs(task)

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        label = label_id(task, str(record["label"]), f"text '{_short(record['text'])}'")
        enc, truncated = tokenize_truncated(tokenizer, data, record["text"], record.get("text_pair"))
        if enc is None:
            return None, False
        row = {"input_ids": enc["input_ids"], "label": label}
        if "token_type_ids" in enc:
            row["token_type_ids"] = enc["token_type_ids"]
        return row, truncated

    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool) -> Callable:
        weights = task.extra.get(WEIGHTS_KEY) if train else None
        return _Collator(_pad_id(tokenizer), IGNORE, weights, per_token=False)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        logits = model_logits(ctx.policy, batch)
        labels = batch["labels"]
        loss_sum = weighted_ce_sum(logits, labels, batch.get(WEIGHTS_KEY))
        return LossOutput(loss_sum, int(labels.shape[0]), logits.argmax(-1), labels)

    def metrics(self, predictions: torch.Tensor, references: torch.Tensor,
                label_names: list[str] | None = None) -> dict[str, float]:
        return accuracy_and_macro_f1(predictions, references)


def align_word_labels(tokenizer, words: list[str], tags: list[int], data: DataConfig) -> tuple[dict | None, bool]:
    """Token ids with each word's tag on its first sub-token and IGNORE elsewhere.

    The words are joined with spaces and tokens are matched to words by character offsets,
    rather than passing pre-split words (is_split_into_words): byte-level BPE tokenizers
    would then encode every word without its leading space — unlike the running text the
    model was trained on — unless rebuilt with add_prefix_space. Offsets work the same for
    WordPiece, SentencePiece and byte-level BPE.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("token_classification needs a fast (Rust) tokenizer: it aligns words by character offsets")
    spans, at = [], 0
    for w in words:
        spans.append((at, at + len(w)))
        at += len(w) + 1
    enc, truncated = tokenize_truncated(tokenizer, data, " ".join(words), return_offsets_mapping=True)
    if enc is None:
        return None, False
    labels, seen, w = [], set(), 0
    for start, end in enc["offset_mapping"]:
        if end <= start:  # special tokens have empty spans
            labels.append(IGNORE)
            continue
        while w < len(spans) - 1 and start >= spans[w][1]:
            w += 1
        # Offsets may include the space before a word (byte-level BPE without trimming).
        if not (start < spans[w][1] and end > spans[w][0]):
            labels.append(IGNORE)
            continue
        labels.append(IGNORE if w in seen else tags[w])
        seen.add(w)
    row = {"input_ids": enc["input_ids"], "labels": labels}
    if "token_type_ids" in enc:
        row["token_type_ids"] = enc["token_type_ids"]
    return row, truncated


class TokenClassification(Objective):
    """One tag per word (BIO named entities); the loss and metrics count each word once,
    on its first sub-token. Metrics are word-level accuracy and macro-F1 over tags, plus
    entity-level precision/recall/F1 (CoNLL rules, seqeval) when the tags are BIO."""

    name = "token_classification"
    auto_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    formats = ("tokens",)

    def prepare(self, records: list[dict], cfg: ObjectiveConfig) -> TaskInfo:
        found = Counter(t for r in records for t in r["tags"])
        return labelled_task(found, resolve_labels(found, cfg, "tags"), cfg)

    def model_kwargs(self, cfg: ObjectiveConfig, task: TaskInfo, tokenizer) -> dict:
        return label_kwargs(task)

    def encode(self, tokenizer, record: dict, data: DataConfig, task: TaskInfo) -> tuple[dict | None, bool]:
        hint = f"words '{_short(' '.join(record['tokens']))}'"
        tags = [label_id(task, t, hint) for t in record["tags"]]
        row, truncated = align_word_labels(tokenizer, record["tokens"], tags, data)
        if row is None or all(x == IGNORE for x in row["labels"]):
            return None, truncated
        return row, truncated

    def collator(self, tokenizer, cfg: ObjectiveConfig, task: TaskInfo, *, train: bool) -> Callable:
        weights = task.extra.get(WEIGHTS_KEY) if train else None
        return _Collator(_pad_id(tokenizer), IGNORE, weights, per_token=True)

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> LossOutput:
        logits = model_logits(ctx.policy, batch)
        labels = batch["labels"]
        # Prompt methods may prepend virtual tokens to the logits; keep the real positions.
        logits = logits[:, -labels.shape[1]:]
        mask = labels != IGNORE
        picked, gold = logits[mask], labels[mask]
        loss_sum = weighted_ce_sum(picked, gold, batch.get(WEIGHTS_KEY))
        # Each row's labelled tokens followed by SEQUENCE_END, so entity metrics can tell the
        # rows apart once the eval loop has concatenated every batch.
        end = torch.full_like(labels[:, :1], SEQUENCE_END)
        keep = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        predicted = torch.cat([logits.argmax(-1), end], dim=1)[keep]
        return LossOutput(loss_sum, int(mask.sum()), predicted, torch.cat([labels, end], dim=1)[keep])

    def metrics(self, predictions: torch.Tensor, references: torch.Tensor,
                label_names: list[str] | None = None) -> dict[str, float]:
        tokens = references != SEQUENCE_END
        scores = accuracy_and_macro_f1(predictions[tokens], references[tokens])
        if label_names and any(n[:2] in ("B-", "I-") for n in label_names):
            scores.update(entity_scores(predictions, references, label_names))
        return scores


def entity_scores(predictions: torch.Tensor, references: torch.Tensor, label_names: list[str]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL rules) over BIO tag sequences.

    An entity counts only when its type and both boundaries match; token accuracy alone
    rewards predicting `O` everywhere.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    def sequences(ids: torch.Tensor) -> list[list[str]]:
        out, current = [], []
        for i in ids.tolist():
            if i == SEQUENCE_END:
                out.append(current)
                current = []
            else:
                current.append(label_names[i])
        return out

    y_true, y_pred = sequences(references), sequences(predictions)
    return {"entity_precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "entity_recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "entity_f1": float(f1_score(y_true, y_pred, zero_division=0))}
