"""The data-format registry: detect a format from columns and normalize rows.

Every format maps a raw row to one canonical record:
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (conversations)
  {"text": str}                                                            (plain text)
  {"text": str, "label": str | int[, "text_pair": str]}                    (labelled text)
  {"tokens": [str, ...], "tags": [str, ...]}                               (one tag per word)
  {"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...][, "margin": float]}
                                                              (paired preference: DPO, reward model)
  {"prompt": [msg, ...], "completion": [msg, ...], "label": bool}   (unpaired preference: KTO)
  {"prompt": [msg, ...], "raw_prompt": str | [msg, ...], "columns": {...}}  (prompts alone: online RL)
In preference records `prompt` holds the turns before the answer (system/user/..., never empty)
and `chosen`/`rejected`/`completion` the assistant continuation (starting with an assistant turn).
A format is one small class and one registry line.

A format may list column aliases: other names common datasets give a field (SST-2 calls
its text `sentence`, others `content` or `review`). An alias is used when the field's own
column (or the one data.columns maps it to) is absent from a row.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from ..errors import DataError
from .sources import Row


class RowError(ValueError):
    """A row does not fit the format; carries the field at fault."""

    def __init__(self, field: str, expected: str, got: Any = None):
        self.field, self.expected, self.got = field, expected, got
        super().__init__(f"field '{field}': expected {expected}")


def _text(row: dict, field: str, *, required: bool = True) -> str:
    value = row.get(field)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        if required:
            raise RowError(field, "a non-empty string", value)
        return ""
    if not isinstance(value, str):
        if isinstance(value, (int, float)):
            return str(value)
        raise RowError(field, "a string", value)
    if required and not value.strip():
        raise RowError(field, "a non-empty string", value)
    return value


ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}


def _check_conversation(messages: list[dict], field: str) -> list[dict]:
    if not messages:
        raise RowError(field, "a non-empty list of messages", messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(field, "at least one assistant message to learn from", None)
    return messages


class Format(ABC):
    name: str
    fields: tuple[str, ...]  # canonical field names this format reads
    required: tuple[str, ...] = ()
    # canonical field -> other column names that mean the same, tried in order
    aliases: dict[str, tuple[str, ...]] = {}

    def detect(self, columns: set[str]) -> bool:
        return all(f in columns or any(a in columns for a in self.aliases.get(f, ())) for f in self.required)

    def column(self, row: dict, col: Callable[[str], str], field: str) -> str:
        """The row's column for a canonical field: the mapped name, else the field's own name or
        the first alias the row has (files of one dataset do not always agree, e.g. SST-2's
        train.tsv says `sentence` where its dev.tsv says `content`)."""
        name = col(field)
        if name in row:
            return name
        return next((a for a in (field, *self.aliases.get(field, ())) if a in row), name)

    @abstractmethod
    def normalize(self, row: dict, col: Callable[[str], str]) -> dict:
        """One raw row as a canonical record; raises RowError naming the field at fault."""


class Alpaca(Format):
    name = "alpaca"
    fields = ("instruction", "input", "output", "system")
    required = ("instruction", "output")

    def normalize(self, row, col):
        instruction = _text(row, col("instruction"))
        extra = _text(row, col("input"), required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(row, col("output"))}]
        system = _text(row, col("system"), required=False)
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return {"messages": messages}


def _messages(raw: Any, field: str) -> list[dict]:
    """A list of {role, content} messages (role aliases allowed) as canonical messages."""
    if not isinstance(raw, list):
        raise RowError(field, "a list of {role, content} messages", raw)
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{field}[{i}]", "an object with 'role' and 'content'", m)
        role = ROLE_ALIASES.get(str(m["role"]).lower())
        if role is None:
            raise RowError(f"{field}[{i}].role", "one of system/user/assistant", m["role"])
        if not isinstance(m["content"], str):
            raise RowError(f"{field}[{i}].content", "a string", m["content"])
        out.append({"role": role, "content": m["content"]})
    return out


class Chat(Format):
    name = "chat"
    fields = ("messages",)
    required = ("messages",)

    def detect(self, columns):
        return "messages" in columns or "conversation" in columns

    def normalize(self, row, col):
        field = col("messages")
        if field not in row and "conversation" in row:
            field = "conversation"
        return {"messages": _check_conversation(_messages(row.get(field), field), field)}


class ShareGPT(Format):
    name = "sharegpt"
    fields = ("conversations", "system")
    required = ("conversations",)

    def normalize(self, row, col):
        field = col("conversations")
        raw = row.get(field)
        if not isinstance(raw, list):
            raise RowError(field, "a list of {from, value} turns", raw)
        out = []
        system = _text(row, col("system"), required=False)
        if system.strip():
            out.append({"role": "system", "content": system})
        for i, m in enumerate(raw):
            # Many datasets named "conversations" hold OpenAI-style {role, content} turns.
            openai = isinstance(m, dict) and "from" not in m and "role" in m
            who, what = ("role", "content") if openai else ("from", "value")
            if not isinstance(m, dict) or who not in m or what not in m:
                expected = "an object with 'from' and 'value' (or 'role' and 'content')"
                raise RowError(f"{field}[{i}]", expected, m)
            role = ROLE_ALIASES.get(str(m[who]).lower())
            if role is None:
                raise RowError(f"{field}[{i}].{who}", "one of system/human/gpt (or user/assistant)", m[who])
            if not isinstance(m[what], str):
                raise RowError(f"{field}[{i}].{what}", "a string", m[what])
            out.append({"role": role, "content": m[what]})
        return {"messages": _check_conversation(out, field)}


class PromptCompletion(Format):
    name = "prompt_completion"
    fields = ("prompt", "completion", "system")
    required = ("prompt", "completion")

    def normalize(self, row, col):
        messages = [{"role": "user", "content": _text(row, col("prompt"))},
                    {"role": "assistant", "content": _text(row, col("completion"))}]
        system = _text(row, col("system"), required=False)
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return {"messages": messages}


TEXT_ALIASES = ("sentence", "content", "review")


class Text(Format):
    name = "text"
    fields = ("text",)
    required = ("text",)
    aliases = {"text": TEXT_ALIASES}

    def normalize(self, row, col):
        return {"text": _text(row, self.column(row, col, "text"))}


def _label(row: dict, field: str) -> str | int:
    value = row.get(field)
    if isinstance(value, float) and value == value and value.is_integer():
        value = int(value)  # pandas-written files store integer labels as floats
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(field, "a label name (string) or a label id (integer)", value)
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "a non-empty label", value)
        return value.strip()
    return value


class TextLabel(Format):
    """Text (optionally a pair of texts) with one label: sequence classification."""

    name = "text_label"
    fields = ("text", "label", "text_pair")
    required = ("text", "label")
    aliases = {"text": TEXT_ALIASES, "label": ("labels",)}

    def normalize(self, row, col):
        record = {"text": _text(row, self.column(row, col, "text")),
                  "label": _label(row, self.column(row, col, "label"))}
        pair = _text(row, col("text_pair"), required=False)
        if pair.strip():
            record["text_pair"] = pair
        return record


def _string_list(row: dict, field: str, what: str) -> list[str]:
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise RowError(field, f"a non-empty list of {what}", value)
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int)) or (isinstance(item, str) and not item.strip()):
            raise RowError(f"{field}[{i}]", f"a non-empty string ({what})", item)
        out.append(str(item))
    return out


class Tokens(Format):
    """Pre-split words with one tag each (BIO named entities): token classification."""

    name = "tokens"
    fields = ("tokens", "tags")
    required = ("tokens", "tags")
    aliases = {"tokens": ("words",), "tags": ("ner_tags", "labels")}

    def normalize(self, row, col):
        tokens_field, tags_field = self.column(row, col, "tokens"), self.column(row, col, "tags")
        tokens = _string_list(row, tokens_field, "words")
        tags = _string_list(row, tags_field, "tags")
        if len(tags) != len(tokens):
            raise RowError(tags_field, f"one tag per word ({len(tokens)} words in '{tokens_field}')",
                           f"{len(tags)} tags")
        return {"tokens": tokens, "tags": tags}


# --- preference data ---------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (
        isinstance(value, str) and not value.strip())


def _prompt_messages(row: dict, field: str, *, required: bool) -> list[dict]:
    """A prompt column as messages: a string is one user turn; absent or blank gives [] (or an error)."""
    value = row.get(field)
    if _missing(value) or value == []:
        if required:
            raise RowError(field, "a non-empty prompt (a string or a list of {role, content} messages)", value)
        return []
    if isinstance(value, list):
        return _messages(value, field)
    return [{"role": "user", "content": _text(row, field)}]


def _completion_messages(row: dict, field: str) -> list[dict]:
    """A completion column as messages: a string is one assistant turn."""
    value = row.get(field)
    if _missing(value) or value == []:
        raise RowError(field, "a non-empty completion (a string or a list of {role, content} messages)", value)
    if isinstance(value, list):
        return _messages(value, field)
    return [{"role": "assistant", "content": _text(row, field)}]


def _check_completion(messages: list[dict], field: str) -> None:
    if not messages:
        raise RowError(field, "a non-empty completion (it is all shared with the prompt)", messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(field, "a completion with an assistant message", messages)
    if messages[0]["role"] != "assistant":
        raise RowError(field, "a completion that starts with an assistant turn", messages[0])
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise RowError(field, "a non-empty completion", messages)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def _hh_transcript(text: str) -> list[dict] | None:
    """An Anthropic HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...') as messages, else None."""
    if not text.lstrip("\n").startswith("Human:") or "\n\nAssistant:" not in text:
        return None
    parts = _HH_TURN.split(text.lstrip("\n"))
    if parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": what.strip()}
            for who, what in zip(parts[1::2], parts[2::2])]


def _starts_with(messages: list[dict], prefix: list[dict]) -> bool:
    return len(messages) >= len(prefix) and messages[: len(prefix)] == prefix


def common_prefix_length(a: list, b: list) -> int:
    """How many leading items two sequences share (messages, token ids)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _margin(row: dict, field: str) -> float | None:
    value = row.get(field)
    if _missing(value):
        return None
    if isinstance(value, bool):
        raise RowError(field, "a number", value)
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RowError(field, "a number", value) from None
    if not math.isfinite(number):
        raise RowError(field, "a finite number", value)
    return number


class Preference(Format):
    """Paired preference (DPO family, reward modelling): a prompt, a chosen and a rejected answer.

    Each of prompt/chosen/rejected is a string or a list of messages. Without a prompt, chosen and
    rejected are full conversations (Anthropic HH-RLHF, as messages or as its 'Human:/Assistant:'
    transcript strings): their longest common prefix of turns is the prompt (TRL's extract_prompt).
    A conversation that repeats the prompt column at its start (HuggingFaceH4/ultrafeedback_binarized)
    has that repeat removed. An optional numeric `margin` column is kept (reward modelling).
    """

    name = "preference"
    fields = ("prompt", "chosen", "rejected", "margin")
    required = ("chosen", "rejected")

    def normalize(self, row, col):
        pf, cf, rf = col("prompt"), col("chosen"), col("rejected")
        prompt = _prompt_messages(row, pf, required=False)
        chosen, rejected = _completion_messages(row, cf), _completion_messages(row, rf)
        if not prompt and isinstance(row.get(cf), str) and isinstance(row.get(rf), str):
            hh_c, hh_r = _hh_transcript(row[cf]), _hh_transcript(row[rf])
            if hh_c is not None and hh_r is not None:
                chosen, rejected = hh_c, hh_r
        if [(m["role"], m["content"].strip()) for m in chosen] == [(m["role"], m["content"].strip()) for m in rejected]:
            raise RowError(rf, f"a completion that differs from '{cf}' (the two are identical)", row.get(rf))
        if prompt and _starts_with(chosen, prompt) and _starts_with(rejected, prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        if chosen and rejected and (chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant"):
            # Full conversations: the turns both share are the prompt.
            shared = common_prefix_length(chosen, rejected)
            prompt, chosen, rejected = prompt + chosen[:shared], chosen[shared:], rejected[shared:]
        _check_completion(chosen, cf)
        _check_completion(rejected, rf)
        if not prompt:
            raise RowError(pf, f"a prompt: a '{pf}' column, or '{cf}' and '{rf}' as full conversations "
                               "that share their opening turns", row.get(pf))
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        margin = _margin(row, col("margin"))
        if margin is not None:
            record["margin"] = margin
        return record


_LABELS = {"true": True, "false": False, "desirable": True, "undesirable": False, "1": True, "0": False}


def _bool_label(row: dict, field: str) -> bool:
    value = row.get(field)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise RowError(field, "true/false (a bool, 0/1, 'true'/'false' or 'desirable'/'undesirable')", value)


class UnpairedPreference(Format):
    """Unpaired preference (KTO): one completion per prompt, labelled desirable (true) or not (false)."""

    name = "unpaired_preference"
    fields = ("prompt", "completion", "label")
    required = ("prompt", "completion", "label")

    def normalize(self, row, col):
        pf, cf = col("prompt"), col("completion")
        prompt = _prompt_messages(row, pf, required=True)
        completion = _completion_messages(row, cf)
        if _starts_with(completion, prompt):
            completion = completion[len(prompt):]
        _check_completion(completion, cf)
        return {"prompt": prompt, "completion": completion, "label": _bool_label(row, col("label"))}


class Prompt(Format):
    """Prompts alone (online RL): the model writes the completions. Every other column is kept as
    `columns` for reward functions (e.g. `answer`); `raw_prompt` is the prompt as the data gave it
    (a string, or messages), which is what reward functions receive, as in TRL."""

    name = "prompt"
    fields = ("prompt",)
    required = ("prompt",)

    def normalize(self, row, col):
        pf = col("prompt")
        messages = _prompt_messages(row, pf, required=True)
        if messages[-1]["role"] == "assistant":
            raise RowError(pf, "a prompt that ends with a user (or system) turn: the model writes the answer",
                           messages[-1])
        return {"prompt": messages, "raw_prompt": row[pf], "columns": {k: v for k, v in row.items() if k != pf}}


# Detection order matters: the most specific shapes first. The preference formats lead: chosen +
# rejected columns mean paired preference even when a dataset also carries `messages` (as
# HuggingFaceH4/ultrafeedback_binarized does), and prompt + completion + label is KTO's unpaired
# preference, which prompt_completion (prompt + completion) would otherwise claim. Labelled text
# comes before plain text; a prompt column alone (online RL) comes last.
FORMATS: dict[str, Format] = {
    # prompt + completion (+ label) reads as prompt_completion unless the objective learns from
    # unpaired preferences (detect_format's `prefer`): the label alone does not say which.
    f.name: f for f in (Preference(), Chat(), ShareGPT(), Alpaca(), PromptCompletion(), UnpairedPreference(),
                        TextLabel(), Tokens(), Text(), Prompt())
}


def detect_format(columns: set[str], mapping: dict[str, str] | None = None, prefer: tuple[str, ...] = ()) -> str:
    """Name the format whose required columns are present (after column remapping); formats in
    `prefer` (those the run's objective learns from) are tried first."""
    mapping = mapping or {}
    reverse = {v: k for k, v in mapping.items()}
    canonical = {reverse.get(c, c) for c in columns}
    order = [n for n in prefer if n in FORMATS] + [n for n in FORMATS if n not in prefer]
    for name in order:
        fmt = FORMATS[name]
        if fmt.detect(canonical):
            return name
    expected = "; ".join(f"{n}: {', '.join(f.required)}" for n, f in FORMATS.items())
    raise DataError(
        f"cannot detect the data format from columns {sorted(columns)}. Expected one of — {expected}. "
        "Set data.format, or map your columns with data.columns (e.g. {text: body})."
    )


def normalize_rows(
    rows: list[Row], fmt_name: str, mapping: dict[str, str], *, skip_invalid: bool,
    errors: list[str] | None = None, kept: list[int] | None = None,
) -> tuple[list[dict], int]:
    """Normalize rows to canonical records; returns (records, number of rows skipped).

    With skip_invalid, the message of every skipped row is appended to `errors` when given, and
    the position in `rows` of every record's row to `kept`.
    """
    if fmt_name not in FORMATS:
        raise DataError(f"unknown data format '{fmt_name}' (known: {', '.join(FORMATS)})")
    fmt = FORMATS[fmt_name]

    def col(name: str) -> str:
        return mapping.get(name, name)

    records, skipped = [], 0
    for i, row in enumerate(rows):
        try:
            records.append(fmt.normalize(row.data, col))
            if kept is not None:
                kept.append(i)
        except RowError as err:
            got = "" if err.got is None else f", got {_short(err.got)}"
            message = f"{row.where}: field '{err.field}': expected {err.expected}{got} (format '{fmt_name}')"
            if skip_invalid:
                skipped += 1
                if errors is not None:
                    errors.append(message)
                continue
            raise DataError(
                f"{message}. Fix the row, or set data.skip_invalid: true to skip such rows."
            ) from None
    return records, skipped


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
