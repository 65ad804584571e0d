"""The metric registry: name -> a function of (predictions, references).

Scores come from the libraries everyone cites (scikit-learn, sacrebleu, rouge-score), so a
number tunesmith reports is the number a paper would report. `perplexity` is the one metric
that needs the model's losses instead of generated text; the evaluator computes it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Metric:
    name: str
    needs: str  # "generation", "loss" or "pairs"
    # "answer": compares extracted + normalized answers; "text": the raw generated text.
    input: str
    higher_is_better: bool
    scale: float  # best possible value, for display (1.0 for fractions, 100 for BLEU/chrF)
    fn: Callable[[list[str], list[str]], float] | None
    help: str


def _accuracy(predictions: list[str], references: list[str]) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(references, predictions))


def _macro_f1(predictions: list[str], references: list[str]) -> float:
    from sklearn.metrics import f1_score

    # Only the labels of the references count as classes: an off-label answer ("I think
    # it is good") is a miss for the true class, not a new class that would dilute the mean.
    labels = sorted(set(references))
    return float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0))


def _bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def _chrf(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(predictions, [references]).score)


# Letters and digits of any script; CJK and kana / hangul syllables one token per character (no spaces
# to split on). rouge-score's own tokenizer keeps [a-z0-9] only: every non-Latin text scored 0.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class _UnicodeTokenizer:
    """rouge-score's tokenization (lowercase, Porter stems of ASCII words over 3 letters) for any script."""

    def __init__(self):
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN.findall(text.lower())
        return [self.stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


def _rouge(kind: str) -> Callable[[list[str], list[str]], float]:
    def score(predictions: list[str], references: list[str]) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([kind], tokenizer=_UnicodeTokenizer())
        values = [scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, references)]
        return float(sum(values) / max(len(values), 1))

    return score


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("perplexity", "loss", "text", False, 0.0, None,
           "exp of the token-weighted mean NLL of the reference answers (or texts)"),
    Metric("exact_match", "generation", "answer", True, 1.0, _accuracy,
           "share of answers equal to the reference after extraction and normalization"),
    Metric("accuracy", "generation", "answer", True, 1.0, _accuracy,
           "scikit-learn accuracy over extracted, normalized labels"),
    Metric("macro_f1", "generation", "answer", True, 1.0, _macro_f1,
           "scikit-learn macro-F1 over the reference labels"),
    Metric("bleu", "generation", "text", True, 100.0, _bleu, "sacrebleu corpus BLEU (0-100)"),
    Metric("chrf", "generation", "text", True, 100.0, _chrf, "sacrebleu corpus chrF (0-100)"),
    Metric("rouge1", "generation", "text", True, 1.0, _rouge("rouge1"), "rouge-score ROUGE-1 F1, mean"),
    Metric("rouge2", "generation", "text", True, 1.0, _rouge("rouge2"), "rouge-score ROUGE-2 F1, mean"),
    Metric("rougeL", "generation", "text", True, 1.0, _rouge("rougeL"), "rouge-score ROUGE-L F1, mean"),
    # Preference data scored by a reward model (evaluation/pairs.py).
    Metric("pair_accuracy", "pairs", "pairs", True, 1.0, None,
           "share of preference pairs whose chosen answer a reward model scores above the rejected one"),
    Metric("pair_margin", "pairs", "pairs", True, 0.0, None, "mean reward of chosen minus rejected answers"),
)}


def check_metrics(names: list[str]) -> list[str]:
    """The names, validated; raises ConfigError naming the known metrics."""
    if not names:
        raise ConfigError(f"no metrics given (known: {', '.join(METRICS)})")
    for name in names:
        if name not in METRICS:
            hint = difflib.get_close_matches(name, list(METRICS), n=1)
            suggestion = f" — did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown metric '{name}'{suggestion} (known: {', '.join(METRICS)})")
    return list(dict.fromkeys(names))


def needs_generation(names: list[str]) -> bool:
    return any(METRICS[n].needs == "generation" for n in names)


def compute(name: str, predictions: list[str], references: list[str]) -> float:
    metric = METRICS[name]
    if metric.fn is None:
        raise ConfigError(f"metric '{name}' is computed from model losses, not from text")
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(references)} references")
    return metric.fn(predictions, references)
