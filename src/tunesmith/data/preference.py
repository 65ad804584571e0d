"""Tokenise preference records with a shared prompt, and collate them into batches.

Follows TRL 1.16 (`DPOTrainer._prepare_dataset`, `DataCollatorForPreference`; KTO likewise):
the prompt alone is rendered with the chat template and the generation prompt, prompt+chosen and
prompt+rejected as whole conversations; each is tokenised without added special tokens (the
template carries them). The completion starts where the token ids diverge:
`prompt_len = min(cp(prompt, prompt+chosen), cp(prompt, prompt+rejected))`, so a BPE merge across
the prompt/answer boundary, or a template that renders the prompt alone differently, still gives
one prompt shared by both sequences and `prompt_ids + chosen_ids` is exactly the tokenised
prompt+chosen conversation. The prompt's divergent tail (if any) is not part of the sequence.

Pairs whose (split) prompt alone fills max_length are dropped (None): keep_start truncation would
leave no completion token to learn from.
"""

from __future__ import annotations

import torch

from .formats import common_prefix_length
from .templates import ensure_chat_template

from ..errors import ConfigError
from .templates import IGNORE

KEEP_START = ("keep_start", "right")
TRUNCATIONS = (*KEEP_START, "drop")


# data.truncation -> how a preference example is cut: its prompt must stay whole (it is shared
# by both answers, or by an answer and its KL partner), so answers are cut at the end or dropped.
_FROM_DATA_TRUNCATION = {"right": "keep_start", "drop": "drop"}


def truncation_rule(truncation: str) -> str:
    """The rule for a run's `data.truncation`; `left` is refused, naming the key."""
    if truncation not in _FROM_DATA_TRUNCATION:
        raise ConfigError(f"data.truncation: '{truncation}' cannot cut preference examples (the prompt must stay "
                          f"whole); use 'right' (answers cut at the end) or 'drop'")
    return _FROM_DATA_TRUNCATION[truncation]


def answer_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Labels that score only the answer tokens of collated preference rows."""
    return input_ids.masked_fill(completion_mask == 0, IGNORE)


def chat_ids(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    """Token ids of messages through the chat template (with the assistant's opening when generation_prompt)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation '{truncation}' is not supported for preference data "
                         f"(use one of {', '.join(TRUNCATIONS)})")


def _fit(prompt: list[int], completions: list[list[int]], max_length: int,
         truncation: str) -> tuple[list[list[int]], bool] | None:
    """Cut every prompt+completion to max_length (keep_start); None when the example must be dropped."""
    if len(prompt) >= max_length:
        return None
    room = max_length - len(prompt)
    truncated = any(len(c) > room for c in completions)
    if truncated and truncation == "drop":
        return None
    completions = [c[:room] for c in completions]
    if any(not c for c in completions):
        return None
    return completions, truncated


def encode_pair(tokenizer, record: dict, *, max_length: int, truncation: str = "keep_start") -> dict | None:
    """A `preference` record as {"prompt_ids", "chosen_ids", "rejected_ids", "truncated"[, "margin"]}.

    `chosen_ids`/`rejected_ids` are the completion ids after the shared-prompt split, already cut so that
    prompt+completion fits max_length (keep_start; `truncation="drop"` drops over-long pairs instead).
    `truncated` says whether any completion was cut. None: the pair is dropped (prompt alone
    >= max_length, an empty completion, or over-long with "drop"); the caller counts it.
    """
    _check_truncation(truncation)
    ensure_chat_template(tokenizer)
    prompt = chat_ids(tokenizer, record["prompt"], generation_prompt=True)
    full_c = chat_ids(tokenizer, record["prompt"] + record["chosen"], generation_prompt=False)
    full_r = chat_ids(tokenizer, record["prompt"] + record["rejected"], generation_prompt=False)
    cut = min(common_prefix_length(prompt, full_c), common_prefix_length(prompt, full_r))
    fitted = _fit(prompt[:cut], [full_c[cut:], full_r[cut:]], max_length, truncation)
    if fitted is None:
        return None
    (chosen, rejected), truncated = fitted
    row = {"prompt_ids": prompt[:cut], "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}
    if record.get("margin") is not None:
        row["margin"] = float(record["margin"])
    return row


def encode_unpaired(tokenizer, record: dict, *, max_length: int, truncation: str = "keep_start") -> dict | None:
    """An `unpaired_preference` record as {"prompt_ids", "completion_ids", "label", "truncated"}; None: dropped."""
    _check_truncation(truncation)
    ensure_chat_template(tokenizer)
    prompt = chat_ids(tokenizer, record["prompt"], generation_prompt=True)
    full = chat_ids(tokenizer, record["prompt"] + record["completion"], generation_prompt=False)
    cut = common_prefix_length(prompt, full)
    fitted = _fit(prompt[:cut], [full[cut:]], max_length, truncation)
    if fitted is None:
        return None
    (completion,), truncated = fitted
    return {"prompt_ids": prompt[:cut], "completion_ids": completion, "label": bool(record["label"]),
            "truncated": truncated}


def pad_completions(sequences: list[list[int]], masks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt+completion sequences right-padded: input_ids, attention_mask, completion_mask (1 on `masks`' ones)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        completion[i, : len(seq)] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoded pairs as one batch of 2B sequences: every prompt+chosen first, then every prompt+rejected.

    input_ids (2B, L) right-padded with pad_id; attention_mask 1 on real tokens; completion_mask 1 exactly
    on the completion tokens; margin (B) when every row has one. Split the model output with `.chunk(2)`.
    """
    sequences, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for r in rows:
            sequences.append(r["prompt_ids"] + r[key])
            masks.append([0] * len(r["prompt_ids"]) + [1] * len(r[key]))
    batch = pad_completions(sequences, masks, pad_id)
    if rows and all(r.get("margin") is not None for r in rows):
        batch["margin"] = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32)
    return batch


def collate_unpaired(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoded unpaired rows: input_ids/attention_mask/completion_mask (B, L) and label (bool, B)."""
    sequences = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    masks = [[0] * len(r["prompt_ids"]) + [1] * len(r["completion_ids"]) for r in rows]
    batch = pad_completions(sequences, masks, pad_id)
    batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
    return batch
