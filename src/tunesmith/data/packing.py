"""Packing: many short examples in one row, each still seeing only itself.

Position ids restart at 0 for every packed example and no 2-D attention mask is passed;
transformers then builds a block-diagonal causal mask from the position ids, so tokens
never attend across examples. The first token of each example carries no label, because
it would otherwise be predicted from the previous example's last token.
"""

from __future__ import annotations

from .templates import IGNORE, Encoded


def _row(example: Encoded | dict) -> dict:
    if isinstance(example, dict):
        return example
    return {"input_ids": example.input_ids, "labels": example.labels}


def pack(examples: list[Encoded | dict], max_length: int) -> list[dict]:
    """First-fit-decreasing bin packing into rows of at most max_length tokens."""
    examples = [_row(e) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(max_length - n)
    rows = []
    for members in bins:
        ids, labels, pos = [], [], []
        for i in sorted(members):
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE] + ex["labels"][1:]
            pos += list(range(len(ex["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def unpacked_rows(examples: list[Encoded | dict]) -> list[dict]:
    return [_row(e) for e in examples]
