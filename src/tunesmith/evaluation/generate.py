"""Batched generation with the model's chat template."""

from __future__ import annotations

import re

import torch


def prompt_messages(record: dict) -> list[dict]:
    """A canonical conversation without its final assistant turn: what the model must answer."""
    messages = record["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def reference(record: dict) -> str:
    messages = record["messages"]
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def can_generate(model) -> bool:
    """Whether `model.generate` produces text (a causal or seq2seq LM, not a classifier head)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    check = getattr(inner, "can_generate", None)
    return hasattr(model, "generate") and (check() if callable(check) else True)


def render_prompt(tokenizer, conversation: list[dict], chat_template: bool) -> str:
    if chat_template:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # No template (seq2seq models, base models): the turns' text, as T5-style models expect.
    return "\n\n".join(m["content"] for m in conversation)


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    chat_template: bool | None = None,
) -> list[str]:
    """Answers to each conversation, decoded without special tokens.

    chat_template None: use it for decoder-only models, plain text for encoder-decoders.
    The train/eval mode of the model is restored afterwards (generation.generate_ids).
    """
    from ..generation import generate_ids

    seq2seq = is_encoder_decoder(model)
    use_template = (not seq2seq) if chat_template is None else chat_template
    if use_template:
        from ..data.templates import ensure_chat_template

        ensure_chat_template(tokenizer)
    texts = [render_prompt(tokenizer, c, use_template) for c in conversations]
    prompts = tokenizer(texts, add_special_tokens=seq2seq or not use_template)["input_ids"]
    if seed is not None and do_sample:
        torch.manual_seed(seed)
    out = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
    return [t.strip() for t in tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)]


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and surrounding space: 'Positive.' == 'positive'."""
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)
