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


@torch.no_grad()
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
    The train/eval mode of the model is restored afterwards.
    """
    seq2seq = is_encoder_decoder(model)
    use_template = (not seq2seq) if chat_template is None else chat_template
    if use_template:
        from ..data.templates import ensure_chat_template

        ensure_chat_template(tokenizer)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    # Decoder-only generation continues from the right edge, so prompts are padded on the left.
    tokenizer.padding_side = "right" if seq2seq else "left"
    outputs: list[str] = []
    if seed is not None and do_sample:
        torch.manual_seed(seed)
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [render_prompt(tokenizer, c, use_template) for c in conversations[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=seq2seq or not use_template)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            kwargs = {"do_sample": do_sample}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
                if top_k is not None:
                    kwargs["top_k"] = top_k
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
            new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and surrounding space: 'Positive.' == 'positive'."""
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)
