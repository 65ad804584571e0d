"""Metrics against hand-computed values, answer extraction and normalization, perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation import metrics as M
from tunesmith.evaluation.evaluator import evaluate_records, perplexity
from tunesmith.evaluation.extract import canonical_number, check_extraction, extract_answer, normalize, prepare
from tunesmith.evaluation.spec import EvalSettings


# --- metrics -------------------------------------------------------------------------------

def test_accuracy_three_of_four():
    assert M.compute("accuracy", ["a", "b", "c", "d"], ["a", "b", "c", "x"]) == pytest.approx(0.75)


def test_macro_f1_of_a_small_confusion():
    # refs a a b b, preds a b b b: class a P=1 R=1/2 F=2/3; class b P=2/3 R=1 F=4/5 -> mean 11/15
    assert M.compute("macro_f1", ["a", "b", "b", "b"], ["a", "a", "b", "b"]) == pytest.approx(11 / 15)


def test_macro_f1_counts_off_label_answers_as_misses_not_classes():
    # An answer outside the reference labels lowers recall of the true class only:
    # a: P=1 R=1/2 F=2/3; b: P=1 R=1 F=1 -> 5/6 (a spurious third class would give 5/9).
    assert M.compute("macro_f1", ["a", "junk", "b", "b"], ["a", "a", "b", "b"]) == pytest.approx(5 / 6)


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    assert M.compute("bleu", refs, refs) == pytest.approx(100.0)
    assert M.compute("bleu", ["zz yy xx ww vv uu"] * 2, refs) == pytest.approx(0.0)


def test_chrf_hand_computed():
    # char n-gram P = R per order: 1: 3/4, 2: 2/3, 3: 1/2, 4: 0 (5, 6: no n-grams) -> mean 23/48
    assert M.compute("chrf", ["abcd"], ["abce"]) == pytest.approx(100 * 23 / 48)
    assert M.compute("chrf", ["the cat"], ["the cat"]) == pytest.approx(100.0)


def test_rouge_known_pair():
    pred, ref = ["the cat sat on the mat"], ["the cat is on the mat"]
    assert M.compute("rougeL", pred, ref) == pytest.approx(5 / 6)  # LCS 'the cat on the mat'
    assert M.compute("rouge1", pred, ref) == pytest.approx(5 / 6)
    assert M.compute("rouge2", pred, ref) == pytest.approx(3 / 5)  # the cat, on the, the mat



def test_rouge_scores_any_script_and_english_as_rouge_score_does():
    # rouge-score's tokenizer keeps [a-z0-9] only: these scored 0.
    assert M.compute("rougeL", ["Москва столица России"], ["Столица России Москва"]) == pytest.approx(2 / 3)
    assert M.compute("rouge1", ["今天天气很好"], ["今天天气不好"]) == pytest.approx(5 / 6)  # one character each
    from rouge_score import rouge_scorer

    pairs = [("The runners didn't stop running, did they?", "the runner did not stop"), ("a b_c 42", "A B C 42")]
    for pred, ref in pairs:
        for kind in ("rouge1", "rouge2", "rougeL"):
            want = rouge_scorer.RougeScorer([kind], use_stemmer=True).score(ref, pred)[kind].fmeasure
            assert M.compute(kind, [pred], [ref]) == pytest.approx(want)


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown metric 'exact_mach' — did you mean 'exact_match'.*known: "):
        M.check_metrics(["exact_mach"])
    with pytest.raises(Exception, match="unknown metric 'blue'"):
        EvalSettings(metrics=["blue"])


# --- extraction and normalization -------------------------------------------------------------

def test_gsm8k_extraction_after_hashes_and_fallback_to_last_number():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"
    assert extract_answer(ref, "gsm8k") == "72"
    assert extract_answer("So the total is $1,250.50 dollars.", "gsm8k") == "1,250.50"
    assert extract_answer("#### $1,000.", "gsm8k") == "1,000"
    assert extract_answer("no number here", "gsm8k") == ""
    assert extract_answer("3 apples and 4 pears, 7 in all", "hashes") == ""


def test_last_number_with_commas_decimals_and_signs():
    assert extract_answer("It was 3, then 1,000, then -2.5", "last_number") == "-2.5"
    assert extract_answer("costs 1,234,567 dollars", "last_number") == "1,234,567"


def test_number_normalization():
    assert canonical_number("1,000") == "1000"
    assert canonical_number("5.0") == "5"
    assert canonical_number("-0.50") == "-0.5"
    assert canonical_number("1000.00") == "1000"
    runaway = "1" * 60  # a model that never stops writing digits must not crash the scorer
    assert canonical_number(runaway) == runaway
    assert normalize(f"so {runaway}.0") == f"so {runaway}"
    assert normalize("The answer is $1,000.") == normalize("answer is 1000")
    assert normalize("5.50") == "5.5" and normalize("5.5") != normalize("55")
    assert normalize("-5") != normalize("5")


def test_normalization_options_are_selectable():
    assert normalize("The Paris.", ["lowercase"]) == "the paris."
    assert normalize("The  Paris.", ["lowercase", "punctuation", "articles", "whitespace"]) == "paris"
    assert normalize(" An Apple ", []) == "An Apple"


def test_boxed_extraction_takes_the_last_box_with_nested_braces():
    assert extract_answer(r"first \boxed{3}, finally \boxed{\frac{1}{2}}.", "boxed") == r"\frac{1}{2}"
    assert extract_answer(r"stopped inside \boxed{\frac{1", "boxed") == ""
    assert extract_answer("no box, 42", "boxed") == ""


def test_regex_and_first_line_extraction():
    assert extract_answer("Label: positive\nbecause", "regex", r"Label:\s*(\w+)") == "positive"
    # Alternatives: the group that matched, not group 1 (None when the other alternative matched).
    assert extract_answer("just 42", "regex", r"answer is (\d+)|(\d+)$") == "42"
    assert extract_answer("the answer is 7", "regex", r"answer is (\d+)|(\d+)$") == "7"
    assert extract_answer("\n positive \n more", "first_line") == "positive"
    with pytest.raises(ConfigError, match="needs a pattern"):
        check_extraction("regex")
    with pytest.raises(ConfigError, match="unknown mode 'gsm9k'"):
        check_extraction("gsm9k")
    assert prepare("The answer: 1,000.0", "last_number") == "1000"


def test_exact_match_with_gsm8k_extraction():
    preds = ["48 + 24 = 72 so the answer is 72.", "#### 10", "I think 5", "The result is 1,000"]
    refs = ["... #### 72", "... #### 10", "... #### 6", "... #### 1000"]
    answers = [prepare(p, "gsm8k") for p in preds]
    expected = [prepare(r, "gsm8k") for r in refs]
    assert M.compute("exact_match", answers, expected) == pytest.approx(3 / 4)


# --- perplexity against the model's own logits -----------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def manual_nll(model, ids: list[int], scored: list[bool]) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens_<t) over scored positions, one unbatched forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if scored[t]:
            total -= float(logp[t - 1, ids[t]])
            n += 1
    return total, n


def test_text_perplexity_is_exp_of_token_weighted_mean_nll(tiny_lm, tiny_tokenizer):
    text = "the sky is blue and the water is green. " * 9
    max_length = 16
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * max_length and len(ids) % max_length > 1  # several windows, a ragged last one
    total, n = 0.0, 0
    for i in range(0, len(ids), max_length):
        window = ids[i : i + max_length]
        s, c = manual_nll(tiny_lm, window, [True] * len(window))
        total, n = total + s, n + c
    ppl, nll, tokens = perplexity(tiny_lm, tiny_tokenizer, [{"text": text}], max_length=max_length, batch_size=3)
    assert tokens == n == len(ids) - math.ceil(len(ids) / max_length)
    assert nll == pytest.approx(total / n, rel=1e-5)
    assert ppl == pytest.approx(math.exp(total / n), rel=1e-5)


def test_answer_perplexity_scores_only_the_answer(tiny_lm, tiny_tokenizer):
    from tunesmith.data.templates import IGNORE, encode_record, ensure_chat_template

    tok = tiny_tokenizer
    ensure_chat_template(tok)
    records = [{"messages": [{"role": "user", "content": "what color is the sky"},
                             {"role": "assistant", "content": "blue"}]},
               {"messages": [{"role": "user", "content": "is this movie good"},
                             {"role": "assistant", "content": "positive review"}]}]
    total, n, all_tokens = 0.0, 0, 0
    for r in records:
        enc = encode_record(tok, r)
        s, c = manual_nll(tiny_lm, enc.input_ids, [x != IGNORE for x in enc.labels])
        total, n, all_tokens = total + s, n + c, all_tokens + len(enc.input_ids)
    ppl, _, tokens = perplexity(tiny_lm, tok, records, max_length=128, batch_size=2)
    assert 0 < tokens == n < all_tokens / 2
    assert ppl == pytest.approx(math.exp(total / n), rel=1e-5)


def test_generation_metrics_refuse_plain_text_records(tiny_lm, tiny_tokenizer):
    with pytest.raises(DataError, match="plain text; metrics \\['exact_match'\\]"):
        evaluate_records(tiny_lm, tiny_tokenizer, [{"text": "hello"}], EvalSettings(metrics=["exact_match"]))


def test_generation_metrics_refuse_a_model_that_cannot_generate(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    clf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    rec = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(ConfigError, match="cannot generate"):
        evaluate_records(clf, tiny_tokenizer, rec, EvalSettings(metrics=["exact_match"]))


def test_evaluate_records_generates_and_restores_train_mode(tiny_lm, tiny_tokenizer):
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in [("what is the capital of france", "paris"), ("what color is the sky", "blue")]]
    tiny_lm.train()
    settings = EvalSettings(metrics=["perplexity", "exact_match", "chrf"], max_new_tokens=3, batch_size=2)
    result = evaluate_records(tiny_lm, tiny_tokenizer, records, settings)
    assert tiny_lm.training
    tiny_lm.eval()
    assert set(result.metrics) >= {"perplexity", "exact_match", "chrf"}
    assert [e["reference"] for e in result.examples] == ["paris", "blue"]
    # The reported score is the metric of the per-example outputs it reports.
    preds = [e["prediction"] for e in result.examples]
    assert result.metrics["chrf"] == pytest.approx(M.compute("chrf", preds, ["paris", "blue"]))
    assert result.metrics["exact_match"] == sum(e["correct"] for e in result.examples) / 2


def test_seq2seq_model_generates_without_template_and_scores_answers(tiny_tokenizer):
    """Encoder-decoder models: prompt text in, answer out; perplexity of the answer tokens."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
    model.eval()  # no dropout in the hand computation below
    records = [{"messages": [{"role": "user", "content": "what color is the sky"},
                             {"role": "assistant", "content": "blue"}]},
               {"messages": [{"role": "user", "content": "is this movie good"},
                             {"role": "assistant", "content": "positive review"}]}]
    result = evaluate_records(model, tok, records, EvalSettings(metrics=["perplexity", "exact_match"],
                                                                max_new_tokens=3, batch_size=2))
    total, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            x = tok(r["messages"][0]["content"], return_tensors="pt")["input_ids"]
            y = tok(r["messages"][1]["content"], return_tensors="pt")["input_ids"]
            out = model(input_ids=x, labels=y)
            total, n = total + float(out.loss) * y.shape[1], n + y.shape[1]
    assert result.metrics["scored_tokens"] == n
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert len(result.examples) == 2 and all(isinstance(e["prediction"], str) for e in result.examples)
    # Plain text has no answer to score given a prompt: a DataError naming the record, not a KeyError.
    from tunesmith.evaluation.evaluator import perplexity

    with pytest.raises(DataError, match="record 1 is plain text: perplexity of an encoder-decoder"):
        perplexity(model, tok, [records[0], {"text": "plain text"}])
