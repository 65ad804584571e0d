"""Data quality checks behind `tunesmith data inspect`: near-duplicates, train/validation leakage,
length outliers, language mix, answers that repeat their prompt and chat-structure problems, and
the cleaned copy (`--write-clean`) with its dataset card.

Every check works on the records training reads (after format detection and normalization), so
what it flags is what a run would see. Near-duplicates use MinHash LSH (`datasketch`) over word
3-gram shingles, confirmed by the exact Jaccard similarity of the shingle sets (LSH only proposes
candidates); languages come from `py3langid` on a seeded sample. Both are in the `data` extra; a
report without them says so instead of failing.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

NEAR_THRESHOLD = 0.8  # Jaccard of word-bigram sets: the same text with a few words changed
NUM_PERM = 128
SHINGLE = 2  # word bigrams: one changed word in a 25-word row still scores 0.85
LANGUAGE_SAMPLE = 2000  # rows whose language is identified (seeded sample): a mix shows at this size
OUTLIER_IQR = 3.0  # Tukey's "far out" fence, on log lengths (text lengths are long-tailed)
EXAMPLES = 3  # row numbers shown per finding
_WORD = re.compile(r"\w+", re.UNICODE)


def parts(record: dict) -> tuple[str, str]:
    """(what the model reads, what it learns to answer) of a normalized record, as plain text."""
    def said(messages: Any, roles: set[str] | None = None) -> str:
        if isinstance(messages, str):
            return messages
        return "\n".join(m["content"] for m in messages or [] if roles is None or m["role"] in roles)

    if "messages" in record:
        return said(record["messages"], {"user", "system"}), said(record["messages"], {"assistant"})
    if "chosen" in record:
        return said(record["prompt"]), said(record["chosen"])
    if "completion" in record:
        return said(record["prompt"]), said(record["completion"])
    if "tokens" in record:
        return "", " ".join(record["tokens"])
    if "text" in record:
        return "", record["text"] + (" " + record["text_pair"] if record.get("text_pair") else "")
    return said(record.get("prompt", "")), ""


def normalized(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _shingles(text: str) -> set[bytes]:
    words = normalized(text).split()
    if len(words) < SHINGLE:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)}


def _joined(prompt: str, answer: str) -> str:
    """A record's whole text, as the duplicate, leakage and length checks compare it."""
    return prompt + "\n" + answer if prompt else answer


def _minhashes(sets: list[set[bytes]]) -> list:
    from datasketch import MinHash

    return MinHash.bulk([sorted(s) for s in sets], num_perm=NUM_PERM, seed=1)


def _lsh_ready() -> bool:
    try:
        import datasketch  # noqa: F401
    except ImportError:
        return False
    return True


class NearIndex:
    """MinHash LSH over texts; `similar(text)` = indices of indexed texts at Jaccard >= threshold."""

    def __init__(self, texts: list[str], threshold: float = NEAR_THRESHOLD):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.sets = [_shingles(t) for t in texts]
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        hashes = _minhashes(self.sets)
        with self.lsh.insertion_session() as session:
            for i, (s, h) in enumerate(zip(self.sets, hashes)):
                if s:
                    session.insert(i, h)
        self._hashes = hashes

    def similar(self, shingles: set[bytes], minhash) -> list[int]:
        found = []
        for j in self.lsh.query(minhash):
            other = self.sets[j]
            if len(shingles & other) / max(len(shingles | other), 1) >= self.threshold:
                found.append(j)
        return sorted(found)

    def near_duplicates(self, exact_first: list[int]) -> dict[int, int]:
        """Row -> an earlier row it nearly repeats (rows that are exact repeats are left to that check)."""
        out = {}
        for i, s in enumerate(self.sets):
            if not s or exact_first[i] != i:
                continue
            earlier = [j for j in self.similar(s, self._hashes[i]) if j < i and exact_first[j] == j]
            if earlier:
                out[i] = earlier[0]
        return out


def quality(records: list[dict], where: list[str], *, labels: dict | None = None,
            against: list[dict] | None = None, against_name: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Every check on the normalized records (`where` says where each came from, for the examples);
    `against` is a validation or test set checked for leakage."""
    pairs = [parts(r) for r in records]
    texts = [_joined(*pair) for pair in pairs]
    keys = [normalized(t) for t in texts]
    first: dict[str, int] = {}
    exact_first = [first.setdefault(k, i) for i, k in enumerate(keys)]
    out: dict[str, Any] = {"checked": len(records), "flags": {}}

    def flag(name: str, rows: Iterable[int], note: str = "") -> None:
        rows = sorted(set(rows))
        out["flags"][name] = {"count": len(rows), "rows": rows, "examples": [where[i] for i in rows[:EXAMPLES]],
                              "note": note}

    flag("exact duplicate (after lowercasing and punctuation)", [i for i, f in enumerate(exact_first) if f != i])
    if _lsh_ready():
        index = NearIndex(texts)
        near = index.near_duplicates(exact_first)
        flag(f"near duplicate (Jaccard >= {NEAR_THRESHOLD} on word {SHINGLE}-grams)", near,
             "; ".join(f"{where[i]} ~ {where[j]}" for i, j in list(near.items())[:EXAMPLES]))
    else:
        index = None
        out["missing"] = "near duplicates and languages need pip install 'tunesmith[data]'"
    flag("empty text", [i for i, (p, a) in enumerate(pairs) if not a.strip() and not p.strip()])
    flag("empty answer", [i for i, r in enumerate(records) if _has_answer_side(r) and not pairs[i][1].strip()])
    flag("answer repeats the prompt", [i for i, pair in enumerate(pairs) if _repeats_prompt(*pair)])
    flag("chat structure", [i for i, r in enumerate(records) if _structure_problem(r)],
         "two turns of one role in a row, an empty turn, or no final assistant turn")
    long, short, fence = _length_outliers([len(t) for t in texts])
    flag("length outlier (long)", long, f"over {fence[1]:,} characters" if fence else "")
    flag("length outlier (short)", short, f"under {fence[0]:,} characters" if fence else "")
    if labels:
        counts = [v["count"] for v in labels.values()]
        out["label_balance"] = {"classes": len(counts), "largest_over_smallest": max(counts) / max(min(counts), 1)}
        if len(counts) == 1:
            flag("single class", range(len(records)), f"every row is labelled {next(iter(labels))}")
    if against is not None:
        out["against"] = against_name
        theirs = [_joined(*parts(r)) for r in against]
        mine = {k: i for i, k in enumerate(keys)}
        found_in = {i: mine.get(normalized(t)) for i, t in enumerate(theirs)}
        exact = [i for i, j in found_in.items() if j is not None]
        flag(f"leak: exact in {against_name}", [found_in[i] for i in exact],
             f"{len(exact)} of {len(theirs)} rows of {against_name} appear in this file")
        if index is not None:
            sets = [_shingles(t) for t in theirs]
            hashes = _minhashes(sets)
            exact_set = set(exact)
            near = {}
            for i, (s, h) in enumerate(zip(sets, hashes)):
                if s and i not in exact_set:
                    found = index.similar(s, h)
                    if found:
                        near[found[0]] = i
            flag(f"leak: near in {against_name}", near,
                 f"{len(near)} rows of this file nearly repeat a row of {against_name}")
    languages = _languages(texts, seed)
    if languages is not None:
        out["languages"] = languages
    return out


def _has_answer_side(record: dict) -> bool:
    return any(k in record for k in ("messages", "chosen", "completion"))


def _repeats_prompt(prompt: str, answer: str) -> bool:
    """The answer is the prompt, or contains it whole (a model taught to echo)."""
    p, a = normalized(prompt), normalized(answer)
    return len(p.split()) >= 3 and (a == p or p in a)


def _structure_problem(record: dict) -> bool:
    messages = record.get("messages")
    if not messages:
        return False
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "assistant":
        return True
    if any(not str(m["content"]).strip() for m in turns):
        return True
    return any(a["role"] == b["role"] for a, b in zip(turns, turns[1:]))


def _length_outliers(lengths: list[int]) -> tuple[list[int], list[int], tuple[int, int] | None]:
    """Rows beyond Tukey's far-out fences (3 IQR) of the log lengths: long-tailed text stays in,
    the really odd ones show."""
    import numpy as np

    if len(lengths) < 10:
        return [], [], None
    logs = np.log1p(np.array(lengths, dtype=float))
    q1, q3 = np.percentile(logs, [25, 75])
    low, high = q1 - OUTLIER_IQR * (q3 - q1), q3 + OUTLIER_IQR * (q3 - q1)
    fence = (int(np.expm1(low)) if low > 0 else 0, int(np.expm1(high)))
    long = [i for i, v in enumerate(logs) if v > high]
    short = [i for i, v in enumerate(logs) if v < low]
    return long, short, fence


def _languages(texts: list[str], seed: int) -> dict[str, Any] | None:
    try:
        import py3langid
    except ImportError:
        return None
    candidates = [t for t in texts if len(normalized(t).split()) >= 3]  # too short to tell
    sample = random.Random(seed).sample(candidates, min(LANGUAGE_SAMPLE, len(candidates)))
    counts = Counter(py3langid.classify(t)[0] for t in sample)
    total = sum(counts.values())
    return {"sampled": total, "shares": {k: n / total for k, n in counts.most_common()}}


DROPPED_BY_CLEAN = ("exact duplicate", "near duplicate", "empty", "answer repeats", "chat structure", "leak:")


def write_clean(folder: Path, source: str, rows: list[dict], valid: list[int], report: dict) -> dict[str, int]:
    """The kept rows (as the file had them) to folder/data.jsonl with a dataset card; returns counts by reason.

    Dropped: invalid rows, exact and near duplicates (the first of each group stays), empty texts or
    answers, answers repeating the prompt, broken chat structure, rows leaking into the checked set.
    Length outliers and other languages are listed in the card but kept: they may be legitimate.
    """
    from ..files import write_text_atomic

    q = report["quality"]
    dropped: dict[str, int] = {"invalid": len(rows) - len(valid)}
    out_of: set[int] = set()
    for name, f in q["flags"].items():
        if name.startswith(DROPPED_BY_CLEAN):
            new = set(f["rows"]) - out_of
            dropped[name] = len(new)
            out_of |= new
    kept = [rows[valid[i]] for i in range(len(valid)) if i not in out_of]
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "data.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in kept))
    write_text_atomic(folder / "README.md", dataset_card(source, report, len(kept), dropped))
    return {"kept": len(kept), **dropped}


def dataset_card(source: str, report: dict, kept: int, dropped: dict[str, int]) -> str:
    import datetime

    from .. import __version__

    q = report["quality"]
    langs = [k for k, v in (q.get("languages") or {}).get("shares", {}).items() if v >= 0.05]
    size = next(s for n, s in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                               (1_000_000, "100K<n<1M"), (float("inf"), "n>1M")) if kept < n)
    front = {"pretty_name": f"{Path(source).stem} (cleaned)", "language": langs or None, "size_categories": [size],
             "source_datasets": [source], "tags": ["tunesmith", "cleaned"],
             "configs": [{"config_name": "default", "data_files": "data.jsonl"}]}
    lines = ["---", *_yaml_lines(front), "---", "", f"# {front['pretty_name']}", "",
             f"Cleaned by tunesmith {__version__} on {datetime.date.today().isoformat()} from `{source}` "
             f"({report['format']} format, {report['rows']} rows): **{kept} kept**.", "",
             "| removed because | rows |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in dropped.items() if n]
    kept_notes = [(n, f) for n, f in q["flags"].items() if not n.startswith(DROPPED_BY_CLEAN) and f["count"]]
    if kept_notes:
        lines += ["", "Kept, but worth a look:", ""]
        lines += [f"- {n}: {f['count']} rows{(' (' + f['note'] + ')') if f['note'] else ''}" for n, f in kept_notes]
    if q.get("languages"):
        shares = ", ".join(f"{k} {v:.0%}" for k, v in list(q["languages"]["shares"].items())[:5])
        lines += ["", f"Languages (py3langid, {q['languages']['sampled']} sampled rows): {shares}."]
    if report.get("labels"):
        lines += ["", "| label | rows before cleaning |", "|---|---|"]
        lines += [f"| {k} | {v['count']} |" for k, v in report["labels"].items()]
    return "\n".join(lines) + "\n"


def _yaml_lines(data: dict) -> list[str]:
    import yaml

    return yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False,
                          allow_unicode=True).splitlines()
