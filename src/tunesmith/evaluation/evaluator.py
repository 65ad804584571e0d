"""Score a loaded model on canonical records: perplexity and generation metrics, batched.

The same functions serve `tunesmith eval`, `tunesmith compare` and the forgetting
measurement during training, so a number means the same thing wherever it appears.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.templates import IGNORE, encode_record, ensure_chat_template, truncate
from ..errors import ConfigError, DataError
from ..scoring import labelled_nll
from . import metrics as M
from .extract import prepare
from .generate import can_generate, generate, is_encoder_decoder, prompt_messages, reference
from .pairs import check_pair_model, check_pair_records, score_pairs, wants_pairs
from .spec import EvalSettings


@dataclass
class EvalResult:
    metrics: dict[str, float]
    examples: list[dict] = field(default_factory=list)
    n: int = 0
    seconds: float = 0.0
    cached: bool = False

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "examples": self.examples, "n": self.n,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict, *, cached: bool = False) -> "EvalResult":
        return cls(data["metrics"], data.get("examples", []), data.get("n", 0), data.get("seconds", 0.0),
                   cached)


def text_windows(tokenizer, text: str, max_length: int) -> list[list[int]]:
    """A long text as consecutive, non-overlapping windows of at most max_length tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1]


def loss_rows(tokenizer, records: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per scored sequence: whole texts, or conversations' answers only."""
    rows: list[tuple[list[int], list[int]]] = []
    for rec in records:
        if "text" in rec:
            rows += [(w, list(w)) for w in text_windows(tokenizer, rec["text"], max_length)]
            continue
        enc = encode_record(tokenizer, rec)
        # Keep the end, where the answer is: a long prompt loses its beginning, not the answer.
        cut = truncate(enc, max_length, "left")
        if cut is not None and cut.n_loss_tokens:
            rows.append((cut.input_ids, cut.labels))
    return rows


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def sequence_nll(model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8
                 ) -> tuple[float, int]:
    """(sum of token NLLs, number of scored tokens) of a causal LM over the rows.

    Token t is scored by the logits at t-1 (the first token of a row has no context, so it
    is not scored); labels equal to -100 are not scored.
    """
    device = _model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        longest = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, : len(x)], labels[j, : len(y)], mask[j, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        nll = labelled_nll(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, labels.to(device))
        total += float(nll.sum())
        count += int(nll.numel())
    return total, count


@torch.no_grad()
def seq2seq_nll(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 8
                ) -> tuple[float, int]:
    """(sum of NLLs, tokens) of the reference answers given the prompts, for encoder-decoders."""
    device = _model_device(model)
    total, count = 0.0, 0
    pairs = [("\n\n".join(m["content"] for m in prompt_messages(r)), reference(r)) for r in records]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        enc = tokenizer([p for p, _ in chunk], text_target=[a for _, a in chunk], return_tensors="pt",
                        padding=True, truncation=True, max_length=max_length)
        labels = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, IGNORE)
        out = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    labels=labels.to(device))
        keep = labels != IGNORE
        total += float(F.cross_entropy(out.logits[keep.to(device)].float(), labels[keep].to(device),
                                       reduction="sum"))
        count += int(keep.sum())
    return total, count


def perplexity(model, tokenizer, records: list[dict], *, max_length: int = 1024, batch_size: int = 8
               ) -> tuple[float, float, int]:
    """(perplexity, mean NLL, scored tokens): exp of the token-weighted mean NLL."""
    was_training = model.training
    model.eval()
    try:
        if is_encoder_decoder(model):
            plain = next((i for i, r in enumerate(records) if "messages" not in r), None)
            if plain is not None:  # an encoder-decoder scores an answer given its prompt
                raise DataError(f"record {plain} is plain text: perplexity of an encoder-decoder "
                                f"({type(model).__name__}) needs prompt/answer records (chat, alpaca or "
                                "prompt_completion data)")
            total, count = seq2seq_nll(model, tokenizer, records, max_length, batch_size)
        else:
            ensure_chat_template(tokenizer)
            rows = loss_rows(tokenizer, records, max_length)
            total, count = sequence_nll(model, rows, tokenizer.pad_token_id, batch_size)
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("perplexity: no tokens to score (empty texts or answers)")
    nll = total / count
    return math.exp(min(nll, 100.0)), nll, count


def check_records(records: list[dict], settings: EvalSettings, where: str) -> None:
    """Generation metrics need conversations with a reference answer to compare against; pair
    metrics need preference pairs."""
    check_pair_records(records, settings, where)
    if not M.needs_generation(settings.metrics):
        return
    gen = [m for m in settings.metrics if M.METRICS[m].needs == "generation"]
    for i, rec in enumerate(records):
        if "messages" not in rec:
            raise DataError(
                f"{where}: record {i} is plain text; metrics {gen} need prompt/answer pairs "
                f"(chat, alpaca or prompt_completion data). Plain text supports only 'perplexity'."
            )
        if rec["messages"][-1]["role"] != "assistant":
            raise DataError(f"{where}: record {i} does not end with an assistant answer to compare against")


def check_model(model, settings: EvalSettings) -> None:
    check_pair_model(model, settings)
    if M.needs_generation(settings.metrics) and not can_generate(model):
        gen = [m for m in settings.metrics if M.METRICS[m].needs == "generation"]
        raise ConfigError(
            f"metrics {gen} need generated text, but {type(model).__name__} cannot generate "
            f"(it is not a causal or seq2seq language model); use 'perplexity' or a generative model"
        )


def evaluate_records(model, tokenizer, records: list[dict], settings: EvalSettings, *,
                     where: str = "data") -> EvalResult:
    """Every metric of `settings` on `records`, with per-example outputs for generation."""
    check_records(records, settings, where)
    check_model(model, settings)
    start = time.perf_counter()
    scores: dict[str, float] = {}
    examples: list[dict] = []
    if "perplexity" in settings.metrics:
        ppl, nll, tokens = perplexity(model, tokenizer, records, max_length=settings.max_length,
                                      batch_size=settings.batch_size)
        scores.update(perplexity=ppl, nll=nll, scored_tokens=tokens)
    if wants_pairs(settings):
        scores.update(score_pairs(model, tokenizer, records, max_length=settings.max_length,
                                  batch_size=settings.batch_size))
    if M.needs_generation(settings.metrics):
        s = settings
        preds = generate(model, tokenizer, [prompt_messages(r) for r in records],
                         max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, do_sample=s.do_sample,
                         temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                         chat_template=s.chat_template and not is_encoder_decoder(model))
        refs = [reference(r) for r in records]
        answers = [prepare(p, s.extract, s.pattern, s.normalize) for p in preds]
        expected = [prepare(r, s.extract, s.pattern, s.normalize) for r in refs]
        for name in s.metrics:
            metric = M.METRICS[name]
            if metric.needs != "generation":
                continue
            scores[name] = M.compute(name, answers, expected) if metric.input == "answer" else \
                M.compute(name, preds, refs)
        for i, (rec, p, r, a, e) in enumerate(zip(records, preds, refs, answers, expected)):
            examples.append({"index": i, "prompt": prompt_messages(rec)[-1]["content"], "reference": r,
                             "prediction": p, "answer": a, "expected": e, "correct": a == e})
    return EvalResult(scores, examples, len(records), time.perf_counter() - start)
