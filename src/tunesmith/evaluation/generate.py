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
) -> list[str]:
    """Answers to each conversation, decoded without special tokens."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    outputs: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in conversations[i : i + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            kwargs = {"do_sample": do_sample}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return outputs


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and surrounding space: 'Positive.' == 'positive'."""
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)
