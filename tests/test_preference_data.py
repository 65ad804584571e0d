"""Preference data: the preference / unpaired_preference formats, shared-prompt tokenisation, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.formats import FORMATS, detect_format, normalize_rows
from tunesmith.data.pipeline import load_records
from tunesmith.data.preference import (
    collate_pairs, collate_unpaired, common_prefix_length, encode_pair, encode_unpaired,
)
from tunesmith.data.sources import Row
from tunesmith.errors import DataError

USER = {"role": "user", "content": "what color is the sky"}
BLUE = {"role": "assistant", "content": "blue"}
RED = {"role": "assistant", "content": "red"}

SAMPLE = Path("/work/shared/data/ultrafeedback_dpo_sample/train_clean.jsonl")


def normalize(fmt: str, *rows: dict, mapping: dict | None = None) -> list[dict]:
    records, skipped = normalize_rows([Row(r, "d.jsonl", i + 1) for i, r in enumerate(rows)], fmt, mapping or {},
                                      skip_invalid=False)
    assert skipped == 0
    return records


def error(fmt: str, row: dict, index: int = 3) -> str:
    with pytest.raises(DataError) as exc:
        normalize_rows([Row(row, "d.jsonl", index)], fmt, {}, skip_invalid=False)
    return str(exc.value)


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("columns,expected", [
    ({"prompt", "chosen", "rejected"}, "preference"),
    ({"chosen", "rejected"}, "preference"),  # HH-RLHF: the prompt is inside both conversations
    ({"prompt", "chosen", "rejected", "source_index", "metadata"}, "preference"),
    # ultrafeedback_binarized carries a `messages` column next to chosen/rejected
    ({"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}, "preference"),
    ({"prompt", "completion", "label"}, "prompt_completion"),  # unless the objective prefers unpaired data
    ({"prompt", "completion"}, "prompt_completion"),
    ({"prompt", "completion", "system"}, "prompt_completion"),
    ({"messages"}, "chat"),
    ({"text", "label"}, "text_label"),
    ({"instruction", "output"}, "alpaca"),
])
def test_detection(columns, expected):
    assert detect_format(columns) == expected


def test_detection_through_column_mapping():
    assert detect_format({"question", "good", "bad"}, {"prompt": "question", "chosen": "good",
                                                       "rejected": "bad"}) == "preference"
    assert detect_format({"q", "a", "ok"}, {"prompt": "q", "completion": "a", "label": "ok"},
                         prefer=("unpaired_preference",)) == "unpaired_preference"


def test_an_objective_that_learns_from_unpaired_preferences_reads_them_as_such():
    columns = {"prompt", "completion", "label"}
    assert detect_format(columns) == "prompt_completion"
    assert detect_format(columns, prefer=("unpaired_preference",)) == "unpaired_preference"
    assert detect_format({"prompt", "completion"}, prefer=("unpaired_preference",)) == "prompt_completion"


def test_paired_preferences_come_before_chat_in_the_registry():
    order = list(FORMATS)
    assert order.index("preference") < order.index("chat")


# --- normalisation -----------------------------------------------------------------------------


def test_strings_become_one_user_and_one_assistant_turn():
    [rec] = normalize("preference", {"prompt": "what color is the sky", "chosen": "blue", "rejected": "red",
                                     "score_chosen": 9.0})
    assert rec == {"prompt": [USER], "chosen": [BLUE], "rejected": [RED]}


def test_message_lists_with_role_aliases():
    row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "human", "content": USER["content"]}],
           "chosen": [{"role": "gpt", "content": "blue"}], "rejected": [{"role": "bot", "content": "red"}]}
    [rec] = normalize("preference", row)
    assert rec == {"prompt": [{"role": "system", "content": "be brief"}, USER], "chosen": [BLUE], "rejected": [RED]}


def test_hh_style_conversations_share_their_prompt():
    history = [USER, BLUE, {"role": "user", "content": "and at night"}]
    row = {"chosen": history + [{"role": "assistant", "content": "black"}],
           "rejected": history + [{"role": "assistant", "content": "green"}, {"role": "user", "content": "?"}]}
    [rec] = normalize("preference", row)
    assert rec["prompt"] == history
    assert rec["chosen"] == [{"role": "assistant", "content": "black"}]
    assert rec["rejected"] == [{"role": "assistant", "content": "green"}, {"role": "user", "content": "?"}]


def test_hh_transcript_strings_are_parsed():
    row = {"chosen": "\n\nHuman: what color is the sky\n\nAssistant: blue",
           "rejected": "\n\nHuman: what color is the sky\n\nAssistant: red"}
    [rec] = normalize("preference", row)
    assert rec == {"prompt": [USER], "chosen": [BLUE], "rejected": [RED]}


def test_conversations_repeating_the_prompt_column_lose_the_repeat():
    # HuggingFaceH4/ultrafeedback_binarized: a prompt string, and chosen/rejected as whole conversations.
    row = {"prompt": USER["content"], "chosen": [USER, BLUE], "rejected": [USER, RED]}
    [rec] = normalize("preference", row)
    assert rec == {"prompt": [USER], "chosen": [BLUE], "rejected": [RED]}


def test_margin_is_kept_as_float_and_mapping_applies():
    rows = ({"q": "what color is the sky", "good": "blue", "bad": "red", "margin": 2},
            {"q": "what color is the sky", "good": "blue", "bad": "red", "margin": "0.5"},  # CSV
            {"q": "what color is the sky", "good": "blue", "bad": "red"})
    recs = normalize("preference", *rows, mapping={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [r.get("margin") for r in recs] == [2.0, 0.5, None]
    assert isinstance(recs[0]["margin"], float)


def test_the_sample_file_normalizes():
    if not SAMPLE.exists():
        pytest.skip("shared sample data not present")
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    records, fmt, n_read, n_skipped = load_records(DataConfig(train=str(SAMPLE), skip_invalid=True))
    assert fmt == "preference" and n_read == len(rows)
    assert records[0] == {"prompt": [{"role": "user", "content": rows[0]["prompt"]}],
                          "chosen": [{"role": "assistant", "content": rows[0]["chosen"]}],
                          "rejected": [{"role": "assistant", "content": rows[0]["rejected"]}]}
    # Despite its name the file holds pairs DPO cannot learn from: identical or empty answers.
    bad = [r for r in rows if r["chosen"] == r["rejected"] or not r["chosen"].strip() or not r["rejected"].strip()]
    assert n_skipped == len(bad) and len(records) == len(rows) - len(bad)


@pytest.mark.parametrize("label,expected", [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), ("true", True), ("FALSE", False),
    ("Desirable", True), ("undesirable", False), ("1", True), ("0", False),
])
def test_unpaired_labels(label, expected):
    [rec] = normalize("unpaired_preference", {"prompt": USER["content"], "completion": "blue", "label": label})
    assert rec == {"prompt": [USER], "completion": [BLUE], "label": expected}


def test_unpaired_message_lists():
    row = {"prompt": [USER], "completion": [USER, BLUE], "label": False}
    assert normalize("unpaired_preference", row) == [{"prompt": [USER], "completion": [BLUE], "label": False}]


# --- errors name the row and the field -----------------------------------------------------------


@pytest.mark.parametrize("row,field", [
    ({"prompt": "q", "rejected": "red"}, "chosen"),  # missing
    ({"prompt": "q", "chosen": "blue", "rejected": None}, "rejected"),  # missing
    ({"prompt": "q", "chosen": "", "rejected": "red"}, "chosen"),  # empty
    ({"prompt": "q", "chosen": [], "rejected": "red"}, "chosen"),  # empty
    ({"prompt": "q", "chosen": "blue", "rejected": "  "}, "rejected"),  # empty
    ({"prompt": "q", "chosen": "blue", "rejected": "blue"}, "rejected"),  # identical
    ({"chosen": [USER, BLUE], "rejected": [USER, BLUE]}, "rejected"),  # identical
    ({"chosen": [USER, BLUE], "rejected": [USER]}, "rejected"),  # nothing left after the shared prompt
    ({"prompt": "q", "chosen": [USER], "rejected": "red"}, "chosen"),  # no assistant message
    ({"chosen": [USER, BLUE], "rejected": [{"role": "user", "content": "hi"}, BLUE]}, "chosen"),  # starts with user
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": " "}], "rejected": "red"}, "chosen"),
    ({"chosen": "blue", "rejected": "red"}, "prompt"),  # no prompt to be found
    ({"prompt": "q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "red"}, "chosen[0].role"),
    ({"prompt": [{"role": "user"}], "chosen": "blue", "rejected": "red"}, "prompt[0]"),
    ({"prompt": "q", "chosen": "blue", "rejected": "red", "margin": "big"}, "margin"),
    ({"prompt": "q", "chosen": "blue", "rejected": "red", "margin": True}, "margin"),
])
def test_preference_errors_name_the_field(row, field):
    message = error("preference", row)
    assert message.startswith(f"d.jsonl row 3: field '{field}': expected")
    assert "(format 'preference')" in message


@pytest.mark.parametrize("row,field", [
    ({"prompt": "q", "completion": "blue", "label": "maybe"}, "label"),
    ({"prompt": "q", "completion": "blue", "label": 2}, "label"),
    ({"prompt": "q", "completion": "blue", "label": None}, "label"),
    ({"prompt": "q", "completion": "", "label": True}, "completion"),
    ({"prompt": "", "completion": "blue", "label": True}, "prompt"),
    ({"prompt": "q", "completion": [USER], "label": True}, "completion"),
])
def test_unpaired_errors_name_the_field(row, field):
    message = error("unpaired_preference", row, index=7)
    assert message.startswith(f"d.jsonl row 7: field '{field}': expected")


def test_skip_invalid_counts_bad_rows():
    rows = [Row({"prompt": "q", "chosen": "blue", "rejected": "red"}, "d.jsonl", 1),
            Row({"prompt": "q", "chosen": "blue", "rejected": "blue"}, "d.jsonl", 2)]
    errors: list[str] = []
    records, skipped = normalize_rows(rows, "preference", {}, skip_invalid=True, errors=errors)
    assert len(records) == 1 and skipped == 1
    assert errors[0].startswith("d.jsonl row 2: field 'rejected'")


# --- tokenisation with a shared prompt ----------------------------------------------------------

# A word-level tokenizer and template: every word is one token, so positions are known exactly.
WL_WORDS = ["<pad>", "<s>", "<eot>", "system", "user", "assistant", "what", "color", "is", "the", "sky",
            "blue", "red", "very", "dark", "be", "brief"]
WL_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} <eot> {% endfor %}"
               "{% if add_generation_prompt %}<s> assistant {% endif %}")


@pytest.fixture
def wordlevel():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WL_WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eot>")
    fast.chat_template = WL_TEMPLATE
    return fast


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


PAIR = {"prompt": [USER], "chosen": [BLUE], "rejected": [{"role": "assistant", "content": "very dark blue"}]}


def test_encode_pair_splits_after_the_generation_prompt(wordlevel):
    row = encode_pair(wordlevel, PAIR, max_length=64)
    assert row["prompt_ids"] == ids(wordlevel, "<s> user what color is the sky <eot> <s> assistant")
    assert row["chosen_ids"] == ids(wordlevel, "blue <eot>")
    assert row["rejected_ids"] == ids(wordlevel, "very dark blue <eot>")
    assert row["truncated"] is False and "margin" not in row


def test_collate_pairs_masks_exactly_the_completion(wordlevel):
    short = {"prompt": [{"role": "user", "content": "the sky"}], "chosen": [RED],
             "rejected": [{"role": "assistant", "content": "dark"}], "margin": 1.5}
    rows = [encode_pair(wordlevel, {**PAIR, "margin": 2.0}, max_length=64),
            encode_pair(wordlevel, short, max_length=64)]
    pad = wordlevel.pad_token_id
    batch = collate_pairs(rows, pad)
    # "<s> user what color is the sky <eot> <s> assistant" = 10 tokens; "<s> user the sky <eot> <s> assistant" = 7
    assert batch["input_ids"].shape == (4, 14)  # longest: 10 + "very dark blue <eot>"
    assert batch["completion_mask"].tolist() == [
        [0] * 10 + [1, 1] + [0, 0],        # chosen 0: blue <eot>
        [0] * 7 + [1, 1] + [0] * 5,        # chosen 1: red <eot>
        [0] * 10 + [1, 1, 1, 1],           # rejected 0: very dark blue <eot>
        [0] * 7 + [1, 1] + [0] * 5,        # rejected 1: dark <eot>
    ]
    assert batch["attention_mask"].tolist() == [[1] * 12 + [0] * 2, [1] * 9 + [0] * 5, [1] * 14, [1] * 9 + [0] * 5]
    assert batch["input_ids"][0].tolist() == rows[0]["prompt_ids"] + rows[0]["chosen_ids"] + [pad, pad]
    assert batch["input_ids"][3].tolist() == rows[1]["prompt_ids"] + rows[1]["rejected_ids"] + [pad] * 5
    assert batch["margin"].tolist() == [2.0, 1.5]
    # chosen first, then rejected: chunk(2) gives the two halves
    chosen, rejected = batch["input_ids"].chunk(2)
    assert chosen[1].tolist()[7:9] == ids(wordlevel, "red <eot>")
    assert rejected[0].tolist()[10:14] == ids(wordlevel, "very dark blue <eot>")


def test_margin_only_when_every_row_has_one(wordlevel):
    rows = [encode_pair(wordlevel, {**PAIR, "margin": 1.0}, max_length=64), encode_pair(wordlevel, PAIR, max_length=64)]
    assert rows[0]["margin"] == 1.0
    assert "margin" not in collate_pairs(rows, 0)


def test_max_length_truncates_keep_start_and_drops_long_prompts(wordlevel):
    # prompt = 10 tokens; chosen = 2, rejected = 4
    row = encode_pair(wordlevel, PAIR, max_length=12)
    assert row["chosen_ids"] == ids(wordlevel, "blue <eot>")
    assert row["rejected_ids"] == ids(wordlevel, "very dark")
    assert row["truncated"] is True
    assert encode_pair(wordlevel, PAIR, max_length=12, truncation="drop") is None
    assert encode_pair(wordlevel, PAIR, max_length=14, truncation="drop")["truncated"] is False
    assert encode_pair(wordlevel, PAIR, max_length=11)["chosen_ids"] == ids(wordlevel, "blue")
    assert encode_pair(wordlevel, PAIR, max_length=10) is None  # the prompt alone fills max_length
    assert encode_pair(wordlevel, PAIR, max_length=5) is None
    with pytest.raises(ValueError, match="truncation"):
        encode_pair(wordlevel, PAIR, max_length=64, truncation="left")


def test_encode_unpaired_and_collate(wordlevel):
    a = encode_unpaired(wordlevel, {"prompt": [USER], "completion": [BLUE], "label": True}, max_length=64)
    b = encode_unpaired(wordlevel, {"prompt": [{"role": "user", "content": "sky"}],
                                    "completion": [{"role": "assistant", "content": "very dark"}], "label": False},
                        max_length=64)
    assert a["prompt_ids"] == ids(wordlevel, "<s> user what color is the sky <eot> <s> assistant")
    assert a["completion_ids"] == ids(wordlevel, "blue <eot>") and a["label"] is True
    batch = collate_unpaired([a, b], wordlevel.pad_token_id)
    assert batch["completion_mask"].tolist() == [[0] * 10 + [1, 1], [0] * 6 + [1, 1, 1] + [0] * 3]
    assert batch["attention_mask"].tolist() == [[1] * 12, [1] * 9 + [0] * 3]
    assert batch["label"].tolist() == [True, False]
    assert encode_unpaired(wordlevel, {"prompt": [USER], "completion": [BLUE], "label": True}, max_length=10) is None


@pytest.fixture
def bpe(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_bpe_merge_across_the_boundary_gives_a_consistent_split(bpe):
    # The generation prompt ends in a space that byte-level BPE merges into the answer's first word
    # ("Ġ" alone vs "Ġthe"): the prompt tokenised alone is not a prefix of prompt+answer.
    bpe.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    record = {"prompt": [{"role": "user", "content": "what color is the sky"}],
              "chosen": [{"role": "assistant", "content": "the sky is blue"}],
              "rejected": [{"role": "assistant", "content": "the water is red"}]}

    def render(msgs, gen=False):
        return bpe.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    alone = ids(bpe, render(record["prompt"], True))
    full_c = ids(bpe, render(record["prompt"] + record["chosen"]))
    full_r = ids(bpe, render(record["prompt"] + record["rejected"]))
    assert full_c[: len(alone)] != alone  # the merge really happens
    row = encode_pair(bpe, record, max_length=128)
    cut = len(row["prompt_ids"])
    assert cut == len(alone) - 1 == common_prefix_length(alone, full_c)
    assert row["prompt_ids"] == alone[:cut]
    assert row["prompt_ids"] + row["chosen_ids"] == full_c
    assert row["prompt_ids"] + row["rejected_ids"] == full_r
    assert bpe.decode(row["chosen_ids"]).startswith(" the sky")
    mask = collate_pairs([row], bpe.pad_token_id)["completion_mask"]
    assert mask.sum(dim=1).tolist() == [len(full_c) - cut, len(full_r) - cut]


def test_chatml_fallback_template_is_used_when_the_tokenizer_has_none(bpe):
    bpe.chat_template = None
    row = encode_pair(bpe, PAIR, max_length=128)
    assert bpe.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert bpe.decode(row["chosen_ids"]) == "blue<|im_end|>\n"
