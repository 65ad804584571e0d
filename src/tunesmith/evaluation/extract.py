"""Answer extraction and normalization for exact match and label metrics.

A generated answer is rarely the bare label: GSM8K solutions end in '#### 72', a chatty model
says 'The answer is 1,000.'. Extraction picks the part that is the answer; normalization
makes equal answers compare equal ('1,000' == '1000', '5.0' == '5', 'Paris.' == 'paris').
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation, localcontext

from ..errors import ConfigError

EXTRACTORS = ("none", "gsm8k", "hashes", "last_number", "boxed", "first_line", "regex")
NORMALIZERS = ("lowercase", "punctuation", "articles", "whitespace", "numbers")
DEFAULT_NORMALIZE = ("lowercase", "punctuation", "articles", "whitespace", "numbers")

# A number as people write it: optional sign or currency, thousands separators, decimals.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Punctuation, except a decimal point between digits and a minus sign starting a number.
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))(?!(?<!\w)-(?=\d))[^\w\s]")


def check_extraction(mode: str, pattern: str | None = None) -> None:
    if mode not in EXTRACTORS:
        raise ConfigError(f"extract: unknown mode '{mode}' (known: {', '.join(EXTRACTORS)})")
    if mode == "regex":
        if not pattern:
            raise ConfigError("extract: mode 'regex' needs a pattern (--pattern / pattern:)")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"extract pattern {pattern!r} is not a valid regular expression: {exc}") from None


def check_normalization(options: list[str] | tuple[str, ...]) -> None:
    bad = [o for o in options if o not in NORMALIZERS]
    if bad:
        raise ConfigError(f"normalize: unknown option(s) {bad} (known: {', '.join(NORMALIZERS)})")


def last_number(text: str) -> str:
    found = _NUMBER.findall(text)
    return found[-1] if found else ""


def after_hashes(text: str) -> str | None:
    """The text after the last '####' marker (GSM8K's answer line), or None without one."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces inside it balanced, as in \\boxed{\\frac{1}{2}}), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, at = 1, start + len("\\boxed{")
    for i in range(at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[at:i].strip()
    return None  # unclosed: the model stopped inside it


def extract_answer(text: str, mode: str = "none", pattern: str | None = None) -> str:
    """The part of `text` that is the answer.

    gsm8k: the text after '####' when present, else the last number (models that were not
    taught the marker still usually end with the result). hashes: after '####' or nothing.
    boxed: the content of the last \\boxed{} (math solutions), or nothing.
    regex: the first capture group (or whole match) of `pattern`'s last match.
    """
    if mode == "none":
        return text.strip()
    if mode == "gsm8k":
        found = after_hashes(text)
        if found is not None:
            # '#### $1,000.' -> '1,000': keep the number when the marker carries one.
            number = last_number(found)
            return number or found
        return last_number(text)
    if mode == "hashes":
        return after_hashes(text) or ""
    if mode == "last_number":
        return last_number(text)
    if mode == "boxed":
        return last_boxed(text) or ""
    if mode == "first_line":
        stripped = text.strip()
        return stripped.split("\n", 1)[0].strip() if stripped else ""
    if mode == "regex":
        matches = list(re.finditer(pattern or "", text))
        if not matches:
            return ""
        m = matches[-1]
        # The first group that took part in the match (alternatives leave the others None), else the whole match.
        return next((g for g in m.groups() if g is not None), m.group(0)).strip()
    raise ConfigError(f"extract: unknown mode '{mode}' (known: {', '.join(EXTRACTORS)})")


def canonical_number(token: str) -> str:
    """'1,000' -> '1000', '5.0' -> '5', '-0.50' -> '-0.5'; non-numbers unchanged."""
    digits = token.replace(",", "")
    # Enough precision for every digit: a model that runs away writing 60 digits must get
    # them back unrounded (the default context keeps 28).
    with localcontext() as ctx:
        ctx.prec = len(digits) + 2
        try:
            value = Decimal(digits)
        except InvalidOperation:
            return token
        # normalize() drops trailing zeros ('5.0' -> '5'); format 'f' writes no exponent.
        text = format(value.normalize(), "f")
    return "0" if text in ("-0", "-0.0") else text


def normalize(text: str, options: list[str] | tuple[str, ...] = DEFAULT_NORMALIZE) -> str:
    """Apply the chosen normalizations in a fixed order (numbers before punctuation)."""
    if "numbers" in options:
        text = _NUMBER.sub(lambda m: canonical_number(m.group(0)), text)
    if "lowercase" in options:
        text = text.lower()
    if "punctuation" in options:
        text = _PUNCT.sub(" ", text) if "numbers" in options else text.translate(
            str.maketrans("", "", string.punctuation))
    if "articles" in options:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in options:
        text = " ".join(text.split())
    return text.strip()


def prepare(text: str, mode: str = "none", pattern: str | None = None,
            options: list[str] | tuple[str, ...] = DEFAULT_NORMALIZE) -> str:
    """Extraction then normalization: what exact match and label metrics compare."""
    return normalize(extract_answer(text, mode, pattern), options)
