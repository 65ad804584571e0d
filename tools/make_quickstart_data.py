"""Write the quickstart dataset shipped in src/tunesmith/resources/quickstart/.

Short product and film reviews whose sentiment is unambiguous to a reader, each phrased as
an instruction with a one-word answer (positive / negative), so that base and tuned models
can be scored by exact match. Deterministic: re-running writes identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["movie", "film", "book", "restaurant", "hotel", "phone", "laptop", "album", "game", "coffee shop",
            "headphones", "sequel", "novel", "pizza place", "camera", "series", "museum", "bakery"]
POSITIVE = ["wonderful", "delightful", "excellent", "fantastic", "charming", "superb", "brilliant", "lovely",
            "outstanding", "impressive", "heartwarming", "flawless"]
NEGATIVE = ["awful", "dreadful", "boring", "disappointing", "terrible", "clumsy", "mediocre", "painful",
            "annoying", "forgettable", "overpriced", "broken"]
POS_DETAILS = ["I would happily go back", "worth every penny", "I recommend it to everyone",
               "it made my whole week", "the staff were kind and quick", "I loved every minute",
               "it exceeded my expectations", "I am buying another one for my sister"]
NEG_DETAILS = ["I want my money back", "I will never return", "it stopped working after a day",
               "the staff ignored us", "I fell asleep halfway through", "a complete waste of time",
               "it broke my expectations in the worst way", "I returned it the next morning"]
TEMPLATES = [
    "The {s} was {a}; {d}.",
    "What a {a} {s}! {d}.",
    "Honestly, this {s} is {a}. {d}.",
    "I tried the {s} last weekend and it was {a} - {d}.",
    "{d}. The {s} was simply {a}.",
    "My friends told me the {s} was good, and they were {right}: {a}. {d}.",
]
INSTRUCTIONS = [
    "Classify the sentiment of this review as positive or negative. Answer with one word.",
    "Is the following review positive or negative? Reply with one word.",
    "Read the review and answer with a single word: positive or negative.",
]


def make(rng: random.Random, label: str) -> dict:
    adj = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    detail = rng.choice(POS_DETAILS if label == "positive" else NEG_DETAILS)
    review = rng.choice(TEMPLATES).format(
        s=rng.choice(SUBJECTS), a=adj, d=detail, right="right" if label == "positive" else "wrong"
    )
    review = review[0].upper() + review[1:]
    return {"instruction": rng.choice(INSTRUCTIONS), "input": review, "output": label}


def main() -> None:
    rng = random.Random(1234)
    rows, seen = [], set()
    while len(rows) < 400:
        row = make(rng, rng.choice(["positive", "negative"]))
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    out = Path(__file__).resolve().parents[1] / "src" / "tunesmith" / "resources" / "quickstart"
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", rows[:320]), ("test.jsonl", rows[320:])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(name, len(part), sum(r["output"] == "positive" for r in part), "positive")


if __name__ == "__main__":
    main()
