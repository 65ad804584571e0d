"""Render canonical records to token ids with loss labels.

Conversations use the tokenizer's chat template (or a ChatML fallback when it has none).
Which tokens carry loss is found from character spans of the rendered text: the span of
each assistant turn is the difference between the conversation rendered up to that turn
and the same prefix rendered with the generation prompt. The end-of-turn marker is part
of the span, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100

# ChatML, for tokenizers that ship no template of their own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer a template when it has none; returns True when the fallback was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _generation_prompt(tokenizer) -> str:
    """The text the template adds to open an assistant turn (ChatML: '<|im_start|>assistant\\n')."""
    probe = [{"role": "user", "content": "x"}]
    plain = _render(tokenizer, probe)
    opened = _render(tokenizer, probe, generation_prompt=True)
    return opened[len(plain):] if opened.startswith(plain) else ""


_PROBE = "tunesmith-closing-probe"


def _closing(tokenizer) -> str:
    """The text the template writes after an assistant turn's content (ChatML: '<|im_end|>\n'); empty
    when the template will not render the probe."""
    try:
        text = _render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}])
    except Exception:  # a template with rules of its own (roles, markers) refusing the probe: no closing to add
        return ""
    at = text.rfind(_PROBE)
    return text[at + len(_PROBE):] if at >= 0 else ""


def turn_end_ids(tokenizer) -> list[int]:
    """The token ids the chat template writes after an assistant turn's content (ChatML: `<|im_end|>`,
    then `\n`); empty when it writes none. A generated answer stops at the first of them."""
    closing = _closing(tokenizer)
    return tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else []


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn."""
    full = _render(tokenizer, messages)
    spans = []
    cursor = 0
    closing = None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            # Past this turn's text: an answer is never looked for inside an earlier turn (the fallback below).
            # Not past a system prompt: some templates move it into the last user turn (Mistral v0.3).
            at = full.find(message["content"], cursor) if message["content"] and message["role"] != "system" else -1
            if at >= 0:
                cursor = at + len(message["content"])
            continue
        upto = _render(tokenizer, messages[: i + 1])
        if i:
            prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        else:
            # Nothing precedes a leading assistant turn, so there is no prefix to render with
            # the generation prompt; cut after the assistant header instead of learning it.
            header = _generation_prompt(tokenizer)
            at = upto.find(header) if header else -1
            prefix = upto[: at + len(header)] if at >= 0 else ""
        if full.startswith(upto) and upto.startswith(prefix):
            start, end = len(prefix), len(upto)
        else:
            # Templates that render a turn differently once later turns follow it (an empty think block on
            # the last answer only, a system prompt moved to the last user turn): locate the content after
            # the turns before it, and learn the turn's closing (its end-of-turn marker) with it.
            start = full.find(message["content"], cursor)
            if start < 0:
                continue
            end = start + len(message["content"])
            closing = _closing(tokenizer) if closing is None else closing
            if closing and full.startswith(closing, end):
                end += len(closing)
        spans.append((start, end))
        cursor = end
    return full, spans


def encode_record(tokenizer, record: dict, *, train_on_prompt: bool = False) -> Encoded:
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return Encoded(ids, list(ids))
    full, spans = assistant_spans(tokenizer, record["messages"])
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        return Encoded(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(a <= s < b for a, b in spans):
            labels[t] = ids[t]
    return Encoded(ids, labels)


def truncate(enc: Encoded, max_length: int, policy: str) -> Encoded | None:
    """Apply the truncation policy; None means drop the example."""
    if len(enc.input_ids) <= max_length:
        return enc
    if policy == "drop":
        return None
    if policy == "left":
        return Encoded(enc.input_ids[-max_length:], enc.labels[-max_length:])
    return Encoded(enc.input_ids[:max_length], enc.labels[:max_length])
