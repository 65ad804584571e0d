"""Tokenize text for encoder-style objectives under data.max_length and data.truncation."""

from __future__ import annotations

from contextlib import contextmanager

from ..config import DataConfig


@contextmanager
def _truncation_side(tokenizer, side: str):
    before = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        yield
    finally:
        tokenizer.truncation_side = before


def tokenize_truncated(tokenizer, data: DataConfig, text, text_pair=None, **kwargs):
    """(encoding, truncated), or (None, False) when data.truncation is 'drop' and it is too long.

    The tokenizer truncates (rather than slicing ids afterwards) so special tokens such as
    [SEP] and </s> stay at the end of a cut sequence and pairs are cut fairly.
    """
    full = tokenizer(text, text_pair, add_special_tokens=True, **kwargs)
    if len(full["input_ids"]) <= data.max_length:
        return full, False
    if data.truncation == "drop":
        return None, False
    with _truncation_side(tokenizer, data.truncation):
        cut = tokenizer(text, text_pair, add_special_tokens=True, truncation=True, max_length=data.max_length,
                        **kwargs)
    return cut, True
