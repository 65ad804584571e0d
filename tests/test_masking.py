"""Which tokens carry loss: exactly the assistant turns (with their end-of-turn marker)."""

from __future__ import annotations

import copy

import pytest

from tunesmith.data.templates import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE,
    encode_record,
    ensure_chat_template,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    # A private copy: setting the template must not leak into the session-wide tokenizer.
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not t.chat_template
    assert ensure_chat_template(t) is True
    assert t.chat_template == FALLBACK_CHAT_TEMPLATE
    assert ensure_chat_template(t) is False  # an existing template is kept
    return t


def learned_spans(tok, enc) -> list[str]:
    """Decode each maximal run of loss-carrying tokens."""
    spans, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token  # labels are the token itself; the shift happens in the loss
            current.append(token)
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


# The ChatML fallback closes every turn with '<|im_end|>\n'; the whole closing belongs to the
# assistant span (render up to the turn minus the generation prompt), newline included.
END = "<|im_end|>\n"


def test_single_turn_learns_only_the_answer_and_end_marker(tok):
    rec = {"messages": [{"role": "user", "content": "what is the capital of france"},
                        {"role": "assistant", "content": "paris"}]}
    enc = encode_record(tok, rec)
    assert learned_spans(tok, enc) == ["paris" + END]
    # The full sequence is the rendered conversation, nothing more.
    assert tok.decode(enc.input_ids) == (
        "<|im_start|>user\nwhat is the capital of france<|im_end|>\n"
        "<|im_start|>assistant\nparis<|im_end|>\n"
    )
    assert enc.labels[enc.input_ids.index(tok.convert_tokens_to_ids("<|im_end|>"))] == IGNORE


def test_multi_turn_masks_every_user_and_system_turn(tok):
    rec = {"messages": [
        {"role": "system", "content": "you are good"},
        {"role": "user", "content": "what is the capital of france"},
        {"role": "assistant", "content": "paris"},
        {"role": "user", "content": "and the sky"},
        {"role": "assistant", "content": "blue sky"},
    ]}
    enc = encode_record(tok, rec)
    assert learned_spans(tok, enc) == ["paris" + END, "blue sky" + END]
    masked = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE])
    assert masked == (
        "<|im_start|>system\nyou are good<|im_end|>\n"
        "<|im_start|>user\nwhat is the capital of france<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<|im_start|>user\nand the sky<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, lab in zip(enc.input_ids, enc.labels) if t == im_end and lab != IGNORE) == 2


def learned_under(tok, template: str, *turns: tuple[str, str]) -> list[str]:
    """The learned spans of a conversation of (role, content) turns under another chat template."""
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return learned_spans(tok, encode_record(tok, {"messages": [{"role": r, "content": c} for r, c in turns]}))


def test_a_template_that_renders_the_last_answer_differently_still_masks_by_turn(tok):
    """Qwen3-style: only the final answer gets an (empty) think block, so earlier answers are located in the
    text; the search starts after the turns before them (the user's 'yes' is not the answer 'yes') and
    learns the turn's end marker too."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
        "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    first, last = learned_under(tok, template, ("user", "is the sky blue yes or no"), ("assistant", "yes"),
                                ("user", "and the sea"), ("assistant", "blue"))
    assert first == "yes" + END  # was the user's 'yes', without the end marker
    assert last.endswith("blue" + END) and "sky" not in last + first  # the final turn as the template renders it


def test_a_template_that_moves_the_system_prompt_to_the_last_user_turn_still_learns_every_answer(tok):
    """Mistral v0.3 style: the system prompt is written into the last user turn, after the earlier answers;
    an answer is still found after the user turn before it."""
    template = (
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
        "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + (sys + ' ' if loop.index0 == ns.last and sys else '') + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    assert learned_under(tok, template, ("system", "you answer with one word"), ("user", "what color is the sky"),
                         ("assistant", "blue"), ("user", "and the sea"), ("assistant", "green")) == ["blue" + END,
                                                                                                  "green" + END]


def test_train_on_prompt_learns_every_token(tok):
    rec = {"messages": [{"role": "user", "content": "what color is the sky"},
                        {"role": "assistant", "content": "blue"}]}
    enc = encode_record(tok, rec, train_on_prompt=True)
    assert enc.labels == enc.input_ids
    assert enc.n_loss_tokens == len(enc.input_ids)
    # Same tokens as with masking; only the labels differ.
    assert encode_record(tok, rec).input_ids == enc.input_ids


def test_plain_text_learns_all_tokens_and_eos(tok):
    enc = encode_record(tok, {"text": "the sky is blue"})
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids) == "the sky is blue<|im_end|>"
    # An eos already present is not doubled.
    again = encode_record(tok, {"text": "the sky is blue<|im_end|>"})
    assert again.input_ids == enc.input_ids


def test_leading_assistant_turn_does_not_learn_its_header(tok):
    # ShareGPT data sometimes opens with a greeting from the model.
    rec = {"messages": [{"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "what color is the sky"},
                        {"role": "assistant", "content": "blue"}]}
    assert learned_spans(tok, encode_record(tok, rec)) == ["hello" + END, "blue" + END]


# Qwen-style: a default system turn is injected when the conversation has none.
INJECTING_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are good<|im_end|>\n' }}{% endif %}" + FALLBACK_CHAT_TEMPLATE
)


@pytest.mark.parametrize("first", ["user", "assistant"])
def test_template_with_default_system_turn(tiny_model_dir, first):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = INJECTING_TEMPLATE
    assert ensure_chat_template(t) is False
    msgs = [{"role": "user", "content": "is this movie good"},
            {"role": "assistant", "content": "positive"}]
    if first == "assistant":
        msgs.insert(0, {"role": "assistant", "content": "hello"})
    enc = encode_record(t, {"messages": msgs})
    expected = (["hello" + END] if first == "assistant" else []) + ["positive" + END]
    assert learned_spans(t, enc) == expected
    assert t.decode(enc.input_ids).startswith("<|im_start|>system\nyou are good<|im_end|>\n")
